"""Exports MMDRFuse weights as a StableHLO or ONNX file that runs without this project.

  python bin/export.py --weights student.model --format stablehlo --out student.stablehlo
  python bin/export.py --weights teacher.model --model teacher --format onnx --out teacher.onnx

The file computes `(ir, vis) -> fused` on float32 NHWC (batch, height, width, 1) images in
[0, 1], any batch, height and width, with the output stage of `--output` (none: the network's
tanh output; clip: clipped to [0, 1]; minmax: each image stretched to [0, 1], as published).
It is written under a temporary name and renamed. `--check_ir`/`--check_vis` (two files or
two folders paired by stem) then run the written file on those pairs and compare it with the
project's own fusion.

Exit codes: 0 written (and checked within tolerance); 1 the file could not be written, or a
check pair was skipped or differed beyond tolerance; 2 nothing was done (unusable weights,
--out or check inputs, a missing onnx/onnxruntime package).
"""

import argparse
import pathlib
import sys

from mmdrfuse_jax.inference import export
from mmdrfuse_jax.io import files, imageio
from mmdrfuse_jax.models import weight_files
from mmdrfuse_jax.runtime import cli, interrupts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_weights_arguments(parser)
  parser.add_argument("--format", required=True, choices=export.FORMATS,
                      help="stablehlo: jax.export file (CPU and CUDA); onnx: ONNX model")
  parser.add_argument("--out", required=True, help="the file to write")
  parser.add_argument("--output", choices=export.OUTPUT_STAGES, default="none",
                      help=("output stage in the file: none (tanh output), clip (to [0, 1]) or "
                            "minmax (each image stretched to [0, 1], as published)"))
  parser.add_argument("--check_ir", help="infrared images (file or folder) to check the file on")
  parser.add_argument("--check_vis", help="visible images (file or folder) to check the file on")
  args = parser.parse_args(argv)
  if (args.check_ir is None) != (args.check_vis is None):
    print("error: --check_ir and --check_vis go together", file=sys.stderr)
    return 2
  out = pathlib.Path(args.out)
  try:
    if args.format == "onnx":
      export.require_onnx(runtime=args.check_ir is not None)
    params = weight_files.load_params(args.weights, args.model)
    pairing = None
    inputs = [("weights file (--weights)", pathlib.Path(args.weights))]
    if args.check_ir is not None:
      pairing = imageio.pair_inputs([args.check_ir, args.check_vis])
      inputs += [("infrared check input (--check_ir)", pathlib.Path(args.check_ir)),
                 ("visible check input (--check_vis)", pathlib.Path(args.check_vis))]
      inputs += [(f"check input file ({stem})", path)
                 for stem, paths in pairing.pairs for path in paths]
    if out.is_dir():
      raise files.OutputError(f"--out {out}: is a folder; give the file to write")
    files.refuse_overwrites([out], inputs, "--out")
    created = files.prepare_folder(out.parent, "--out folder")
  except (weight_files.WeightsError, imageio.ImageError, files.OutputError,
          export.ExportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    with interrupts.raise_on_signals():
      data = export.export_bytes(params, args.format, args.model, args.output)
      export.write_file(out, data)
  except interrupts.Interrupted as e:  # The file is written atomically: nothing is left.
    print(f"stopped by {interrupts.signal_name(e.signum)}: {out} not written", file=sys.stderr)
    return interrupts.exit_code(e.signum)
  except OSError as e:
    print(f"error: cannot write {files.os_error_message(e, out)}", file=sys.stderr)
    return 1
  finally:
    files.remove_created_folders(created)  # only where nothing was written
  print(f"wrote {out} ({args.format}, {args.model}, output {args.output}, {len(data)} bytes)")
  if pairing is None:
    return 0
  return _check(args, params, data, pairing)


def _check(args: argparse.Namespace, params, data: bytes, pairing) -> int:
  """Runs the written file on the check pairs; 1 if any is skipped or beyond tolerance."""
  runner = export.load_runner(args.format, data)
  results, problems = export.check_pairs({"file": (runner, args.output)}, params, pairing.pairs)
  result = results["file"]
  problems = pairing.problems + problems
  for problem in problems:
    print(f"skipped: {problem}", file=sys.stderr)
  tolerance = (f"{export.MAX_LEVEL_DIFFERENCE} level" if args.output == "minmax"
               else f"{export.MAX_ABS_DIFFERENCE:g}")
  print(f"checked {result.pairs} pair(s) against the project's fusion: max |difference| "
        f"{result.max_abs:.3g} (pair {result.worst or '-'}), max {result.max_levels} 8-bit gray "
        f"level(s); {'within' if result.passed() else 'BEYOND'} tolerance ({tolerance})")
  return 0 if result.passed() and not problems and result.pairs else 1


if __name__ == "__main__":
  sys.exit(main())
