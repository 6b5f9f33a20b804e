#!/usr/bin/env python
"""Scores fused images with the metrics of the published tables.

The metrics: EN SD SF AG MI SCD VIF Qabf SSIM CC PSNR.

  python bin/evaluate.py --ir IR_DIR --vis VIS_DIR --fused FUSED_DIR [--csv OUT.csv]
  python bin/evaluate.py --ir IR_DIR --vis VIS_DIR --weights student.model [--save_fused DIR]

The three folders are paired by file stem. Prints the mean of each metric in the papers'
layout and optionally writes one CSV row per image. With --weights the fused images are
computed in memory (the 8-bit images bin/fuse.py would write) instead of read from files.
Missing partners, unreadable files and pairs of different sizes are reported per file and
the rest is scored; the exit code is then 1 (2 when nothing could start).
"""

import argparse
import sys

from mmdrfuse_jax import evaluation, imageio


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--ir", required=True, help="infrared (or PET/SPECT/CT) folder")
  parser.add_argument("--vis", required=True, help="visible (or MRI) folder")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--fused", help="folder of fused images to score")
  source.add_argument("--weights",
                      help="fuse in memory with these weights (.model/.pth/.npz/orbax)")
  parser.add_argument("--model", choices=("student", "teacher"), default="student",
                      help="with --weights")
  parser.add_argument("--output", choices=("minmax", "clip"), default="minmax",
                      help=("with --weights: minmax stretches each image to 0..255 (published); "
                            "clip clips"))
  parser.add_argument("--save_fused", metavar="DIR",
                      help="with --weights: also write the fused images here")
  parser.add_argument("--csv", metavar="OUT.csv", help="write per-image scores (name,EN,SD,...)")
  parser.add_argument("--metrics",
                      help="comma-separated subset, e.g. EN,SD,MI (default: all eleven)")
  parser.add_argument("--format", choices=evaluation.FORMATS, default="table",
                      help="how to print the means")
  parser.add_argument("--ssim_data_range", type=float, default=2.0,
                      help="SSIM data range: 2 as in the published tables, 255 the textbook value")
  parser.add_argument("--label", default="mean", help="row label of the printed means")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  if args.fused is not None and (args.save_fused or args.model != "student"
                                 or args.output != "minmax"):
    parser.error("--model, --output and --save_fused go with --weights, not --fused")

  fuse_fn = None
  try:
    names = evaluation.parse_metric_names(args.metrics)
    triples, problems = evaluation.pair_triples(args.ir, args.vis, args.fused)
    if args.weights is not None:
      from mmdrfuse_jax import checkpoints, fusion  # only needed (and imported) for --weights

      params = checkpoints.load_params(args.weights, args.model)
      fuse_fn = fusion.Fuser(params, output=args.output).fuse_images
  except (ValueError, OSError) as e:  # bad folder, weights file (WeightsError) or metric name
    print(f"error: {e}", file=sys.stderr)
    return 2
  for problem in problems:
    print(f"skipped: {problem}", file=sys.stderr)
  if not triples:
    print("error: no complete set of images to score", file=sys.stderr)
    return 2

  try:
    result = evaluation.evaluate(triples, names=names, ssim_data_range=args.ssim_data_range,
                                 fuse_fn=fuse_fn, save_fused=args.save_fused,
                                 progress=not args.no_progress and len(triples) > 1)
  except imageio.ImageError as e:  # e.g. the --save_fused folder cannot be written
    print(f"error: {e}", file=sys.stderr)
    return 2
  for problem in result.problems:
    print(f"skipped: {problem}", file=sys.stderr)
  if args.csv and result.rows:
    try:
      evaluation.write_csv_atomic(args.csv, result)
    except OSError as e:
      print(f"error: cannot write {args.csv}: {e}", file=sys.stderr)
      return 2
  if result.rows:
    print(evaluation.format_means(result, args.format, args.label))
  skipped = len(problems) + len(result.problems)
  if skipped:
    print(f"{skipped} file problem(s) reported; {len(result.rows)} image(s) scored",
          file=sys.stderr)
  if not result.rows:
    return 2
  return 1 if skipped else 0


if __name__ == "__main__":
  sys.exit(main())
