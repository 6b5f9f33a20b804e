"""The separable slice filters against NumPy, and their hand-written VJP against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdrfuse_jax.evaluation import filters


def _np_correlate_valid(x, window, stride):
  """Naive 'valid' 2-D correlation of the last two axes of `x`, float64."""
  kh, kw = window.shape
  h = (x.shape[-2] - kh) // stride + 1
  w = (x.shape[-1] - kw) // stride + 1
  out = np.zeros(x.shape[:-2] + (h, w))
  for i in range(kh):
    for j in range(kw):
      out += window[i, j] * x[..., i:i + (h - 1) * stride + 1:stride,
                              j:j + (w - 1) * stride + 1:stride]
  return out


CASES = [  # (taps, taps_h, stride): symmetric, antisymmetric with a zero tap, box, strided.
    ((0.25, 0.5, 0.25), None, 1),
    ((1 / 3, 0.0, -1 / 3), (1.0, 1.0, 1.0), 1),
    ((1.0,) * 7, None, 1),
    ((0.5, 0.5), None, 2),
    ((0.1, 0.2, 0.4, 0.2, 0.1), (0.3, 0.7), 3),
]


@pytest.mark.parametrize("taps,taps_h,stride", CASES)
def test_filter_valid_matches_numpy(taps, taps_h, stride):
  x = np.random.default_rng(0).normal(size=(2, 3, 23, 20)).astype(np.float32)
  window = np.outer(taps if taps_h is None else taps_h, taps)
  got = filters.filter_valid(jnp.asarray(x), taps, taps_h=taps_h, stride=stride)
  np.testing.assert_allclose(got, _np_correlate_valid(x.astype(np.float64), window, stride),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("taps,taps_h,stride", CASES)
def test_vjp_is_the_transpose(taps, taps_h, stride):
  """The hand-written VJP equals autodiff of a plain 2-D convolution of the same window."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 23, 20, 3))
  window = jnp.asarray(np.outer(taps if taps_h is None else taps_h, taps), jnp.float32)

  def by_conv(v):
    k = jnp.broadcast_to(window[:, :, None, None], window.shape + (1, 3))
    return jax.lax.conv_general_dilated(
        v, k, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=3, precision=jax.lax.Precision.HIGHEST)

  def by_slices(v):
    return filters.filter_valid(v, taps, taps_h=taps_h, stride=stride, axes=(1, 2))

  out, vjp = jax.vjp(by_slices, x)
  want_out, want_vjp = jax.vjp(by_conv, x)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  ct = jax.random.normal(jax.random.PRNGKey(2), out.shape)
  np.testing.assert_allclose(vjp(ct)[0], want_vjp(ct)[0], rtol=1e-5, atol=1e-5)
  # Under jit and inside a larger function too.
  grad = jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(by_slices(v)))))(x)
  want = jax.grad(lambda v: jnp.sum(jnp.sin(by_conv(v))))(x)
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)


def test_window_larger_than_the_axis_is_refused():
  with pytest.raises(ValueError, match="does not fit"):
    filters.filter_valid(jnp.zeros((4, 4)), (1.0,) * 5)
