"""Scores fused images with the metrics of the published tables.

The metrics: EN SD SF AG MI SCD VIF Qabf SSIM CC PSNR.

  python bin/evaluate.py --ir IR_DIR --vis VIS_DIR --fused FUSED_DIR [--csv OUT.csv]
  python bin/evaluate.py --ir IR_DIR --vis VIS_DIR --weights student.model [--save_fused DIR]

The three folders are paired by file stem. Prints the mean of each metric in the papers'
layout and optionally writes one CSV row per image. With --weights the fused images are
computed in memory (the 8-bit images bin/fuse.py would write) instead of read from files.
Missing partners, unreadable files and pairs of different sizes are reported per file and
the rest is scored; the exit code is then 1 (2 when nothing could start, including a
--save_fused or --csv location that is an input or cannot be written: checked before any
image is scored). A metric that has no finite value for an image (CC of a constant image,
PSNR when max(F) is 0) is undefined: left out of the means, counted in an "undefined" row,
an empty CSV field, null in JSON. SIGINT/SIGTERM stop after the current image (the fused
images saved so far stay, nothing is printed or written as if complete), exit code 130/143.
"""

import argparse
import pathlib
import sys

from mmdrfuse_jax.evaluation import scoring
from mmdrfuse_jax.io import files
from mmdrfuse_jax.runtime import backend, cli, interrupts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--ir", required=True, help="infrared (or PET/SPECT/CT) folder")
  parser.add_argument("--vis", required=True, help="visible (or MRI) folder")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--fused", help="folder of fused images to score")
  source.add_argument("--weights",
                      help="fuse in memory with these weights (.model/.pth/.npz/orbax)")
  parser.add_argument("--model", choices=("student", "teacher"), default=None,
                      help=f"with --weights: {cli.MODEL_HELP}")
  parser.add_argument("--output", choices=("minmax", "clip"), default="minmax",
                      help=("with --weights: minmax stretches each image to 0..255 (published); "
                            "clip clips"))
  parser.add_argument("--save_fused", metavar="DIR",
                      help="with --weights: also write the fused images here")
  parser.add_argument("--csv", metavar="OUT.csv", help="write per-image scores (name,EN,SD,...)")
  parser.add_argument("--metrics",
                      help="comma-separated subset, e.g. EN,SD,MI (default: all eleven)")
  parser.add_argument("--format", choices=scoring.FORMATS, default="table",
                      help="how to print the means")
  parser.add_argument("--ssim_data_range", type=float, default=2.0,
                      help="SSIM data range: 2 as in the published tables, 255 the textbook value")
  parser.add_argument("--label", default="mean", help="row label of the printed means")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  if args.fused is not None and (args.save_fused or args.model is not None
                                 or args.output != "minmax"):
    parser.error("--model, --output and --save_fused go with --weights, not --fused")
  return cli.run_until_stopped(_run, args, at_once="no scores written")


def _inputs(args: argparse.Namespace, triples) -> list[tuple[str, pathlib.Path]]:
  """(description, path) of every input folder and file, none of which may be overwritten."""
  inputs = [("infrared input folder (--ir)", pathlib.Path(args.ir)),
            ("visible input folder (--vis)", pathlib.Path(args.vis))]
  if args.fused is not None:
    inputs.append(("fused input folder (--fused)", pathlib.Path(args.fused)))
  for t in triples:
    inputs += [("infrared input (--ir)", t.ir), ("visible input (--vis)", t.vis)]
    if t.fused is not None:
      inputs.append(("fused input (--fused)", t.fused))
  return inputs


def _check_outputs(args: argparse.Namespace, triples) -> list[pathlib.Path]:
  """Checks --save_fused and --csv before any work; returns the folders created for them."""
  inputs = _inputs(args, triples)
  created: list[pathlib.Path] = []
  try:
    if args.save_fused is not None:
      created += files.check_output_folder(
          args.save_fused, [pathlib.Path(args.save_fused) / f"{t.name}.png" for t in triples],
          inputs, "--save_fused")
    if args.csv is not None:
      created += files.check_output_file(args.csv, inputs, "--csv")
  except files.OutputError:
    files.remove_created_folders(created)
    raise
  return created


def _run(args: argparse.Namespace, stop: interrupts.StopRequest) -> int:
  fuse_fn = None
  try:
    names = scoring.parse_metric_names(args.metrics)
    triples, problems = scoring.pair_triples(args.ir, args.vis, args.fused)
    if args.weights is not None:
      from mmdrfuse_jax.inference import fusion
      from mmdrfuse_jax.models import weight_files  # only needed (and imported) for --weights

      params = weight_files.load_params(args.weights, args.model)
      fuse_fn = fusion.Fuser(params, output=args.output).fuse_images
    created = _check_outputs(args, triples)
  except (ValueError, OSError) as e:  # bad folder, weights file, metric name or output path
    print(f"error: {e}", file=sys.stderr)
    return 2
  if triples:  # what jax runs on, once the run will score
    backend.report(backend.stderr_log)
  try:
    return _score(args, stop, names, triples, problems, fuse_fn)
  finally:
    files.remove_created_folders(created)  # only where nothing was written


def _score(args, stop, names, triples, problems, fuse_fn) -> int:
  for problem in problems:
    print(f"skipped: {problem}", file=sys.stderr)
  if not triples:
    print("error: no complete set of images to score", file=sys.stderr)
    return 2
  result = scoring.evaluate(triples, names=names, ssim_data_range=args.ssim_data_range,
                               fuse_fn=fuse_fn, save_fused=args.save_fused,
                               progress=not args.no_progress and len(triples) > 1, stop=stop)
  for problem in result.problems:
    print(f"skipped: {problem}", file=sys.stderr)
  if result.stopped_by is not None:
    saved = f"; the fused images saved to {args.save_fused} are complete" if args.save_fused else ""
    print(f"stopped by {interrupts.signal_name(result.stopped_by)} after scoring "
          f"{len(result.rows)} of {len(triples)} image(s): no means printed, no CSV written"
          + saved, file=sys.stderr)
    return interrupts.exit_code(result.stopped_by)
  if result.rows:  # First: a CSV that cannot be written (a full disk) loses nothing printed.
    print(scoring.format_means(result, args.format, args.label), flush=True)
  if args.csv and result.rows:
    try:
      scoring.write_csv_atomic(args.csv, result)
    except OSError as e:
      print(f"error: cannot write {args.csv} ({files.os_error_cause(e)}); the means are "
            "printed above", file=sys.stderr)
      return 2
  skipped = len(problems) + len(result.problems)
  if skipped:
    print(f"{skipped} file problem(s) reported; {len(result.rows)} image(s) scored",
          file=sys.stderr)
  if not result.rows:
    return 2
  return 1 if skipped else 0


if __name__ == "__main__":
  sys.exit(main())
