"""The validation split held out of the training pairs (data/holdout.py): stable, disjoint."""

import numpy as np
import pytest

from mmdrfuse_jax.data import holdout, pipeline


def test_the_choice_is_stable_and_depends_on_the_stem_alone():
  stems = [f"{i:05d}" for i in range(4000)]
  chosen = holdout.held_out(stems, 0.1)
  assert 300 < len(chosen) < 500  # about a tenth
  # The same stems, shuffled and among others, are chosen alike.
  shuffled = list(reversed(stems)) + ["extra_a", "extra_b"]
  again = {shuffled[i] for i in holdout.held_out(shuffled, 0.1)}
  before = {stems[i] for i in chosen}
  assert before <= again <= before | {"extra_a", "extra_b"}
  # A larger fraction keeps every pair a smaller one held out.
  assert set(chosen) <= set(holdout.held_out(stems, 0.2))
  assert holdout.held_out(stems, 0.0) == []
  # Pinned: the hash (and so every split ever made) must not change between versions.
  assert holdout.hash_unit("00000") == pytest.approx(0.5667546, abs=1e-6)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 2, True])
def test_fractions_outside_0_1_are_refused(fraction):
  with pytest.raises(ValueError, match=r"in \[0, 1\)"):
    holdout.held_out(["a"], fraction)


def test_excluded_images_give_no_patch():
  rng = np.random.default_rng(0)
  ir = rng.integers(0, 256, (6, 32, 32), dtype=np.uint8)
  vis = rng.integers(0, 256, (6, 32, 32), dtype=np.uint8)
  stems = [f"pair{i}" for i in range(6)]
  data = pipeline.PatchDataset.from_arrays(ir, vis, stems=stems, patch_size=16, patch_stride=16)
  assert data.num_patches == 24
  out = holdout.held_out(stems, 0.5)
  assert 0 < len(out) < 6
  data.exclude_images(out)
  assert data.num_patches == 4 * (6 - len(out))
  assert not set(data.patch_image.tolist()) & set(out)
  seen = set()
  for batch, _ in data.iterate(batch_size=2, seed=0, num_epochs=1):
    for patch in np.asarray(batch["patch_id"]).tolist():
      seen.add(int(data.patch_image[patch]))
  assert seen == set(range(6)) - set(out)


def test_check_config_refuses_a_bad_holdout():
  from mmdrfuse_jax.configs import default
  from mmdrfuse_jax.train import run_settings

  config = default.get_config("student")
  for bad in (1.0, -0.5, float("nan")):
    config.data.holdout = bad
    with pytest.raises(run_settings.ConfigError, match="config.data.holdout"):
      run_settings.check_config(config)
