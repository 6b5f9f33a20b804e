"""`bench.py train-step`: time one full jitted training step (forward, VGG, losses, refresh,
distillation, Adam) on random data, as in a later epoch with every refresh loss active.

`--w_percep 0 --memories none` times a step without the terms that need VGG-19 (the step then
runs no VGG pass at all).

`--placement replicated|sharded|host --num_patches N` times the step with refresh memories of N
patches placed as `config.refresh.placement` places them (`update.create_train_state` with the
mesh, `update.place_state`), on a `data` mesh over all visible devices, and reports the bytes
they take on each device and on the host, measured from the arrays' shards, beside the figures
`update.memory_bytes` computes and the data pipeline's host bytes for N patches (computed:
`pipeline_host_bytes`). For the scaling table in docs/train.md, on 8 fake CPU devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python bin/bench.py train-step \
      --batch 8 --placement sharded --num_patches 16000
"""

from __future__ import annotations

import argparse
import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmdrfuse_jax.benchmarks import common
from mmdrfuse_jax.data import pipeline
from mmdrfuse_jax.models import networks, precision, vgg
from mmdrfuse_jax.train import losses, refresh, teacher_cache, update


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser("train-step", help="time of one training step")
  parser.add_argument("--model", choices=sorted(networks.MODELS), default="student")
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
                      help="how VGG-19 and the teacher compute (mmdrfuse_jax/models/precision.py)")
  parser.add_argument("--placement", choices=refresh.PLACEMENTS, default=None,
                      help="place the refresh memories as config.refresh.placement does, on a "
                      "mesh of all visible devices (the batch must divide over them; default: "
                      "replicated, over the most devices that divide the batch)")
  parser.add_argument("--num_patches", type=int, default=None,
                      help="N, the patches the refresh memories hold (default: the batch, or "
                      "one batch per step with --first_epoch)")
  parser.add_argument("--perception", choices=update.PERCEPTION_SPACES, default="vgg",
                      help="the perception term's features (config.loss.perception)")
  parser.add_argument("--profile", metavar="DIR", default=None,
                      help="also report XLA's cost analysis of the compiled step and its top "
                      "operations from a jax.profiler trace of --repeats steps written to DIR")
  parser.add_argument("--repeats", type=int, default=3)
  parser.set_defaults(run=run)


# Host bytes a patch of the data pipeline's index takes (`_Patches._index`: its image, y and
# x as int32) and an epoch's order while the epoch is delivered (`epoch_order`'s int64
# permutation and the int64 copy of the process's rows of it).
INDEX_BYTES_PER_PATCH = 3 * 4
ORDER_BYTES_PER_PATCH = 2 * 8


def pipeline_host_bytes(num_patches: int, patch_size: int = 128,
                        cache_bytes: int = pipeline.DEFAULT_CACHE_BYTES) -> dict[str, int]:
  """Host RAM the data pipeline takes for N patches, computed, in memory and streaming.

  In memory (`PatchDataset`): the decoded uint8 gray infrared and visible images, 2 x P x P
  bytes a patch for images whose sides are multiples of the patch stride P (the published
  stride: every pixel in exactly one patch; other sizes add the pixels no patch covers), plus
  the index and the epoch's order. Streaming (`StreamingPatchDataset`): the index, the order
  and the fixed cache of decoded images. Neither counts the batches in flight, nor the
  per-image names and sizes (tens of bytes an image).

  Args:
    num_patches: N.
    patch_size: P.
    cache_bytes: the streaming dataset's cache of decoded images.

  Returns:
    `in_memory` and `streaming` bytes.
  """
  per_patch = INDEX_BYTES_PER_PATCH + ORDER_BYTES_PER_PATCH
  return {"in_memory": num_patches * (2 * patch_size * patch_size + per_patch),
          "streaming": num_patches * per_patch + cache_bytes}


def measured_memory_bytes(memory: refresh.Memory) -> dict[str, int]:
  """Bytes the placed memories take, from their addressable shards.

  Returns:
    `device_bytes`: the most any one device holds in device memory (on a CPU that memory is
    host RAM too); `host_bytes`: all shards in host memory kinds (placement "host") together.
  """
  per_device: collections.Counter[jax.Device] = collections.Counter()
  host = 0
  for array in memory.values():
    on_host = array.sharding.memory_kind in ("pinned_host", "unpinned_host")
    for shard in array.addressable_shards:
      if on_host:
        host += shard.data.nbytes
      else:
        per_device[shard.device] += shard.data.nbytes
  return {"device_bytes": max(per_device.values(), default=0), "host_bytes": host}


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
  placement = args.placement or "replicated"
  if args.placement is None:
    mesh = update.make_mesh(b)
  elif b % jax.device_count():
    raise SystemExit(f"error: --batch {b} does not divide over the {jax.device_count()} "
                     "devices that --placement uses (all visible ones)")
  else:
    mesh = Mesh(np.array(jax.devices()), ("data",))
  try:
    memory_sharding = update.memory_sharding(mesh, placement)
  except ValueError as e:  # "host" on a backend without pinned host memory.
    raise SystemExit(f"error: {e}") from None
  rcfg = refresh.RefreshConfig(memories=memories, memory_dtype=args.memory_dtype,
                               per_sample=args.per_sample, placement=placement)
  weights = losses.PUBLISHED_WEIGHTS[args.model]
  if args.w_percep is not None:
    weights = dataclasses.replace(weights, w_percep=args.w_percep)
  cfg = update.StepConfig(args.model, weights, refresh=rcfg, steps_per_epoch=10**6,
                         precision=args.precision, perception=args.perception)
  rng = np.random.default_rng(0)
  ir = rng.random((b, s, s, 1), dtype=np.float32)
  vi = rng.random((b, s, s, 1), dtype=np.float32)
  teacher = networks.init_params("teacher", jax.random.key(1)) if args.model == "student" else None
  # First-epoch steps see new patches every time: one set of slots per step; later steps
  # read and refresh the same pre-filled slots.
  id_sets = args.repeats + 1 if args.first_epoch else 1
  num_patches = b * id_sets if args.num_patches is None else args.num_patches
  if num_patches < b * id_sets:
    raise SystemExit(f"error: --num_patches {num_patches} is fewer than the {b * id_sets} "
                     "patches the timed steps use")
  # Spread over all N slots as a shuffled epoch spreads them (in the split placements, over
  # the devices' parts).
  ids = (np.random.default_rng(1).permutation(num_patches)[:b * id_sets]
         .astype(np.int32).reshape(id_sets, b))
  # The trainer's path: the memories are created where the placement puts them, never whole
  # on one device, and the rest of the state is replicated.
  state = update.create_train_state(args.model, update.make_optimizer(), jax.random.key(0),
                                   num_patches, s, rcfg, teacher_params=teacher,
                                   precision=args.precision, mesh=mesh)
  state = update.place_state(state, mesh, placement)
  if not args.first_epoch:
    replicated = NamedSharding(mesh, PartitionSpec())

    def fill(memory, slot_ids, good):
      return {key: refresh.scatter(slots, slot_ids, good, jnp.ones(b, bool), rcfg.memory_dtype,
                                   on_host=placement == "host")
              for key, slots in memory.items()}

    fill = jax.jit(fill, in_shardings=(memory_sharding, replicated, replicated),
                   out_shardings=memory_sharding, donate_argnums=0)
    state = state.replace(memory=fill(state.memory, ids[0], np.maximum(ir, vi)))
  measured = measured_memory_bytes(state.memory)
  slots = int(max((x.shape[0] for x in state.memory.values()), default=0))
  computed = update.memory_bytes(num_patches, mesh.devices.size, placement,
                                refresh.bytes_per_sample(rcfg, s, s))
  frozen = update.replicate(
      update.Frozen(vgg=jax.tree_util.tree_map(jnp.asarray, vgg.random_params()), teacher=teacher),
      mesh)
  step = update.make_train_step(cfg, mesh)
  batch: dict[str, jax.Array | np.ndarray] = {"ir": ir, "vis": vi}
  teacher_in_step = args.teacher_in_step or args.first_epoch
  if cfg.uses_teacher and not teacher_in_step:
    # The cache's own ids: it is indexed by patch id, and N of its slots would cost
    # N x 131,072 bytes for the batch's few.
    batch = teacher_cache.TeacherCache(frozen.teacher, b, s, mesh, args.precision).add_to(
        {**batch, "patch_id": np.arange(b, dtype=np.int32)})
  box = {"state": state, "metrics": None, "calls": 0}

  def one_step():
    ids_now = ids[box["calls"] % id_sets]
    box["calls"] += 1
    box["state"], box["metrics"] = step(box["state"], {**batch, "patch_id": ids_now}, frozen)
    return box["metrics"]

  timing = common.time_call(one_step, repeats=args.repeats, warmup=1)
  metrics = jax.device_get(box["metrics"])
  profile = {}
  if args.profile:
    ids_now = ids[0]
    state_now = box["state"]
    cost = step.jitted.lower(state_now.replace(memory={}), state_now.memory,  # type: ignore
                             {**batch, "patch_id": ids_now}, frozen).compile()
    analysis = cost.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    profile = {
        "xla_flops": float(analysis.get("flops", float("nan"))),
        "xla_bytes_accessed": float(analysis.get("bytes accessed", float("nan"))),
        "top_operations": common.profile_operations(one_step, args.profile, calls=args.repeats),
    }
  pipeline_bytes = pipeline_host_bytes(num_patches, s)
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
    "perception": args.perception,
    "vgg_taps_of_output": cfg.output_taps,
    "first_epoch": args.first_epoch,
    "ms_per_step": 1e3 * timing["median_s"],
    "ms_per_step_min": 1e3 * timing["min_s"],
    "runs": timing["runs"],
    "placement": placement,
    "devices": int(mesh.devices.size),
    "num_patches": num_patches,
    "memory_slots": slots,
    "memory_bytes_per_device": measured["device_bytes"],
    "memory_host_bytes": measured["host_bytes"],
    "memory_bytes_per_device_computed": computed["device_bytes"],
    "memory_host_bytes_computed": computed["host_bytes"],
    "pipeline_host_bytes_in_memory_computed": pipeline_bytes["in_memory"],
    "pipeline_host_bytes_streaming_computed": pipeline_bytes["streaming"],
    "peak_rss_bytes": common.peak_rss_bytes(),
    "refresh_bytes_per_sample": refresh.bytes_per_sample(rcfg, s, s),
    "published_refresh_bytes_per_sample": 2 * s * s * 8,
    **{f"refresh_{kind.name}_loss_on": float(metrics[f"refresh/{kind.name}_loss_on"])
       for kind in rcfg.kinds},
    **profile,
  }
