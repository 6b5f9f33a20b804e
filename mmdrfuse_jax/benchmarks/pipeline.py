"""Benchmark: patches per second delivered by the training patch pipeline.

  python bin/bench.py pipeline --batch 30                       # synthetic pairs in memory
  python bin/bench.py pipeline --data_dir D --dataset roadscene  # a built dataset

Times the iterator alone (host NumPy batches, or device arrays with --device), after the
images are loaded, over whole epochs (the epoch boundaries' reshuffles included).
"""

from __future__ import annotations

import time


def add_parser(subparsers) -> None:
  p = subparsers.add_parser("pipeline", help="patches/s of the training patch pipeline")
  p.add_argument("--batch", type=int, default=30)
  p.add_argument("--data_dir",
                 help="a TFDS data_dir built by bin/prepare_data.py (default: synthetic pairs)")
  p.add_argument("--dataset", default="roadscene")
  p.add_argument("--split", default="train")
  p.add_argument("--num_pairs", type=int, default=32, help="synthetic pairs")
  p.add_argument("--size", type=int, default=512, help="synthetic image height and width")
  p.add_argument("--patch_size", type=int, default=128)
  p.add_argument("--patch_stride", type=int, default=128)
  p.add_argument("--min_batches", type=int, default=300, help="time at least this many batches")
  p.add_argument("--device", action="store_true",
                 help="put batches on the devices (sharded over a 1-D mesh)")
  p.set_defaults(run=run)


def run(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  from mmdrfuse_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  if args.data_dir:
    ds = pipeline.PatchDataset.from_tfds(args.data_dir, args.dataset, args.split,
                                         patch_size=args.patch_size, patch_stride=args.patch_stride)
    source = f"{args.dataset}/{args.split}"
  else:
    ds = pipeline.PatchDataset.from_synthetic(args.num_pairs, args.size, args.size, seed=0,
                                              patch_size=args.patch_size,
                                              patch_stride=args.patch_stride)
    source = f"synthetic {args.num_pairs}x{args.size}x{args.size}"
  load_s = time.perf_counter() - start
  sharding = jax.make_mesh((len(jax.devices()),), ("data",)) if args.device else None
  steps = ds.steps_per_epoch(args.batch)
  if steps == 0:
    raise SystemExit(f"error: {ds.num_patches} patches do not make one batch of {args.batch}")
  epochs = -(-args.min_batches // steps)
  # Warm-up: thread start-up and (with --device) the first transfers.
  for _ in zip(range(3), ds.iterate(args.batch, seed=0, num_epochs=1, sharding=sharding)):
    pass
  n = 0
  start = time.perf_counter()
  last = None
  for batch, _ in ds.iterate(args.batch, seed=1, num_epochs=epochs, sharding=sharding):
    n += 1
    last = batch
  jax.block_until_ready(last)
  elapsed = time.perf_counter() - start
  return {
      "benchmark": "pipeline",
      "source": source,
      "num_images": ds.num_images,
      "num_patches": ds.num_patches,
      "batch": args.batch,
      "batches": n,
      "patches_per_s": round(n * args.batch / elapsed, 1),
      "batches_per_s": round(n / elapsed, 2),
      "load_s": round(load_s, 3),
      "on_device": bool(args.device),
  }
