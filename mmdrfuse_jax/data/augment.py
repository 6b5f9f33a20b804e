"""Photometric augmentation of training patches: exposure, gamma and contrast.

Off in the published recipes (`config.data.augment.enabled`). On, each patch's infrared and
visible images get their own exposure (a gain), gamma and contrast (around the patch's mean),
drawn per (seed, epoch, step, row), so a resumed run sees the same batches; or, with
`per_patch`, drawn once per (seed, patch): each patch then keeps its one transform for the
whole run, so that what depends on a patch's inputs stays valid from epoch to epoch (the
teacher's targets kept in host RAM, the refresh memories' earlier outputs of that patch).

Each transform is a monotonic map of the gray levels applied to the whole patch: every edge
and texture stays where it was in both images, so the pair stays aligned.

Geometric transforms (flips, crops) are left out on purpose: a patch's dynamic-refresh
memories hold earlier fused outputs of that patch at its place, and a flipped input would be
compared with an unflipped memory.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Photometric:
  """The ranges drawn from, each as a spread around the identity.

  Attributes:
    exposure: log2 gain spread: a gain in [2^-exposure, 2^exposure] (1: from half to twice
      as bright), clipped to [0, 1].
    gamma: log2 gamma spread: x ** g with g in [2^-gamma, 2^gamma].
    contrast: c in [1 - contrast, 1 + contrast]: mean + c (x - mean).
    per_patch: draw once per patch for the whole run, instead of per epoch, step and row.
  """

  exposure: float = 1.0
  gamma: float = 0.5
  contrast: float = 0.3
  per_patch: bool = False

  def __post_init__(self):
    for name in ("exposure", "gamma", "contrast"):
      value = getattr(self, name)
      if isinstance(value, bool) or not 0 <= float(value) <= (0.99 if name == "contrast" else 4):
        raise ValueError(f"augmentation {name} spread out of range: {value!r}")

  def draw(self, rng: np.random.Generator) -> np.ndarray:
    """One image's (gain, gamma, contrast)."""
    return np.array([np.exp2(rng.uniform(-self.exposure, self.exposure)),
                     np.exp2(rng.uniform(-self.gamma, self.gamma)),
                     rng.uniform(1 - self.contrast, 1 + self.contrast)], np.float64)

  def apply(self, images: np.ndarray, params: np.ndarray) -> np.ndarray:
    """`images` (B, H, W, 1) float32 in [0, 1], image i transformed by `params[i]`."""
    gain, gamma, contrast = (params[:, k].reshape(-1, 1, 1, 1) for k in range(3))
    x = np.clip(images * gain, 0.0, 1.0) ** gamma
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return np.clip(mean + contrast * (x - mean), 0.0, 1.0).astype(np.float32)


def augment_batch(batch: dict[str, np.ndarray], transform: Photometric, *, seed: int, epoch: int,
                  step: int, rows: np.ndarray) -> dict[str, np.ndarray]:
  """The batch with `transform` applied to `ir` and `vis`, each image drawn on its own.

  Args:
    batch: `ir`, `vis` and (for a `per_patch` transform) `patch_id`.
    rows: the global batch rows these are (a process holds some rows of a multi-process
      batch): the draws depend on (seed, epoch, step, row), or on (seed, patch) for a
      `per_patch` transform, so that every process count gives the same batch.
  """
  if transform.per_patch:
    keys = [[int(seed), int(patch), 0x7061] for patch in batch["patch_id"]]
  else:
    keys = [[int(seed), int(epoch), int(step), int(row)] for row in rows]
  out = dict(batch)
  for slot, key in enumerate(("ir", "vis")):
    params = np.stack([transform.draw(np.random.default_rng([*k, slot, 0x6175])) for k in keys])
    out[key] = transform.apply(batch[key], params)
  return out
