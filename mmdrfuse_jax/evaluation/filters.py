"""Separable 'valid' filters built from shifted slices, with a cheap reverse-mode derivative.

The metrics and the training losses filter images with small separable windows (Gaussian,
box, Prewitt). On a CPU, XLA's grouped convolution (`feature_group_count`) is slow for them:
one 11-tap pass over (25, 128, 128, 5) took longer than the rest of the SSIM formula. A sum
of shifted slices is a few fused element-wise passes instead.

JAX would differentiate the slices by padding the cotangent once per tap and adding the
pads, which costs several times the forward pass. A 'valid' correlation is linear and its
transpose is a 'full' correlation with the reversed window, so `filter_valid` states that as
its VJP: pad the cotangent, filter again (forward pass's cost).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _correlate_axis(x: Array, taps: Sequence[float], axis: int, stride: int = 1) -> Array:
  n = len(taps)
  out_len = (x.shape[axis] - n) // stride + 1
  if out_len < 1:
    raise ValueError(f"a {n}-tap window does not fit in an axis of length {x.shape[axis]}")

  def tap(k):
    return jax.lax.slice_in_dim(x, k, k + (out_len - 1) * stride + 1, stride, axis=axis)

  symmetric = all(taps[k] == taps[n - 1 - k] for k in range(n))
  acc: Optional[Array] = None
  for k in range((n + 1) // 2 if symmetric else n):
    if symmetric:
      # Add the mirrored taps first, then multiply once.
      term = tap(k) if k == n - 1 - k else tap(k) + tap(n - 1 - k)
    else:
      term = tap(k)
    if taps[k] == 0.0:
      continue
    if taps[k] != 1.0:
      term = term * np.float32(taps[k])
    acc = term if acc is None else acc + term
  if acc is None:
    return jnp.zeros_like(tap(0))
  return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _filter_axis_linear(x: Array, taps: tuple[float, ...], axis: int, stride: int) -> Array:
  return _correlate_axis(x, taps, axis, stride)


def _filter_axis_fwd(x, taps, axis, stride):
  # Only the input's length is needed for the transpose, and it is static.
  return _correlate_axis(x, taps, axis, stride), x.shape[axis]


def _filter_axis_bwd(taps, axis, stride, in_len, ct):
  n = len(taps)
  out_len = ct.shape[axis]
  # Input sample j received taps[j - i * stride] from output i: spread the outputs back to
  # their strided places (interior padding), pad by n - 1 on both sides (plus the input's
  # tail that no window reached) and correlate with the reversed window.
  tail = in_len - ((out_len - 1) * stride + n)
  config = [(0, 0, 0)] * ct.ndim
  config[axis] = (n - 1, n - 1 + tail, stride - 1)
  padded = jax.lax.pad(ct, np.array(0, ct.dtype), config)
  return (_correlate_axis(padded, tuple(reversed(taps)), axis),)


_filter_axis_linear.defvjp(_filter_axis_fwd, _filter_axis_bwd)


def filter_axis(x: Array, taps: Sequence[float], axis: int, stride: int = 1) -> Array:
  """'valid' correlation of `x` along `axis` with the 1-D window `taps`.

  Keeps every `stride`-th output: output i is sum_k taps[k] * x[i * stride + k]. Symmetric
  windows add mirrored taps before multiplying (n / 2 products instead of n). Reverse-mode
  differentiable at the forward pass's cost; forward-mode (`jax.jvp`) is not supported.
  """
  return _filter_axis_linear(x, tuple(float(t) for t in taps), axis % x.ndim, stride)


def filter_valid(x: Array, taps: Sequence[float], *, stride: int = 1,
                 taps_h: Optional[Sequence[float]] = None, axes: tuple[int, int] = (-2, -1)
                 ) -> Array:
  """'valid' 2-D correlation with the separable window outer(taps_h, taps).

  Equals scipy's `correlate2d(x, outer(taps_h, taps), 'valid')[::stride, ::stride]` on each
  2-D slice along `axes` (rows, columns). `taps_h` defaults to `taps`. Reverse-mode
  differentiable at the forward pass's cost (see the module docstring); forward-mode
  (`jax.jvp`) is not supported.

  Args:
    x: an array with at least two dimensions.
    taps: the window along the columns (`axes[1]`).
    stride: keep every `stride`-th row and column.
    taps_h: the window along the rows (`axes[0]`); default `taps`.
    axes: the (row, column) axes.

  Returns:
    The filtered array, each filtered axis of length (length - n) // stride + 1.
  """
  rows, cols = axes
  y = filter_axis(x, taps, cols, stride)
  return filter_axis(y, taps if taps_h is None else taps_h, rows, stride)
