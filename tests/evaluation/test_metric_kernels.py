"""The building blocks of the fast metrics against plain NumPy, and their grouped programs.

`test_metrics.py` checks the metrics' values; these tests check the pieces that make them
fast (filters of products, histograms shared by EN and MI, single-division formulas) against
straightforward versions, and that padding never reaches the valid region.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdrfuse_jax.evaluation import metrics


def _np_correlate_valid(x, taps, stride):
  """Naive 'valid' 2-D correlation of the last two axes with outer(taps, taps), float64."""
  n = len(taps)
  h = (x.shape[-2] - n) // stride + 1
  w = (x.shape[-1] - n) // stride + 1
  out = np.zeros(x.shape[:-2] + (h, w))
  for i in range(n):
    for j in range(n):
      out += taps[i] * taps[j] * x[..., i:i + (h - 1) * stride + 1:stride,
                                   j:j + (w - 1) * stride + 1:stride]
  return out


@pytest.mark.parametrize("taps,stride", [
    (metrics._vif_taps(1), 1),  # 17 taps: more offsets than XLA fuses
    (metrics._vif_taps(2), 2),
    ((1.0,) * 7, 1),
    (metrics._vif_taps(4), 2),
])
@pytest.mark.parametrize("factors", [1, 2])
def test_filter_valid_of_products_matches_numpy(taps, stride, factors):
  rng = np.random.default_rng(0)
  xs = [rng.integers(0, 256, (2, 45, 38)).astype(np.float32) for _ in range(factors)]
  got = jax.jit(lambda *xs: metrics._filter_valid(list(xs), taps, stride))(*xs)
  want = _np_correlate_valid(np.prod([x.astype(np.float64) for x in xs], axis=0), taps, stride)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-3)


def test_joint_histogram_matches_histogram2d():
  rng = np.random.default_rng(1)
  f = rng.integers(0, 256, (30, 40)).astype(np.float32)
  a = rng.normal(128, 80, (30, 40)).astype(np.float32)  # out of range: clipped
  h, w = 21, 33
  mask = metrics._mask(f.shape, h, w)
  got = metrics._joint_histogram(metrics._histogram_levels(f), a, mask)
  levels = np.clip(np.round(a[:h, :w]), 0, 255)
  want, _, _ = np.histogram2d(f[:h, :w].ravel(), levels.ravel(), bins=256,
                              range=[[-0.5, 255.5], [-0.5, 255.5]])
  np.testing.assert_array_equal(got, want)


def test_en_and_mi_together_equal_each_alone():
  rng = np.random.default_rng(2)
  f, a, b = (rng.integers(0, 256, (48, 44)).astype(np.float32) for _ in range(3))
  size = np.array([40, 37], np.int32)
  both = metrics.all_metrics(f, a, b, size, names=("EN", "MI"))
  assert float(both["EN"]) == float(metrics.en(f, size=size))
  assert float(both["MI"]) == float(metrics.mi(f, a, b, size=size))


def test_vif_terms_follow_the_published_rules_in_order():
  """The single-division terms equal the published sequence of rules (log10 there)."""
  rng = np.random.default_rng(3)
  shape = (4000,)
  # Means and raw moments that hit every rule: flat windows (variance 0), negative
  # covariances, tiny variances.
  mu1 = rng.uniform(0, 255, shape).astype(np.float32)
  mu2 = rng.uniform(0, 255, shape).astype(np.float32)
  s1 = rng.choice([0.0, 1e-12, 3.0, 500.0], shape) * rng.uniform(0.5, 1.5, shape)
  s2 = rng.choice([0.0, 1e-12, 3.0, 500.0], shape) * rng.uniform(0.5, 1.5, shape)
  s12 = rng.uniform(-1, 1, shape) * np.sqrt(s1 * s2) * 1.2
  e11, e22 = (mu1 * mu1 + s1).astype(np.float32), (mu2 * mu2 + s2).astype(np.float32)
  e12 = (mu1 * mu2 + s12).astype(np.float32)
  num, den = metrics._vif_terms(*(jnp.asarray(x) for x in (mu1, mu2, e11, e22, e12)))

  eps, nsq = metrics._VIF_EPS, metrics._VIF_SIGMA_NSQ
  v1 = jnp.maximum(e11 - mu1 * mu1, 0.0)
  v2 = jnp.maximum(e22 - mu2 * mu2, 0.0)
  v12 = e12 - mu1 * mu2
  g = v12 / (v1 + eps)
  sv = v2 - g * v12
  g = jnp.where(v1 < eps, 0.0, g)
  sv = jnp.where(v1 < eps, v2, sv)
  v1 = jnp.where(v1 < eps, 0.0, v1)
  g = jnp.where(v2 < eps, 0.0, g)
  sv = jnp.where(v2 < eps, 0.0, sv)
  sv = jnp.where(g < 0, v2, sv)
  g = jnp.where(g < 0, 0.0, g)
  sv = jnp.maximum(sv, eps)
  want_num = jnp.log10(1.0 + g * g * v1 / (sv + nsq))
  want_den = jnp.log10(1.0 + v1 / nsq)
  np.testing.assert_allclose(num / math.log(10), want_num, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(den / math.log(10), want_den, rtol=1e-6, atol=1e-12)


def test_arctan_of_a_ratio():
  rng = np.random.default_rng(4)
  y = np.concatenate([rng.normal(0, 100, 5000), np.zeros(10), [1e-3, -1e-3, 1e4, -1e4]])
  x = np.concatenate([rng.normal(0, 100, 5000), rng.normal(0, 1, 10), [1e4, 1e4, -1e-3, 1e-3]])
  y, x = y.astype(np.float32), x.astype(np.float32)
  got = metrics._arctan_ratio(jnp.asarray(y), jnp.asarray(x))
  np.testing.assert_allclose(got, np.arctan(y.astype(np.float64) / x), rtol=0, atol=3e-7)


def test_qabf_ratio_with_one_division_is_bitwise_the_published_one():
  rng = np.random.default_rng(5)
  g_x = jnp.asarray(rng.choice([0.0, 1.0, 7.5, 300.0], 2000) * rng.uniform(0, 2, 2000),
                    jnp.float32)
  g_f = jnp.asarray(np.where(rng.random(2000) < 0.2, g_x, rng.uniform(0, 600, 2000)),
                    jnp.float32)
  alpha = jnp.zeros_like(g_x)

  def published(g_x, g_f):
    ratio = jnp.where(g_x > g_f, g_f / jnp.where(g_x > g_f, g_x, 1.0),
                      jnp.where(g_x == g_f, g_f, g_x / jnp.where(g_x < g_f, g_f, 1.0)))
    q_g = 0.9994 / (1.0 + jnp.exp(-15.0 * (ratio - 0.5)))
    q_a = 0.9879 / (1.0 + jnp.exp(-22.0 * (1.0 - 0.8)))  # equal orientations
    return q_g * q_a

  got = jax.jit(metrics._qabf_q)(g_x, alpha, g_f, alpha)
  np.testing.assert_array_equal(got, jax.jit(published)(g_x, g_f))


def test_padding_never_reaches_the_valid_region():
  """NaN padding (which any read would spread) scores as the crop does."""
  rng = np.random.default_rng(6)
  h, w = 50, 46
  crop = [rng.integers(0, 256, (h, w)).astype(np.float32) for _ in range(3)]
  canvas = [np.full((h + 7, w + 10), np.nan, np.float32) for _ in range(3)]
  for c, x in zip(canvas, crop):
    c[:h, :w] = x
  size = np.array([h, w], np.int32)
  padded = metrics.all_metrics(*canvas, size, names=metrics.ALL_NAMES)
  exact = metrics.all_metrics(*crop, size, names=metrics.ALL_NAMES)
  for name in metrics.ALL_NAMES:
    assert float(padded[name]) == pytest.approx(float(exact[name]), rel=2e-5, abs=1e-6), name


def test_large_batches_run_image_by_image(monkeypatch):
  """Both ways of scoring a batch (vmapped, image by image) give the single images' values."""
  rng = np.random.default_rng(7)
  f, a, b = (rng.integers(0, 256, (3, 48, 52)).astype(np.float32) for _ in range(3))
  sizes = np.array([[48, 52], [45, 41], [48, 50]], np.int32)
  vmapped = metrics.all_metrics(f, a, b, sizes, names=metrics.ALL_NAMES)
  monkeypatch.setattr(metrics, "_LOOP_PIXELS", 1)
  looped = metrics.all_metrics(f, a, b, sizes, names=metrics.ALL_NAMES)
  for i in range(3):
    single = metrics.all_metrics(f[i], a[i], b[i], sizes[i], names=metrics.ALL_NAMES)
    for name in metrics.ALL_NAMES:
      assert float(looped[name][i]) == float(single[name]), name
      assert float(vmapped[name][i]) == pytest.approx(float(single[name]), rel=2e-5,
                                                      abs=1e-6), name
