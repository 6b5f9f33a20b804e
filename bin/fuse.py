#!/usr/bin/env python
"""Fuses infrared/visible (or PET/SPECT/CT + MRI) image pairs with MMDRFuse weights.

  python bin/fuse.py --weights student.model --ir IR --vis VIS --out OUT_DIR

IR and VIS are two files or two folders paired by file stem (a.png pairs with a.jpg).
Writes OUT_DIR/<stem>.png. Problems with single pairs are reported, the rest is fused, and
the exit code is 1 if anything was skipped (2 if nothing could start).
"""

import argparse
import sys

from mmdrfuse_jax import batch_fuse, checkpoints, fusion, imageio


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--weights", required=True,
                      help=("published .model/.pth, the project's .npz, or an orbax checkpoint "
                            "folder"))
  parser.add_argument("--ir", required=True, help="infrared (or PET/SPECT/CT) image or folder")
  parser.add_argument("--vis", required=True, help="visible (or MRI) image or folder")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--model", choices=("student", "teacher"), default="student")
  parser.add_argument("--output", choices=fusion.OUTPUT_MODES, default="minmax",
                      help="minmax: stretch each image to 0..255 (published); clip: clip to [0, 1]")
  parser.add_argument("--color", action="store_true",
                      help="fuse the luma of the colour input and keep its colours (YCbCr)")
  parser.add_argument("--bucket", type=int, default=128,
                      help=("student canvases are multiples of this (one compile per bucket); "
                            "0: exact sizes"))
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)

  try:
    params = checkpoints.load_params(args.weights, args.model)
    pairing = imageio.pair_inputs([args.ir, args.vis])
  except (checkpoints.WeightsError, imageio.ImageError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for problem in pairing.problems:
    print(f"skipped: {problem}", file=sys.stderr)
  fuser = fusion.Fuser(params, output=args.output, color=args.color, bucket=args.bucket)
  written, problems = batch_fuse.fuse_pairs(
      fuser, pairing.pairs, args.out, progress=not args.no_progress,
      report=lambda message: print(f"skipped: {message}", file=sys.stderr))
  skipped = len(pairing.problems) + len(problems)
  print(f"fused {written} pair(s) into {args.out}"
        + (f"; {skipped} problem(s) reported" if skipped else ""))
  return 1 if skipped else 0


if __name__ == "__main__":
  sys.exit(main())
