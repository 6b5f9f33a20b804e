"""`bench.py memory-write`: time of writing one batch of slots into the refresh memories.

What the train step does to each memory after its decision (`refresh.scatter`, jitted with the
memory donated, as the step donates the state), on N slots of one memory kind on the default
device. On a CPU this is where the storage matters: a scatter converting the whole memory
would cost time in proportion to N, one in place only the batch's slots.

  python bin/bench.py memory-write --num_patches 16000 --memory_dtype bfloat16
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from mmdrfuse_jax.benchmarks import common
from mmdrfuse_jax.train import refresh


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser("memory-write",
                                 help="time of writing a batch into a refresh memory")
  parser.add_argument("--num_patches", type=int, default=16000, help="N, the memory's slots")
  parser.add_argument("--batch", type=int, default=25, help="slots written per call")
  parser.add_argument("--size", type=int, default=128, help="patch height and width")
  parser.add_argument("--memory_dtype", choices=refresh.MEMORY_DTYPES, default="bfloat16")
  parser.add_argument("--repeats", type=int, default=5)
  parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
  """Median time (device work finished) of one write after compilation."""
  b, s, n = args.batch, args.size, args.num_patches
  if not 1 <= b <= n:
    raise SystemExit(f"error: --batch {b} must be between 1 and --num_patches {n}")
  config = refresh.RefreshConfig(memories=("ssim",), memory_dtype=args.memory_dtype)
  box = {"memory": refresh.init_memory(n, s, s, config)["best_ssim"]}
  ids = jnp.asarray(np.random.default_rng(0).permutation(n)[:b].astype(np.int32))
  out = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (b, s, s, 1)).astype(np.float32))
  replace = jnp.ones(b, bool)
  write = jax.jit(lambda memory: refresh.scatter(memory, ids, out, replace, args.memory_dtype),
                  donate_argnums=0)

  def one_write():
    box["memory"] = write(box["memory"])
    return box["memory"]

  timing = common.time_call(one_write, repeats=args.repeats, warmup=1)
  return {
    "benchmark": "memory-write",
    "num_patches": n,
    "batch": b,
    "size": s,
    "memory_dtype": args.memory_dtype,
    "storage_dtype": str(box["memory"].dtype),
    "memory_bytes": int(box["memory"].nbytes),
    "ms_per_write": 1e3 * timing["median_s"],
    "ms_per_write_min": 1e3 * timing["min_s"],
    "runs": timing["runs"],
  }
