"""`bench.py infer`: time the jitted `fuse` on random images of a given size."""

from __future__ import annotations

import argparse

import jax
import numpy as np

from mmdrfuse_jax import fusion, models
from mmdrfuse_jax.benchmarks import common


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser("infer", help="fusion time per image")
  parser.add_argument("--height", type=int, default=480)
  parser.add_argument("--width", type=int, default=640)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--model", choices=sorted(models.MODELS), default="student")
  parser.add_argument("--repeats", type=int, default=20)
  parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
  """Median time of `fuse` (device work finished) per image, after compilation.

  Random weights and images: the cost does not depend on their values.
  """
  params = jax.device_put(models.init_params(args.model, jax.random.key(0)))
  rng = np.random.default_rng(0)
  shape = (args.batch, args.height, args.width, 1)
  ir = jax.device_put(rng.random(shape, dtype=np.float32))
  vis = jax.device_put(rng.random(shape, dtype=np.float32))
  timing = common.time_call(lambda: fusion.fuse(params, ir, vis), repeats=args.repeats)
  return {
      "benchmark": "infer",
      "model": args.model,
      "height": args.height,
      "width": args.width,
      "batch": args.batch,
      "ms_per_image": 1e3 * timing["median_s"] / args.batch,
      "ms_per_image_min": 1e3 * timing["min_s"] / args.batch,
      "runs": timing["runs"],
  }
