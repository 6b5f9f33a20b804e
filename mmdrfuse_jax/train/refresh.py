"""Dynamic refresh (SPEC section 4) as pure functions for the jitted train step.

Each memory kind (`MEMORY_KINDS`: "ssim" and "gmsd" as published) keeps one earlier fused output
per training patch, indexed by the data pipeline's dense `patch_id`, and is described by one
`MemoryKind` entry: how an image is scored against the two sources, whether a higher score is
better, which VGG taps its loss needs, and its loss. The train step loops over the enabled
kinds at trace time, so the refresh rule is written once and a new kind is one entry here (and
a `config.refresh.<name>` switch). The memories live inside the train state, as a dict
`{"best_<name>": (N, H, W, 1) array}`, so the refresh decisions never leave the jitted step.

Placement (`placement`, see `train.memory_sharding`): "replicated" keeps every slot on every
device; "sharded" splits the slots over the devices of the mesh's `data` axis (the batch's slots
are gathered and scattered by XLA's SPMD partitioner); "host" keeps the split slots in pinned
host memory, where only the batch's slots are picked (`compute_on("device_host")`) and moved to
the device. The split placements pad the slot count to a multiple of the device count; slots past
the N patches are never read or written.

Storage (`memory_dtype`):
  * "bfloat16" (default): the tanh output rounded to bfloat16, kept as its 16 bits in a uint16
    array; an unwritten slot holds NaN. (XLA's CPU backend scatters bfloat16 through float32,
    converting the whole memory at every write; a uint16 scatter writes the batch's slots in
    place. Checkpoints written before, with bfloat16 arrays, are read back bit for bit: see
    `bfloat16_bits`.)
  * "float32": as float32; an unwritten slot holds NaN.
  * "uint8": `round((clip(x, -1, 1) + 1) / 2 * 254)`, i.e. 255 levels over tanh's range [-1, 1]
    (step 2/254, so -1, 0 and 1 are exact); the code 255 marks an unwritten slot.
The "written" flag is thus the slot's own first pixel (no extra bytes per sample): a slot is
written the first time its patch is seen (the published code's first-epoch writes, decided on
device) and is compared with the current output from then on. Because of drop-last, a patch that
was not seen in the first epoch is written when first seen instead of being compared with an
empty memory (the published code compared it with its zero-initialised array).

Decisions: by default one decision per batch on the batch means of the scores, as published
(restricted to written slots when a batch mixes written and unwritten ones, which the published
schedule never produces except for those drop-last patches); `per_sample=True` compares each
sample with its own memory. Ties neither refresh nor add a loss, as in the published code.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compute_on import compute_on

from mmdrfuse_jax.train import losses

MEMORY_DTYPES = ("bfloat16", "float32", "uint8")
PLACEMENTS = ("replicated", "sharded", "host")
_UINT8_LEVELS = 254  # Codes 0..254 hold values; 255 marks an unwritten slot.
_UINT8_EMPTY = 255
_BFLOAT16_NAN_BITS = 0x7FC0  # An unwritten "bfloat16" slot.


def ssim_score(x: jax.Array, ir: jax.Array, vi: jax.Array, per_sample: bool) -> jax.Array:
  """`ssim(x, ir) + ssim(x, vi)` per image, (B,); higher is better.

  For batch decisions the SSIM data range is chosen from the whole batch of `x`, as the
  published code does, so that the batch mean equals its batch SSIM; per sample, from each
  image of `x` on its own.
  """
  data_range = None if per_sample else losses.ssim_data_range(x)
  return losses.ssim_per_image(x, ir, data_range) + losses.ssim_per_image(x, vi, data_range)


def gmsd_score(x: jax.Array, ir: jax.Array, vi: jax.Array, per_sample: bool) -> jax.Array:
  """`gmsd(x, ir) + gmsd(x, vi)` per image, (B,); lower is better (per image either way)."""
  del per_sample  # GMSD has no batch-wide choice.
  return losses.gmsd_per_image(x, ir) + losses.gmsd_per_image(x, vi)


@dataclasses.dataclass(frozen=True)
class MemoryKind:
  """One refresh memory: what it keeps and what it costs.

  Attributes:
    name: short name; the state key is `best_<name>`, metrics are `refresh/<name>_*` and the
      loss term `l_refresh_<name>`.
    score: `(images, ir, vi, per_sample) -> (B,)` quality of images against both sources.
    higher_is_better: the direction of `score`.
    num_taps: how many VGG-19 taps (from the first) its loss reads.
    loss: `(taps_mem, taps_out, mem, out) -> (B,)` per-sample pull of `out` towards `mem`.
  """

  name: str
  score: Callable[[jax.Array, jax.Array, jax.Array, bool], jax.Array]
  higher_is_better: bool
  num_taps: int
  loss: Callable[..., jax.Array]

  @property
  def key(self) -> str:
    return f"best_{self.name}"


MEMORY_KINDS = (
    # Keeps the output with the best SSIM; its loss reads VGG taps 4 and 5.
    MemoryKind("ssim", ssim_score, higher_is_better=True, num_taps=5,
               loss=losses.refresh_ssim_loss_per_sample),
    # Keeps the output with the best (lowest) GMSD; its loss reads VGG taps 1 to 3.
    MemoryKind("gmsd", gmsd_score, higher_is_better=False, num_taps=3,
               loss=losses.refresh_gmsd_loss_per_sample),
)
_KINDS_BY_NAME = {kind.name: kind for kind in MEMORY_KINDS}


@dataclasses.dataclass(frozen=True)
class RefreshConfig:
  """Static refresh settings (hashable: they select code paths at trace time).

  Attributes:
    memories: the names of the enabled memory kinds (see `MEMORY_KINDS`).
    per_sample: per-sample decisions instead of the published one decision per batch.
    memory_dtype: "bfloat16", "float32" or "uint8" (see the module docstring).
    weight_scale: the factor 10 in the refresh loss weights `10 * gap`.
    placement: where the memories live: "replicated", "sharded" or "host" (see the module
      docstring). It changes where the slots are, never the results.
  """

  memories: tuple[str, ...] = tuple(kind.name for kind in MEMORY_KINDS)
  per_sample: bool = False
  memory_dtype: str = "bfloat16"
  weight_scale: float = 10.0
  placement: str = "replicated"

  def __post_init__(self):
    if self.memory_dtype not in MEMORY_DTYPES:
      raise ValueError(
          f"refresh memory_dtype must be one of {MEMORY_DTYPES}, got {self.memory_dtype!r}")
    if self.placement not in PLACEMENTS:
      raise ValueError(f"refresh placement must be one of {PLACEMENTS}, got {self.placement!r}")
    unknown = [name for name in self.memories if name not in _KINDS_BY_NAME]
    if unknown:
      raise ValueError(f"unknown refresh memories {unknown}; known: {sorted(_KINDS_BY_NAME)}")

  @property
  def kinds(self) -> tuple[MemoryKind, ...]:
    """The enabled memory kinds, in `MEMORY_KINDS` order."""
    return tuple(kind for kind in MEMORY_KINDS if kind.name in self.memories)


# The memories in the train state: {"best_<name>": (N, H, W, 1) array in the storage dtype}.
Memory = dict[str, jax.Array]


def storage_dtype(memory_dtype: str):
  """The dtype of the memory arrays for a `memory_dtype` setting ("bfloat16" -> uint16)."""
  return {"bfloat16": jnp.uint16, "float32": jnp.float32, "uint8": jnp.uint8}[memory_dtype]


def bfloat16_bits(array: jax.Array) -> jax.Array:
  """A bfloat16 array's bits as uint16, with the same sharding (and memory kind).

  Memories were kept as bfloat16 arrays before; a checkpoint of then restores them as such
  (orbax would convert their values, not their bits, to uint16), and this gives the array
  the state now holds. Shard by shard on the host, so no device holds more than its part.
  """
  sharding = array.sharding
  shards = [jax.device_put(np.asarray(s.data).view(np.uint16),
                           jax.sharding.SingleDeviceSharding(s.device,
                                                             memory_kind=sharding.memory_kind))
            for s in array.addressable_shards]
  return jax.make_array_from_single_device_arrays(array.shape, sharding, shards)


def bytes_per_sample(config: RefreshConfig, height: int = 128, width: int = 128) -> int:
  """Device bytes the refresh memories take per training patch (published: 262,144)."""
  itemsize = jnp.dtype(storage_dtype(config.memory_dtype)).itemsize
  return len(config.kinds) * height * width * itemsize


def init_memory(num_patches: int, height: int, width: int, config: RefreshConfig,
                sharding: jax.sharding.Sharding | None = None) -> Memory:
  """Empty memories of the enabled kinds: every slot unwritten.

  Args:
    num_patches: the number of slots.
    height: the patches' height.
    width: the patches' width.
    config: which memories, in which dtype.
    sharding: where to create them (default: the default device). Each device fills only its
      own part, so that a memory too large for one device is never whole on one.
  """
  dtype = storage_dtype(config.memory_dtype)
  fill = {"uint8": _UINT8_EMPTY, "bfloat16": _BFLOAT16_NAN_BITS}.get(config.memory_dtype, jnp.nan)
  shape = (num_patches, height, width, 1)
  if sharding is None:
    return {kind.key: jnp.full(shape, fill, dtype) for kind in config.kinds}
  if sharding.memory_kind == "pinned_host":
    # Filled on the host, part by part: filled on a device, a part would be there first.
    return {kind.key: jax.make_array_from_callback(
        shape, sharding, lambda _: np.full(sharding.shard_shape(shape), fill, dtype))
            for kind in config.kinds}
  empty = jax.jit(lambda: jnp.full(shape, fill, dtype), out_shardings=sharding)
  return {kind.key: empty() for kind in config.kinds}


def encode(x: jax.Array, memory_dtype: str) -> jax.Array:
  """Fused outputs (tanh, in [-1, 1]) to the storage dtype."""
  if memory_dtype == "uint8":
    q = jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * (_UINT8_LEVELS / 2.0))
    return q.astype(jnp.uint8)
  if memory_dtype == "bfloat16":
    return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
  return x.astype(storage_dtype(memory_dtype))


def decode(stored: jax.Array, memory_dtype: str) -> tuple[jax.Array, jax.Array]:
  """Stored slots (B, H, W, 1) to float32 images and a (B,) written flag.

  Unwritten slots decode to zeros (never NaN), so that masked-out terms cannot leak NaN into
  gradients through `jnp.where`.
  """
  if memory_dtype == "uint8":
    written = stored[:, 0, 0, 0] != _UINT8_EMPTY
    x = stored.astype(jnp.float32) * (2.0 / _UINT8_LEVELS) - 1.0
  else:
    if memory_dtype == "bfloat16":
      stored = jax.lax.bitcast_convert_type(stored, jnp.bfloat16)
    x = stored.astype(jnp.float32)
    written = ~jnp.isnan(x[:, 0, 0, 0])
  x = jnp.where(written[:, None, None, None], x, 0.0)
  return x, written


def decide(cur: jax.Array, best: jax.Array, written: jax.Array, *, higher_is_better: bool,
           per_sample: bool, weight_scale: float = 10.0) -> dict[str, jax.Array]:
  """The refresh rule for one memory on per-sample scores.

  Args:
    cur: (B,) score of the current output per sample (SSIM sum or GMSD sum).
    best: (B,) score of the memory image per sample (ignored where not written).
    written: (B,) whether the slot holds an earlier output.
    higher_is_better: True for SSIM, False for GMSD.
    per_sample: decide each sample on its own scores instead of on batch means.
    weight_scale: the factor in `weight = scale * gap`.

  Returns:
    A dict with per-sample (B,) arrays: `replace` (write the current output into the slot),
    `written` (the input flags), `weight` (the refresh-loss weight, 0 where no loss, constant
    w.r.t. gradients), and scalars
    `gap` (how much worse the current output is than the memory: S_best - S_cur or
    G_cur - G_best; batch mean over written slots) and `any_written`.
  """
  cur = jax.lax.stop_gradient(cur)
  best = jax.lax.stop_gradient(best)
  sign = 1.0 if higher_is_better else -1.0
  written_f = written.astype(jnp.float32)
  n_written = jnp.sum(written_f)
  any_written = n_written > 0
  # Masked means, so unwritten slots never enter a batch decision; `where` keeps NaN out.
  safe_best = jnp.where(written, best, 0.0)
  safe_cur = jnp.where(written, cur, 0.0)
  denom = jnp.maximum(n_written, 1.0)
  batch_gap = sign * (jnp.sum(safe_best) - jnp.sum(safe_cur)) / denom
  if per_sample:
    gap = sign * (safe_best - safe_cur)
  else:
    gap = jnp.broadcast_to(batch_gap, cur.shape)
  better = written & (gap < 0)
  worse = written & (gap > 0)
  replace = ~written | better
  weight = jnp.where(worse, weight_scale * gap, 0.0)
  return {
    "replace": replace,
    "written": written,
    "weight": weight,
    "gap": jnp.where(any_written, batch_gap, 0.0),
    "any_written": any_written,
  }


def gather(memory: jax.Array, ids: jax.Array, memory_dtype: str, on_host: bool = False
           ) -> tuple[jax.Array, jax.Array]:
  """Decoded memory images and written flags for the batch's patch ids.

  `on_host`: `memory` is in host memory (placement "host"); the slots are picked there and only
  they move to the device.
  """
  if on_host:
    host_ids = jax.device_put(ids, jax.memory.Space.Host)
    with compute_on("device_host"):
      stored = memory[host_ids]
    stored = jax.device_put(stored, jax.memory.Space.Device)
  else:
    stored = memory[ids]
  return decode(stored, memory_dtype)


def _write(memory: jax.Array, ids: jax.Array, new: jax.Array, replace: jax.Array) -> jax.Array:
  old = memory[ids]
  return memory.at[ids].set(jnp.where(replace[:, None, None, None], new, old),
                            unique_indices=True)


def scatter(memory: jax.Array, ids: jax.Array, out: jax.Array, replace: jax.Array,
            memory_dtype: str, on_host: bool = False) -> jax.Array:
  """Writes `out` into the slots `ids` where `replace`, leaving the other slots as they were.

  `on_host`: `memory` is in host memory (placement "host"); the batch's encoded slots move there
  and are written in place, so the memory never comes to the device.
  """
  new = encode(jax.lax.stop_gradient(out), memory_dtype)
  if on_host:
    ids, new, replace = jax.device_put((ids, new, replace), jax.memory.Space.Host)
    with compute_on("device_host"):
      return _write(memory, ids, new, replace)
  return _write(memory, ids, new, replace)


def stats(name: str, decision: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Scalar statistics of one memory's decision, for logging."""
  replace = decision["replace"]
  written = decision["written"]
  return {
    f"refresh/{name}_refreshed": jnp.mean((replace & written).astype(jnp.float32)),
    f"refresh/{name}_first_writes": jnp.mean((~written).astype(jnp.float32)),
    f"refresh/{name}_loss_on": jnp.mean((decision["weight"] > 0).astype(jnp.float32)),
    f"refresh/{name}_gap": decision["gap"],
  }
