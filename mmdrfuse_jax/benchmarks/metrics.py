"""`bench.py metrics`: time the full metric set (`metrics.all_metrics`) per image."""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from mmdrfuse_jax.benchmarks import common
from mmdrfuse_jax.evaluation import metrics


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser("metrics", help="time of the eleven fusion metrics per image")
  parser.add_argument("--height", type=int, default=480)
  parser.add_argument("--width", type=int, default=640)
  parser.add_argument("--batch", type=int, default=1,
                      help=("images per call: 1 scores one (H, W) image, more a vmapped (B, H, W) "
                            "batch"))
  parser.add_argument("--repeats", type=int, default=20)
  parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
  """Median time (device work finished) of all published metrics, per image, after compilation.

  Random 8-bit-valued images: the cost does not depend on the values.
  """
  if min(args.height, args.width) < metrics.MIN_SIZE:
    raise SystemExit(f"error: images must be at least {metrics.MIN_SIZE}x{metrics.MIN_SIZE}")
  rng = np.random.default_rng(0)
  if args.batch < 1:
    raise SystemExit("error: --batch must be at least 1")
  # One image runs the unbatched program, as `evaluation.evaluate` does: it is faster than a
  # vmap over a batch of one.
  shape = (args.batch, args.height, args.width) if args.batch > 1 else (args.height, args.width)
  images = [jax.device_put(rng.integers(0, 256, shape).astype(np.float32)) for _ in range(3)]
  start = time.perf_counter()
  jax.block_until_ready(metrics.all_metrics(*images))
  first_s = time.perf_counter() - start
  timing = common.time_call(lambda: metrics.all_metrics(*images), repeats=args.repeats)
  per_call = args.batch
  return {
      "benchmark": "metrics",
      "metrics": ",".join(metrics.METRIC_NAMES),
      "height": args.height,
      "width": args.width,
      "batch": args.batch,
      "ms_per_image": 1e3 * timing["median_s"] / per_call,
      "ms_per_image_min": 1e3 * timing["min_s"] / per_call,
      "compile_and_first_run_s": first_s,
      "runs": timing["runs"],
  }
