"""`bench.py train-step`: time one full jitted training step (forward, VGG, losses, refresh,
distillation, Adam) on random data, as in a later epoch with every refresh loss active.

`--w_percep 0 --memories none` times a step without the terms that need VGG-19 (the step then
runs no VGG pass at all)."""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mmdrfuse_jax import distill, losses, models, precision, refresh, train, vgg
from mmdrfuse_jax.benchmarks import common


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser("train-step", help="time of one training step")
  parser.add_argument("--model", choices=sorted(models.MODELS), default="student")
  parser.add_argument("--batch", type=int, default=25)
  parser.add_argument("--size", type=int, default=128, help="patch height and width")
  parser.add_argument("--memory_dtype", choices=refresh.MEMORY_DTYPES, default="bfloat16")
  parser.add_argument("--per_sample", action="store_true", help="per-sample refresh decisions")
  all_kinds = ",".join(kind.name for kind in refresh.MEMORY_KINDS)
  parser.add_argument("--memories", default=all_kinds,
                      help=f"refresh memories, comma-separated, or 'none' (default {all_kinds})")
  parser.add_argument("--w_percep", type=float, default=None,
                      help="perception loss weight (default: the published weight of --model)")
  parser.add_argument("--teacher_in_step", action="store_true",
                      help="student: run the teacher inside the step (a first-epoch step; later "
                      "steps take its targets from the host cache)")
  parser.add_argument("--first_epoch", action="store_true",
                      help="a first-epoch step: empty memories (no refresh losses, no VGG pass on "
                      "them) and, for the student, the teacher inside the step")
  parser.add_argument("--precision", choices=precision.MODES, default="exact",
                      help="how VGG-19 and the teacher compute (mmdrfuse_jax/precision.py)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
  """Median step time after compilation (random weights and a random seeded VGG).

  By default a student step takes the teacher's targets from the host cache, as every step
  after the first epoch does (`--teacher_in_step` times a first-epoch step). The memories are
  pre-filled with a smoothed copy of the sources, which scores better than
  the untrained network's output, so every timed step runs every refresh loss and its VGG
  passes: the most expensive (later-epoch) case. With `--first_epoch` every step sees
  patches never seen before (empty memory slots), as in the first epoch.
  """
  b, s = args.batch, args.size
  memories = () if args.memories == "none" else tuple(args.memories.split(","))
  rcfg = refresh.RefreshConfig(memories=memories, memory_dtype=args.memory_dtype,
                               per_sample=args.per_sample)
  weights = losses.PUBLISHED_WEIGHTS[args.model]
  if args.w_percep is not None:
    weights = dataclasses.replace(weights, w_percep=args.w_percep)
  cfg = train.StepConfig(args.model, weights, refresh=rcfg, steps_per_epoch=10**6,
                         precision=args.precision)
  rng = np.random.default_rng(0)
  ir = rng.random((b, s, s, 1), dtype=np.float32)
  vi = rng.random((b, s, s, 1), dtype=np.float32)
  ids = np.arange(b, dtype=np.int32)
  teacher = models.init_params("teacher", jax.random.key(1)) if args.model == "student" else None
  # First-epoch steps see new patches every time: one set of slots per step.
  num_slots = b * (args.repeats + 1) if args.first_epoch else b
  state = train.create_train_state(args.model, train.make_optimizer(), jax.random.key(0),
                                   num_slots, s, rcfg, teacher_params=teacher,
                                   precision=args.precision)
  if not args.first_epoch:
    good = jnp.asarray(np.maximum(ir, vi))
    state = state.replace(memory={
        key: refresh.scatter(slots, ids, good, np.ones(b, bool), rcfg.memory_dtype)
        for key, slots in state.memory.items()})
  frozen = train.Frozen(vgg=jax.tree_util.tree_map(jnp.asarray, vgg.random_params()),
                        teacher=teacher)
  mesh = train.make_mesh(b)
  step = train.make_train_step(cfg, mesh)
  state = train.replicate(state, mesh)
  batch = {"ir": ir, "vis": vi, "patch_id": ids}
  teacher_in_step = args.teacher_in_step or args.first_epoch
  if cfg.uses_teacher and not teacher_in_step:
    batch = distill.TeacherCache(b, s, mesh, args.precision).add_to(batch, frozen.teacher)
  box = {"state": state, "metrics": None, "calls": 0}

  def one_step():
    ids_now = (ids + b * box["calls"]) % num_slots
    box["calls"] += 1
    box["state"], box["metrics"] = step(box["state"], {**batch, "patch_id": ids_now}, frozen)
    return box["metrics"]

  timing = common.time_call(one_step, repeats=args.repeats, warmup=1)
  metrics = jax.device_get(box["metrics"])
  return {
    "benchmark": "train-step",
    "model": args.model,
    "precision": args.precision,
    "batch": b,
    "size": s,
    "memory_dtype": args.memory_dtype,
    "per_sample": args.per_sample,
    "teacher_in_step": bool(cfg.uses_teacher and teacher_in_step),
    "memories": list(rcfg.memories),
    "w_percep": weights.w_percep,
    "vgg_taps_of_output": cfg.output_taps,
    "first_epoch": args.first_epoch,
    "ms_per_step": 1e3 * timing["median_s"],
    "ms_per_step_min": 1e3 * timing["min_s"],
    "runs": timing["runs"],
    "refresh_bytes_per_sample": refresh.bytes_per_sample(rcfg, s, s),
    "published_refresh_bytes_per_sample": 2 * s * s * 8,
    **{f"refresh_{kind.name}_loss_on": float(metrics[f"refresh/{kind.name}_loss_on"])
       for kind in rcfg.kinds},
  }
