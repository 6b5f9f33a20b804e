"""Benchmark: patches per second delivered by the training patch pipeline, and its peak RSS.

  python bin/bench.py pipeline --batch 30                       # synthetic pairs in memory
  python bin/bench.py pipeline --data_dir D --dataset roadscene  # a built dataset
  python bin/bench.py pipeline --data_dir D --dataset roadscene --streaming --rss

Times the iterator alone (host NumPy batches, or device arrays with --device), after the
images are loaded (or, with --streaming, the records opened), over whole epochs (the epoch
boundaries' reshuffles included).

`--rss` runs the measurement in a fresh process and reports its peak resident memory
(`ru_maxrss`): `base_rss_mb` once the libraries are imported, `peak_rss_mb` at the end,
so that no earlier work (a build, another benchmark of the suite) mixes in.
`--make_dataset N` first writes N procedural pairs of --size x --size to DATA_DIR/pairs and
builds them into DATA_DIR (`paired_folders`; reused when already there), to compare the
pipeline on datasets of N and 10N images:

  python bin/bench.py pipeline --make_dataset 40 --data_dir /tmp/p40 --batch 25 --rss
  python bin/bench.py pipeline --make_dataset 400 --data_dir /tmp/p400 --batch 25 --rss --streaming
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time
from typing import Any


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
  p.add_argument("--streaming", action="store_true",
                 help="read the patches from the built dataset's records as batches need them "
                 "(needs --data_dir or --make_dataset)")
  p.add_argument("--threads", type=int, default=None,
                 help="grain threads assembling batches (default: the dataset's own)")
  p.add_argument("--cache_mb", type=float, default=None,
                 help="--streaming: decoded images kept across batches, MiB (default 32)")
  p.add_argument("--rss", action="store_true",
                 help="measure in a fresh process and report its peak RSS")
  p.add_argument("--make_dataset", type=int, default=0, metavar="N",
                 help="write N procedural pairs of --size to DATA_DIR/pairs and build them "
                 "into DATA_DIR first (reused when already built)")
  p.set_defaults(run=run)


def run(args) -> dict:
  if args.make_dataset:
    if not args.data_dir:
      raise SystemExit("error: --make_dataset needs --data_dir")
    make_dataset(args.make_dataset, args.size, args.data_dir)
    args.dataset = "paired_folders"
  if args.streaming and not args.data_dir:
    raise SystemExit("error: --streaming reads a built dataset: give --data_dir or --make_dataset")
  if args.rss:
    return _in_fresh_process(args)
  return _measure(args)


def make_dataset(num_pairs: int, size: int, data_dir: str) -> None:
  """Writes `num_pairs` procedural size x size pairs to DATA_DIR/pairs and builds them there.

  The pairs are written only when the folder does not hold them yet (rewriting would change
  their modification times, and so rebuild the dataset).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from mmdrfuse_jax.data import prepare, synthetic  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  folder = pathlib.Path(data_dir) / "pairs"
  names = [f"{i:04d}.png" for i in range(num_pairs)]
  if not all((folder / sub / name).is_file() for sub in ("ir", "vi") for name in names):
    start = time.perf_counter()
    synthetic.write_pairs(folder, num_pairs, size, size, seed=0)
    print(f"wrote {num_pairs} pairs of {size}x{size} to {folder} "
          f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
  start = time.perf_counter()
  built = prepare.prepare("paired_folders", folder, data_dir)
  print(f"{built.status}: {built.data_dir} ({time.perf_counter() - start:.0f} s)",
        file=sys.stderr)


def _in_fresh_process(args) -> dict:
  """`_measure(args)` in a new interpreter, with that interpreter's peak RSS."""
  options = {k: v for k, v in vars(args).items()
             if isinstance(v, (int, float, str, bool, type(None)))}
  options.update(rss=False, make_dataset=0)
  script = ("import json, sys, argparse\n"
            "from mmdrfuse_jax.benchmarks import pipeline\n"
            "print(json.dumps(pipeline._measure(argparse.Namespace(**json.loads(sys.argv[1])),"
            " report_rss=True)))\n")
  result = subprocess.run([sys.executable, "-c", script, json.dumps(options)],
                          stdout=subprocess.PIPE, text=True)
  if result.returncode != 0:
    raise SystemExit(f"error: the measuring process failed (exit {result.returncode})")
  return json.loads(result.stdout.strip().splitlines()[-1])


def _peak_rss_mb() -> float:
  from mmdrfuse_jax.benchmarks import common  # pylint: disable=g-import-not-at-top

  return round(common.peak_rss_bytes() / 2**20, 1)


def _measure(args: argparse.Namespace, report_rss: bool = False) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  from mmdrfuse_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  if args.data_dir:
    # Imported before the baseline: both modes use it.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    tfds.disable_progress_bar()
  base_rss = _peak_rss_mb()
  start = time.perf_counter()
  patch: dict[str, Any] = dict(patch_size=args.patch_size, patch_stride=args.patch_stride)
  if args.data_dir:
    extra: dict[str, Any] = {}
    if args.streaming and args.cache_mb is not None:
      extra["cache_bytes"] = int(args.cache_mb * 2**20)
    ds = pipeline.PatchDataset.from_tfds(args.data_dir, args.dataset, args.split,
                                         streaming=bool(args.streaming), num_threads=args.threads,
                                         **patch, **extra)
    source = f"{args.dataset}/{args.split}"
  else:
    ds = pipeline.PatchDataset.from_synthetic(args.num_pairs, args.size, args.size, seed=0,
                                              **patch)
    source = f"synthetic {args.num_pairs}x{args.size}x{args.size}"
  load_s = time.perf_counter() - start
  sharding = jax.make_mesh((len(jax.devices()),), ("data",)) if args.device else None
  steps = ds.steps_per_epoch(args.batch)
  if steps == 0:
    raise SystemExit(f"error: {ds.num_patches} patches do not make one batch of {args.batch}")
  epochs = -(-args.min_batches // steps)
  threads = dict(num_threads=args.threads)
  # Warm-up: thread start-up and (with --device) the first transfers.
  for _ in zip(range(3), ds.iterate(args.batch, seed=0, num_epochs=1, sharding=sharding,
                                    **threads)):
    pass
  cache = getattr(ds, "_cache", None)
  misses0 = cache.misses if cache is not None else 0
  n = 0
  start = time.perf_counter()
  last = None
  for batch, _ in ds.iterate(args.batch, seed=1, num_epochs=epochs, sharding=sharding, **threads):
    n += 1
    last = batch
  jax.block_until_ready(last)
  elapsed = time.perf_counter() - start
  result = {
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
      "streaming": isinstance(ds, pipeline.StreamingPatchDataset),
      "threads": ds.default_threads if args.threads is None else args.threads,
  }
  if cache is not None:
    # Image pairs read and decoded per patch delivered (the rest came from the cache).
    result["pairs_decoded_per_patch"] = round((cache.misses - misses0) / (n * args.batch), 3)
    result["cache_mb"] = round(cache.max_bytes / 2**20, 1)
  if report_rss:
    result.update(base_rss_mb=base_rss, peak_rss_mb=_peak_rss_mb())
  return result
