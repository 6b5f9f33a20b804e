"""Fuses infrared/visible (or PET/SPECT/CT + MRI) image pairs with MMDRFuse weights.

  python bin/fuse.py --weights student.model --ir IR --vis VIS --out OUT_DIR

IR and VIS are two files or two folders paired by file stem (a.png pairs with a.jpg).
Writes OUT_DIR/<stem>.png. Problems with single pairs are reported, the rest is fused, and
the exit code is 1 if anything was skipped (2 if nothing could start: bad weights, inputs
or options, or an output folder that is an input folder, would replace an input file, or
cannot be written). SIGINT/SIGTERM stop after the current image (the finished images stay)
with exit code 130/143.
"""

import argparse
import sys

from mmdrfuse_jax.inference import batch_fuse, fusion
from mmdrfuse_jax.io import files, imageio
from mmdrfuse_jax.models import weight_files
from mmdrfuse_jax.runtime import backend, cli, interrupts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_weights_arguments(parser)
  parser.add_argument("--ir", required=True, help="infrared (or PET/SPECT/CT) image or folder")
  parser.add_argument("--vis", required=True, help="visible (or MRI) image or folder")
  parser.add_argument("--out", required=True,
                      help="output folder (created when the first image is written)")
  cli.add_output_arguments(parser, "image")
  parser.add_argument("--bucket", type=int, default=128,
                      help=("canvases are multiples of this (one compile per bucket; even for "
                            "the teacher); 0: exact sizes"))
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  return cli.run_until_stopped(_run, args, at_once="the images already written are complete")


def _run(args: argparse.Namespace, stop: interrupts.StopRequest) -> int:
  try:
    fusion.check_bucket(args.bucket)
  except ValueError as e:
    print(f"error: --{e}", file=sys.stderr)
    return 2
  try:
    params = weight_files.load_params(args.weights, args.model)
    pairing = imageio.pair_inputs([args.ir, args.vis])
    inputs = batch_fuse.input_paths([args.ir, args.vis], pairing.pairs)
    created = batch_fuse.check_output(args.out, [stem for stem, _ in pairing.pairs], inputs)
  except (weight_files.WeightsError, imageio.ImageError, files.OutputError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if pairing.pairs:  # what jax runs on, once the run will fuse
    backend.report(backend.stderr_log)
  try:
    for problem in pairing.problems:
      print(f"skipped: {problem}", file=sys.stderr)
    fuser = fusion.Fuser(params, output=args.output, color=args.color, bucket=args.bucket)
    result = batch_fuse.fuse_pairs(
        fuser, pairing.pairs, args.out, progress=not args.no_progress, stop=stop,
        report=lambda message: print(f"skipped: {message}", file=sys.stderr))
  finally:
    files.remove_created_folders(created)  # only where nothing was written
  if args.color and fuser.chroma_sources:
    print("colour: " + _chroma_summary(fuser.chroma_sources))
  return cli.finish_folder_fusion(result, len(pairing.problems), args.out, stop)


def _chroma_summary(sources) -> str:
  """Which input gave each fused image its colour (`Fuser.chroma_sources`), in words."""
  words = {"vis": "from the visible (or MRI) image", "ir": "from the infrared (or PET/SPECT) "
           "image", None: "none, both inputs gray (gray result)"}
  return "; ".join(f"{words[key]}: {sources[key]} image(s)" for key in ("vis", "ir", None)
                   if sources[key])


if __name__ == "__main__":
  sys.exit(main())
