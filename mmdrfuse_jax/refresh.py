"""Dynamic refresh (SPEC section 4) as pure functions for the jitted train step.

Two per-sample memories over the whole training set, `best_ssim` and `best_gmsd`, each hold one
earlier fused output per training patch, indexed by the data pipeline's dense `patch_id`. They
live on the device inside the train state (replicated across data-parallel devices), so the
refresh decisions never leave the device.

Storage (`memory_dtype`):
  * "bfloat16" (default): the tanh output as bfloat16; an unwritten slot holds NaN.
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
from typing import Any

import flax
import jax
import jax.numpy as jnp

MEMORY_DTYPES = ("bfloat16", "float32", "uint8")
_UINT8_LEVELS = 254  # Codes 0..254 hold values; 255 marks an unwritten slot.
_UINT8_EMPTY = 255


@dataclasses.dataclass(frozen=True)
class RefreshConfig:
  """Static refresh settings (hashable: they select code paths at trace time).

  Attributes:
    ssim: keep the SSIM memory and its refresh loss.
    gmsd: keep the GMSD memory and its refresh loss.
    per_sample: per-sample decisions instead of the published one decision per batch.
    memory_dtype: "bfloat16", "float32" or "uint8" (see the module docstring).
    weight_scale: the factor 10 in the refresh loss weights `10 * gap`.
  """

  ssim: bool = True
  gmsd: bool = True
  per_sample: bool = False
  memory_dtype: str = "bfloat16"
  weight_scale: float = 10.0

  def __post_init__(self):
    if self.memory_dtype not in MEMORY_DTYPES:
      raise ValueError(f"refresh memory_dtype must be one of {MEMORY_DTYPES}, got {self.memory_dtype!r}")

  @classmethod
  def from_config(cls, cfg: Any) -> "RefreshConfig":
    """From an ml_collections `config.refresh` (or any object with those attributes)."""
    return cls(
      ssim=bool(cfg.ssim),
      gmsd=bool(cfg.gmsd),
      per_sample=bool(cfg.per_sample),
      memory_dtype=str(cfg.memory_dtype),
      weight_scale=float(cfg.weight_scale),
    )


@flax.struct.dataclass
class Memory:
  """The two refresh memories, (N, H, W, 1) each in the storage dtype; None when that loss is off."""

  best_ssim: jax.Array | None
  best_gmsd: jax.Array | None


def _storage_dtype(memory_dtype: str):
  return {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "uint8": jnp.uint8}[memory_dtype]


def bytes_per_sample(config: RefreshConfig, height: int = 128, width: int = 128) -> int:
  """Device bytes the refresh memories take per training patch (published: 262,144)."""
  itemsize = jnp.dtype(_storage_dtype(config.memory_dtype)).itemsize
  return (int(config.ssim) + int(config.gmsd)) * height * width * itemsize


def init_memory(num_patches: int, height: int, width: int, config: RefreshConfig) -> Memory:
  """Empty memories: every slot unwritten."""
  dtype = _storage_dtype(config.memory_dtype)
  fill = _UINT8_EMPTY if config.memory_dtype == "uint8" else jnp.nan

  def make(enabled):
    return jnp.full((num_patches, height, width, 1), fill, dtype) if enabled else None

  return Memory(best_ssim=make(config.ssim), best_gmsd=make(config.gmsd))


def encode(x: jax.Array, memory_dtype: str) -> jax.Array:
  """Fused outputs (tanh, in [-1, 1]) to the storage dtype."""
  if memory_dtype == "uint8":
    q = jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * (_UINT8_LEVELS / 2.0))
    return q.astype(jnp.uint8)
  return x.astype(_storage_dtype(memory_dtype))


def decode(stored: jax.Array, memory_dtype: str) -> tuple[jax.Array, jax.Array]:
  """Stored slots (B, H, W, 1) to float32 images and a (B,) written flag.

  Unwritten slots decode to zeros (never NaN), so that masked-out terms cannot leak NaN into
  gradients through `jnp.where`.
  """
  if memory_dtype == "uint8":
    written = stored[:, 0, 0, 0] != _UINT8_EMPTY
    x = stored.astype(jnp.float32) * (2.0 / _UINT8_LEVELS) - 1.0
  else:
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


def gather(memory: jax.Array, ids: jax.Array, memory_dtype: str) -> tuple[jax.Array, jax.Array]:
  """Decoded memory images and written flags for the batch's patch ids."""
  return decode(memory[ids], memory_dtype)


def scatter(memory: jax.Array, ids: jax.Array, out: jax.Array, replace: jax.Array,
            memory_dtype: str) -> jax.Array:
  """Writes `out` into the slots `ids` where `replace`, leaving the other slots as they were."""
  old = memory[ids]
  new = jnp.where(replace[:, None, None, None], encode(jax.lax.stop_gradient(out), memory_dtype), old)
  return memory.at[ids].set(new, unique_indices=True)


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
