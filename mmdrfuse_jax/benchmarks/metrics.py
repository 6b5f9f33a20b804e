"""`bench.py metrics`: time the full metric set (`metrics.all_metrics`) per image."""

from __future__ import annotations

import argparse
import functools
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
                      help=("images per call: 1 scores one (H, W) image, more a (B, H, W) batch "
                            "(vmapped, or image by image when large: see metrics.all_metrics)"))
  parser.add_argument("--sized", action="store_true",
                      help="pass each image's size, as evaluation does for padded canvases "
                      "(a traced size instead of the full shape)")
  parser.add_argument("--per_metric", action="store_true",
                      help="also time each metric compiled on its own (median ms per image)")
  parser.add_argument("--profile", metavar="DIR", default=None,
                      help="also report the top XLA operations of a call, from a jax.profiler "
                      "trace of --repeats calls written to DIR")
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
  fused, ir, vis = (jax.device_put(rng.integers(0, 256, shape).astype(np.float32))
                    for _ in range(3))
  size = None
  if args.sized:
    size = np.broadcast_to(np.array([args.height, args.width], np.int32), shape[:-2] + (2,))

  def score(names: tuple[str, ...] = metrics.METRIC_NAMES) -> dict:
    return metrics.all_metrics(fused, ir, vis, size, names=names)

  start = time.perf_counter()
  jax.block_until_ready(score())
  first_s = time.perf_counter() - start
  timing = common.time_call(score, repeats=args.repeats)
  per_call = args.batch
  result = {
      "benchmark": "metrics",
      "metrics": ",".join(metrics.METRIC_NAMES),
      "height": args.height,
      "width": args.width,
      "batch": args.batch,
      "sized": args.sized,
      "ms_per_image": 1e3 * timing["median_s"] / per_call,
      "ms_per_image_min": 1e3 * timing["min_s"] / per_call,
      "compile_and_first_run_s": first_s,
      "runs": timing["runs"],
  }
  if args.per_metric:
    # Each metric in its own program: EN and MI each count their histograms here, and the
    # light metrics do not share their means, so the parts add up to more than the whole.
    per_metric = {}
    for name in metrics.METRIC_NAMES:
      one = common.time_call(functools.partial(score, (name,)), repeats=args.repeats)
      per_metric[name] = 1e3 * one["median_s"] / per_call
    result["per_metric_ms_per_image"] = per_metric
  if args.profile:
    result["top_operations"] = common.profile_operations(score, args.profile,
                                                         calls=args.repeats)
  return result
