"""The collapse diagnostics against hand-computed values: the floor share and dead units."""

import math
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from mmdrfuse_jax.evaluation import diagnostics, metrics


def test_floor_share_by_hand():
  ir = np.array([[0, 0, 50, 50],
                 [0, 0, 50, 50]], np.float32)
  vis = np.array([[0, 1, 0, 0],
                  [0, 30, 0, 0]], np.float32)
  fused = np.array([[0, 0, 0, 9],
                    [5, 0, 0, 9]], np.float32)
  # Signal (a source > 2 levels above its minimum): (1,1) from vis and the 4 right pixels from
  # ir; (0,1) holds 1 level, no signal. F's minimum 0 at (0,0), (0,1), (1,1), (0,2), (1,2):
  # 3 of the 5 pixels with signal are at the floor.
  assert float(metrics.floor_share(fused, ir, vis)) == pytest.approx(3 / 5)
  assert float(metrics.floor_share(fused + 7, ir + 3, vis)) == pytest.approx(3 / 5)
  # Only the valid region of a padded canvas counts: the top-left 2x2 holds (1,1) alone.
  assert float(metrics.floor_share(fused, ir, vis, size=(2, 2))) == 1.0
  assert math.isnan(float(metrics.floor_share(fused, np.zeros_like(ir), np.ones_like(vis))))
  assert float(metrics.floor_share(ir + vis, ir, vis)) == 0.0  # nothing collapsed


def test_floor_share_through_all_metrics_and_lower_is_better():
  rng = np.random.default_rng(0)
  a, b = (rng.integers(0, 256, (48, 48)).astype(np.float32) for _ in range(2))
  f = np.where(a < 128, 0.0, a).astype(np.float32)  # dark half collapsed
  got = metrics.all_metrics(np.stack([f, a]), np.stack([a, a]), np.stack([b, b]),
                            names=("Floor",))["Floor"]
  assert got.shape == (2,) and 0.4 < float(got[0]) < 0.6 and float(got[1]) < 0.01
  assert "Floor" in metrics.LOWER_IS_BETTER and "Floor" not in metrics.METRIC_NAMES


def _student(bias):
  kernel = np.zeros((3, 3, 2, 4), np.float32)
  kernel[1, 1, 0, :] = 1.0  # each feature: the centre infrared pixel plus its bias
  return {"conv1": {"kernel": kernel, "bias": np.asarray(bias, np.float32)},
          "conv2": {"kernel": np.ones((3, 3, 4, 1), np.float32), "bias": np.zeros(1, np.float32)}}


def test_dead_units_by_hand():
  ir = np.zeros((1, 4, 6, 1), np.float32)
  ir[0, :, 3:] = 0.8  # right half bright
  vis = np.zeros_like(ir)
  # Biases -0.5: a feature lives where ir > 0.5, so the dark left half (12 of 24 pixels) is dead.
  dead = diagnostics.dead_unit_map(_student([-0.5] * 4), ir, vis)
  np.testing.assert_array_equal(np.asarray(dead)[0], np.tile([1, 1, 1, 0, 0, 0], (4, 1)))
  assert float(diagnostics.dead_unit_share(_student([-0.5] * 4), ir, vis)) == 0.5
  # One unit with a positive bias lives everywhere: nothing is dead.
  assert float(diagnostics.dead_unit_share(_student([-0.5, -1, -1, 0.1]), ir, vis)) == 0.0
  assert float(diagnostics.dead_unit_share(_student([-1.0] * 4), ir, vis)) == 1.0
  with pytest.raises(ValueError, match="student"):
    diagnostics.dead_unit_share({"conv00": {}, **{f"c{i}": {} for i in range(12)}},
                                jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 4, 4, 1)))


def test_the_shipped_student_sees_in_the_dark():
  """weights/student.npz keeps its conv1 units on in dark scenes (docs/domains.md): on
  procedural pairs dimmed to 15% no pixel is dead. The student shipped before it, trained on
  RoadScene's daytime pairs alone (weights/student_roadscene.npz), is dead on every one."""
  from mmdrfuse_jax.data import synthetic
  from mmdrfuse_jax.models import weight_files

  ir, vis = synthetic.make_pairs(4, 128, 128, seed=0)
  dim = [np.asarray(x, np.float32)[..., None] / 255 * 0.15 for x in (ir, vis)]
  weights = pathlib.Path(__file__).resolve().parents[2] / "weights"
  shipped = weight_files.load_params(weights / "student.npz", "student")
  before = weight_files.load_params(weights / "student_roadscene.npz", "student")
  assert float(diagnostics.dead_unit_share(shipped, *dim)) < 0.01
  assert float(diagnostics.dead_unit_share(before, *dim)) > 0.99
