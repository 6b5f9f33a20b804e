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
--out or check inputs, a missing onnx/onnxruntime package); 130/143 stopped by SIGINT/SIGTERM,
with one line saying whether the file was written (whole: it is renamed into place complete)
and how far its check got. A signal is honoured between steps (the export, the write, each
check pair), never inside XLA's compilation or onnxruntime: a stop waits for the current one.
"""

import argparse
import pathlib
import sys

from mmdrfuse_jax.runtime import cli, interrupts

# The library (jax, onnx) is imported in the functions, after `main` has taken over SIGINT and
# SIGTERM: a signal during its second of imports raised KeyboardInterrupt inside them (a
# traceback), or inside a gc callback of jax's, where Python only prints it and goes on (the
# file was then written, exit 0).


def main(argv=None) -> int:
  with _StopAtSafePoints() as stop:
    from mmdrfuse_jax.inference import export  # pylint: disable=g-import-not-at-top

    return _parse_and_run(argv, export.FORMATS, export.OUTPUT_STAGES, stop)


def _parse_and_run(argv, formats, output_stages, stop: interrupts.StopRequest) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_weights_arguments(parser)
  parser.add_argument("--format", required=True, choices=formats,
                      help="stablehlo: jax.export file (CPU and CUDA); onnx: ONNX model")
  parser.add_argument("--out", required=True, help="the file to write")
  parser.add_argument("--output", choices=output_stages, default="none",
                      help=("output stage in the file: none (tanh output), clip (to [0, 1]) or "
                            "minmax (each image stretched to [0, 1], as published)"))
  parser.add_argument("--check_ir", help="infrared images (file or folder) to check the file on")
  parser.add_argument("--check_vis", help="visible images (file or folder) to check the file on")
  args = parser.parse_args(argv)
  if (args.check_ir is None) != (args.check_vis is None):
    print("error: --check_ir and --check_vis go together", file=sys.stderr)
    return 2
  return _run(args, stop)


class _StopAtSafePoints(interrupts.StopRequest):
  """`interrupts.StopRequest` whose later signals wait for the safe point too.

  The export and the check spend their time in native code (XLA's compilation, onnxruntime)
  that calls back into Python: an exception raised there by a signal handler
  (KeyboardInterrupt, `interrupts.Interrupted`) printed a traceback from inside XLA, and
  could end in a segmentation fault. So no signal raises anything: the first one is noted and
  the tool stops at the next point between steps (the export, the write, a check pair), which
  is never more than one compilation or one pair away; later ones change nothing.
  """

  def _handle(self, signum, frame):
    del frame
    if self.signum is None:
      self.signum = signum


def _stopped(signum: int, what: str) -> int:
  """Prints the one line of a stop (`stopped by SIGINT: what`); returns 128 + signal."""
  print(f"stopped by {interrupts.signal_name(signum)}: {what}", file=sys.stderr)
  return interrupts.exit_code(signum)


def _run(args: argparse.Namespace, stop: interrupts.StopRequest) -> int:
  # pylint: disable=g-import-not-at-top
  from mmdrfuse_jax.inference import export
  from mmdrfuse_jax.io import files, imageio
  from mmdrfuse_jax.models import networks, weight_files

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
    created = files.check_output_file(out, inputs, "--out")
  except (weight_files.WeightsError, imageio.ImageError, files.OutputError,
          export.ExportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    # Safe points before and after the export (a signal during the start-up skips it).
    data = b"" if stop.signum is not None else export.export_bytes(params, args.format,
                                                                    args.model, args.output)
    if stop.signum is not None:
      return _stopped(stop.signum, f"{out} not written")
    export.write_file(out, data)  # Atomic: a stop can never leave half a file.
  except OSError as e:
    print(f"error: cannot write {files.os_error_message(e, out)}", file=sys.stderr)
    return 1
  finally:
    files.remove_created_folders(created)  # only where nothing was written
  model = networks.model_of(params)  # the network exported, also where --model was not given
  print(f"wrote {out} ({args.format}, {model}, output {args.output}, {len(data)} bytes)")
  if pairing is None:  # Done: a signal that came during the write changes nothing.
    return 0
  return _check(args, params, data, pairing, stop)


def _check(args: argparse.Namespace, params, data: bytes, pairing,
           stop: interrupts.StopRequest) -> int:
  """Runs the written file on the check pairs; 1 if any is skipped or beyond tolerance."""
  from mmdrfuse_jax.inference import export  # pylint: disable=g-import-not-at-top

  checked: list[str] = []
  try:
    runner = export.load_runner(args.format, data)
    results, problems = export.check_pairs({"file": (runner, args.output)}, params,
                                           pairing.pairs, progress=checked.append, stop=stop)
  except interrupts.Interrupted as e:  # Raised at a safe point, between compiled calls.
    return _stopped(e.signum, f"{args.out} is written and complete; its check stopped after "
                              f"{len(checked)} of {len(pairing.pairs)} pair(s)")
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
