"""Photometric augmentation (data/augment.py): off by default, resumable, pairs kept aligned."""

import numpy as np
import pytest

from mmdrfuse_jax.data import augment, pipeline


def _dataset(augmentation=None):
  rng = np.random.default_rng(0)
  ir = rng.integers(0, 256, (4, 32, 32), dtype=np.uint8)
  vis = rng.integers(0, 256, (4, 32, 32), dtype=np.uint8)
  data = pipeline.PatchDataset.from_arrays(ir, vis, patch_size=16, patch_stride=16)
  data.augmentation = augmentation
  return data


def _batches(data, **kwargs):
  return [b for b, _ in data.iterate(batch_size=4, seed=3, num_epochs=2, **kwargs)]


def test_off_leaves_batches_as_they_were():
  plain = _batches(_dataset())
  for batch in plain:
    ids = batch["patch_id"]
    np.testing.assert_array_equal(batch["ir"], _dataset().patches(ids)["ir"])


def test_on_is_deterministic_resumable_and_keeps_pairs_aligned():
  transform = augment.Photometric()
  data = _dataset(transform)
  first = _batches(data)
  again = _batches(_dataset(transform))
  for a, b in zip(first, again):
    for key in ("ir", "vis", "patch_id"):
      np.testing.assert_array_equal(a[key], b[key])
  # Resumed after 3 batches: the same later batches.
  states = [s for _, s in data.iterate(batch_size=4, seed=3, num_epochs=2)]
  resumed = [b for b, _ in data.iterate(batch_size=4, seed=3, num_epochs=2,
                                        start_state=states[2])]
  for a, b in zip(first[3:], resumed):
    np.testing.assert_array_equal(a["ir"], b["ir"])
  plain = _dataset()
  changed = 0
  for batch in first:
    raw = plain.patches(batch["patch_id"])
    for key in ("ir", "vis"):
      got, was = batch[key], raw[key]
      assert got.dtype == np.float32 and got.min() >= 0 and got.max() <= 1
      changed += int(np.abs(got - was).max() > 0.01)
      # Monotonic per image: a brighter pixel never becomes darker than a dimmer one, so every
      # edge stays where it was (in both images of the pair: the pair stays aligned).
      for g, w in zip(got[..., 0], was[..., 0]):
        order = np.argsort(w.ravel(), kind="stable")
        assert np.all(np.diff(g.ravel()[order]) >= -1e-6)
  assert changed == 2 * len(first)  # every image transformed
  # The draws depend on the global row, not on how many rows this process holds.
  rows = augment.augment_batch(first[0] | plain.patches(first[0]["patch_id"]), transform,
                               seed=3, epoch=0, step=0, rows=np.arange(4))
  part = augment.augment_batch({k: v[2:] for k, v in plain.patches(first[0]["patch_id"]).items()},
                               transform, seed=3, epoch=0, step=0, rows=np.arange(2, 4))
  np.testing.assert_array_equal(rows["ir"][2:], part["ir"])


def test_per_patch_draws_keep_each_patch_one_transform_for_the_run():
  transform = augment.Photometric(per_patch=True)
  batches = _batches(_dataset(transform))  # Two epochs of the 4 patches, shuffled.
  seen = {}
  for batch in batches:
    for row, patch in enumerate(batch["patch_id"]):
      images = (batch["ir"][row].tobytes(), batch["vis"][row].tobytes())
      assert seen.setdefault(int(patch), images) == images  # The same in both epochs.
  assert len(seen) == 16 and len(set(seen.values())) == 16  # 4 images of 4 patches.
  # Not the identity, and not the per-step draws of the same patches.
  plain, per_step = _dataset(), _batches(_dataset(augment.Photometric()))
  for batch in batches:
    assert np.abs(batch["ir"] - plain.patches(batch["patch_id"])["ir"]).max() > 0.01
  assert any(not np.array_equal(a["ir"], b["ir"]) for a, b in zip(batches, per_step))
  # Another seed, other draws.
  other = [b for b, _ in _dataset(transform).iterate(batch_size=4, seed=4, num_epochs=1)]
  assert all(other[0]["ir"][r].tobytes() != seen[int(p)][0]
             for r, p in enumerate(other[0]["patch_id"]))


def test_ranges_are_checked():
  with pytest.raises(ValueError, match="contrast"):
    augment.Photometric(contrast=1.5)
  with pytest.raises(ValueError, match="exposure"):
    augment.Photometric(exposure=-1)


def test_the_config_turns_it_on():
  from mmdrfuse_jax.configs import default
  from mmdrfuse_jax.train import loop, run_settings

  config = default.get_config("student")
  config.data.synthetic_pairs, config.data.synthetic_height = 2, 64
  config.data.synthetic_width = 64
  assert loop.load_dataset(config).augmentation is None
  config.data.augment.enabled = True
  assert loop.load_dataset(config).augmentation == augment.Photometric(1.0, 0.5, 0.3)
  config.data.augment.contrast = 2.0
  with pytest.raises(run_settings.ConfigError, match="config.data.augment"):
    loop.load_dataset(config)
