"""Image fusion quality metrics, as the published tables compute them (SPEC section 6).

Every metric is a pure JAX function of float images on 0..255: `fused` (F), `ir` (A, the
infrared / PET / SPECT image) and `vis` (B, the visible / MRI image), each (H, W). They jit
and vmap over batches of same-sized images.

Padded images: every metric takes an optional `size=(h, w)` (a traced int array is fine) and
then scores only the top-left h x w pixels of larger arrays, exactly as if the images had
been cropped. This lets one compiled function score images of many sizes (pad to a common
bucket shape, pass each image's size), which is what `mmdrfuse_jax.evaluation.scoring` does.

Gradients: SD, SF, AG, SCD, CC, MSE, PSNR, VIF, Qabf and SSIM are differentiable in the
fused image (`jax.grad` gives finite, non-zero gradients: usable as training losses). EN and
MI count gray levels in histograms, and Floor counts pixels, so their gradient is zero
everywhere: they score, they do not train. `DIFFERENTIABLE` lists the first group.

Precision: float32 throughout, within 1e-4 relative of the float64 reference evaluator on
the golden sets. Gray values of 8-bit images are integers, so histograms are exact; SSIM's
local variances are computed from window sums with a single rounding (flat windows give
exactly zero variance instead of float32 noise comparable to SSIM's tiny constants).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmdrfuse_jax.evaluation import filters

Array = jax.Array

METRIC_NAMES = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "CC", "PSNR")
"""The metrics of the published tables, in the project's column order."""

ALL_NAMES = METRIC_NAMES + ("MSE", "Floor")
"""Every metric `all_metrics` computes: the published ones, MSE and the floor share."""

LOWER_IS_BETTER = frozenset({"MSE", "Floor"})
"""The metrics where lower is better (an error and a share of collapsed pixels)."""

FLOOR_SIGNAL = 2.0
"""Gray levels (of 255) above its own minimum at which a source has signal at a pixel."""

DIFFERENTIABLE = ("SD", "SF", "AG", "SCD", "VIF", "Qabf", "SSIM", "CC", "PSNR", "MSE")
"""The metrics with useful gradients in the fused image (EN, MI and Floor count pixels)."""

MIN_SIZE = 41
"""Smallest height and width VIF's four scales (17x17 window, then halvings) are defined for."""


# ---------------------------------------------------------------------------------------------
# Helpers: sizes, masks, masked reductions.


def _size(x: Array, size) -> Array:
  """The valid (h, w) of `x` as an int32 array (the full shape when `size` is None)."""
  if size is None:
    return jnp.asarray(x.shape[-2:], jnp.int32)
  return jnp.asarray(size, jnp.int32)


def _mask(shape: Sequence[int], h: Array, w: Array) -> Array:
  """True on the top-left h x w pixels of a (H, W) array."""
  rows = jnp.arange(shape[0], dtype=jnp.int32)[:, None] < h
  cols = jnp.arange(shape[1], dtype=jnp.int32)[None, :] < w
  return rows & cols


def _sum(x: Array, mask: Optional[Array] = None) -> Array:
  """Sum over the last two axes (where `mask`), by rows then over rows (blocked, for float32)."""
  if mask is not None:
    x = jnp.where(mask, x, 0.0)
  # Matrix-vector products instead of jnp.sum: XLA's CPU reduction loops are slower than a
  # dot when a long elementwise chain is fused into them.
  ones_w = jnp.ones((x.shape[-1],), x.dtype)
  ones_h = jnp.ones((x.shape[-2],), x.dtype)
  return jnp.dot(jnp.dot(x, ones_w, precision="highest"), ones_h, precision="highest")


def _mean(x: Array, mask: Array, count: Array) -> Array:
  return _sum(x, mask) / count


def _count(h: Array, w: Array) -> Array:
  return (h * w).astype(jnp.float32)


def _prepare(x: Array, mask: Array) -> Array:
  """float32 with zeros outside the valid region (the zero padding of Qabf relies on it)."""
  return jnp.where(mask, jnp.asarray(x, jnp.float32), 0.0)


def _corr(x: Array, y: Array, mask: Array, count: Array) -> Array:
  """Pearson correlation of two images over the valid region."""
  dx = jnp.where(mask, x - _mean(x, mask, count), 0.0)
  dy = jnp.where(mask, y - _mean(y, mask, count), 0.0)
  return _sum(dx * dy) / jnp.sqrt(_sum(dx * dx) * _sum(dy * dy))


# ---------------------------------------------------------------------------------------------
# Separable 'valid' filters.


def _filter_valid(x: Array, taps: Sequence[float], stride: int = 1) -> Array:
  """'valid' 2-D correlation with the separable window outer(taps, taps).

  Equals scipy's `convolve2d(x, rot90(outer(taps, taps), 2), 'valid')[::stride, ::stride]`.
  Both passes run along the contiguous axis with a transpose in between: the transpose
  makes XLA materialise the first pass, which it would otherwise fuse into the second and
  recompute for every tap (N^2 instead of 2N operations per pixel; optimization_barrier
  does not prevent that fusion on CPU).
  """
  def one(m):
    y = filters.filter_axis(m, taps, m.ndim - 1, stride)
    y = filters.filter_axis(jnp.swapaxes(y, -1, -2), taps, m.ndim - 1, stride)
    return jnp.swapaxes(y, -1, -2)

  if x.ndim == 2:
    return one(x)
  # A loop over the stacked maps: loop outputs are materialised, so XLA cannot fuse the
  # second pass into each of the (several) elementwise consumers and recompute it there.
  return jax.lax.map(one, x)


# ---------------------------------------------------------------------------------------------
# Single-image metrics.


def _histogram_levels(x: Array) -> Array:
  """Integer gray levels 0..255 of an image on 0..255 (rounded, clipped)."""
  return jnp.clip(jnp.round(x), 0, 255).astype(jnp.int32)


def en(fused: Array, *, size=None) -> Array:
  """EN: Shannon entropy in bits of the 256-bin histogram of F (levels rounded to integers)."""
  h, w = _size(fused, size)
  mask = _mask(fused.shape, h, w)
  levels = jnp.where(mask, _histogram_levels(fused), 256).reshape(-1)
  hist = jnp.zeros(257, jnp.float32).at[levels].add(1.0)[:256]
  p = hist / _count(h, w)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0))


def sd(fused: Array, *, size=None) -> Array:
  """SD: population standard deviation of F."""
  h, w = _size(fused, size)
  mask = _mask(fused.shape, h, w)
  count = _count(h, w)
  f = jnp.asarray(fused, jnp.float32)
  d = jnp.where(mask, f - _mean(f, mask, count), 0.0)
  return jnp.sqrt(_sum(d * d) / count)


def sf(fused: Array, *, size=None) -> Array:
  """SF: sqrt(mean of squared horizontal differences + mean of squared vertical ones)."""
  h, w = _size(fused, size)
  f = jnp.asarray(fused, jnp.float32)
  dx = f[:, 1:] - f[:, :-1]
  dy = f[1:, :] - f[:-1, :]
  mx = _mask(dx.shape, h, w - 1)
  my = _mask(dy.shape, h - 1, w)
  return jnp.sqrt(_sum(dx * dx, mx) / _count(h, w - 1) + _sum(dy * dy, my) / _count(h - 1, w))


def _gradient(f: Array, n: Array, axis: int) -> Array:
  """np.gradient along `axis` of an image whose valid length there is `n` (dynamic)."""
  length = f.shape[axis]
  nxt = jnp.concatenate([jax.lax.slice_in_dim(f, 1, length, axis=axis),
                         jax.lax.slice_in_dim(f, length - 1, length, axis=axis)], axis=axis)
  prv = jnp.concatenate([jax.lax.slice_in_dim(f, 0, 1, axis=axis),
                         jax.lax.slice_in_dim(f, 0, length - 1, axis=axis)], axis=axis)
  shape = [1, 1]
  shape[axis] = length
  idx = jnp.arange(length, dtype=jnp.int32).reshape(shape)
  central = (nxt - prv) * np.float32(0.5)
  return jnp.where(idx == 0, nxt - f, jnp.where(idx == n - 1, f - prv, central))


def ag(fused: Array, *, size=None) -> Array:
  """AG: mean of sqrt((Gx^2 + Gy^2) / 2), np.gradient differences (one-sided at borders)."""
  h, w = _size(fused, size)
  mask = _mask(fused.shape, h, w)
  f = jnp.asarray(fused, jnp.float32)
  gy = _gradient(f, h, 0)
  gx = _gradient(f, w, 1)
  return _mean(jnp.sqrt((gx * gx + gy * gy) * np.float32(0.5)), mask, _count(h, w))


# ---------------------------------------------------------------------------------------------
# Metrics of the fused image against both sources.


def _joint_histograms(fused: Array, ir: Array, vis: Array, mask: Array) -> tuple[Array, Array]:
  """256x256 joint histograms (F, A) and (F, B), as float32 counts (exact below 2^24)."""
  lf = _histogram_levels(fused)
  la = _histogram_levels(ir)
  lb = _histogram_levels(vis)
  dump = 2 * 65536  # masked-out pixels land in a bin that is dropped
  idx_a = jnp.where(mask, lf * 256 + la, dump).reshape(-1)
  idx_b = jnp.where(mask, 65536 + lf * 256 + lb, dump).reshape(-1)
  hist = jnp.zeros(dump + 1, jnp.float32).at[jnp.concatenate([idx_a, idx_b])].add(1.0)
  return hist[:65536].reshape(256, 256), hist[65536:dump].reshape(256, 256)


def _mutual_information(joint: Array, count: Array) -> Array:
  """Discrete mutual information (nats) of a joint histogram of `count` pixels."""
  row = jnp.sum(joint, axis=1, keepdims=True)
  col = jnp.sum(joint, axis=0, keepdims=True)
  nz = joint > 0
  safe = jnp.where(nz, joint, 1.0)
  # log(n_ij * n / (n_i * n_j)), with each factor's log taken separately to stay in range.
  logs = (jnp.log(safe) + jnp.log(count) - jnp.log(jnp.where(nz, row, 1.0))
          - jnp.log(jnp.where(nz, col, 1.0)))
  return _sum(jnp.where(nz, safe * logs, 0.0)) / count


def mi(fused: Array, ir: Array, vis: Array, *, size=None, base: Optional[float] = None) -> Array:
  """MI: MI(F,A) + MI(F,B) of 256-level joint histograms, in nats (log base `base`, default e)."""
  h, w = _size(fused, size)
  mask = _mask(fused.shape, h, w)
  ja, jb = _joint_histograms(fused, ir, vis, mask)
  count = _count(h, w)
  total = _mutual_information(ja, count) + _mutual_information(jb, count)
  return total if base is None else total / np.float32(math.log(base))


def scd(fused: Array, ir: Array, vis: Array, *, size=None) -> Array:
  """SCD: corr(A, F - B) + corr(B, F - A), Pearson correlations."""
  h, w = _size(fused, size)
  mask = _mask(fused.shape, h, w)
  count = _count(h, w)
  f, a, b = (jnp.asarray(x, jnp.float32) for x in (fused, ir, vis))
  return _corr(a, f - b, mask, count) + _corr(b, f - a, mask, count)


def cc(fused: Array, ir: Array, vis: Array, *, size=None) -> Array:
  """CC: (corr(A, F) + corr(B, F)) / 2, Pearson correlations."""
  h, w = _size(fused, size)
  mask = _mask(fused.shape, h, w)
  count = _count(h, w)
  f, a, b = (jnp.asarray(x, jnp.float32) for x in (fused, ir, vis))
  return (_corr(a, f, mask, count) + _corr(b, f, mask, count)) * np.float32(0.5)


def floor_share(fused: Array, ir: Array, vis: Array, *, size=None,
                signal: float = FLOOR_SIGNAL) -> Array:
  """Floor: the share of the pixels where a source has signal that F sets to its minimum.

  A source has signal at a pixel when it is more than `signal` gray levels above its own
  minimum. A fused image whose dark regions collapse (every unit of the network off below a
  brightness, so the output is one constant: its minimum after the stretch) scores high
  although both sources show detail there; the published student scores 0.0 on the night and
  medical sets where students trained here scored up to 42%. Lower is better; NaN (undefined)
  when no source has signal anywhere.
  """
  h, w = _size(fused, size)
  mask = _mask(fused.shape, h, w)
  f, a, b = (jnp.asarray(x, jnp.float32) for x in (fused, ir, vis))

  def lowest(x):
    return jnp.min(jnp.where(mask, x, jnp.inf))

  has_signal = mask & ((a - lowest(a) > signal) | (b - lowest(b) > signal))
  at_floor = has_signal & (f <= lowest(f))
  return (jnp.sum(at_floor, dtype=jnp.float32)
          / jnp.sum(has_signal, dtype=jnp.float32))


def mse(fused: Array, ir: Array, vis: Array, *, size=None) -> Array:
  """MSE: (mean((A - F)^2) + mean((B - F)^2)) / 2."""
  h, w = _size(fused, size)
  mask = _mask(fused.shape, h, w)
  count = _count(h, w)
  f, a, b = (jnp.asarray(x, jnp.float32) for x in (fused, ir, vis))
  return (_mean((a - f) ** 2, mask, count) + _mean((b - f) ** 2, mask, count)) * np.float32(0.5)


def psnr(fused: Array, ir: Array, vis: Array, *, size=None) -> Array:
  """PSNR: 10 log10(max(F)^2 / MSE), MSE averaged over both sources (peak is F's own max)."""
  h, w = _size(fused, size)
  mask = _mask(fused.shape, h, w)
  peak = jnp.max(jnp.where(mask, jnp.asarray(fused, jnp.float32), -jnp.inf))
  return 10.0 * jnp.log10(peak * peak / mse(fused, ir, vis, size=size))


# VIF: pixel-domain multi-scale VIF (VIFp) with MATLAB-style Gaussian windows.


def _vif_taps(scale: int) -> tuple[float, ...]:
  """1-D taps whose outer product is the normalised N x N Gaussian window of `scale`."""
  n = 2 ** (5 - scale) + 1
  sd_ = n / 5.0
  r = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
  g = np.exp(-(r * r) / (2.0 * sd_ * sd_))
  win = np.outer(g, g)
  # The published window zeroes entries under eps * max; none are that small for these
  # sizes, which keeps the window exactly separable.
  assert not np.any(win < np.finfo(np.float64).eps * win.max())
  taps = g / g.sum()
  assert np.allclose(taps, taps[::-1])
  return tuple(taps)


_VIF_SIGMA_NSQ = 2.0
_VIF_EPS = 1e-10


def _vif_pair(a: Array, b: Array, f: Array, h: Array, w: Array) -> Array:
  """(VIFp(A, F), VIFp(B, F)), filtering all maps of a scale as one stacked array."""
  num = jnp.zeros((2,), jnp.float32)
  den = jnp.zeros((2,), jnp.float32)
  imgs = jnp.stack([a, b, f])
  for scale in range(1, 5):
    taps = _vif_taps(scale)
    n = len(taps)
    if scale > 1:
      imgs = _filter_valid(imgs, taps, stride=2)
      h = (h - n + 2) // 2  # ceil((h - n + 1) / 2)
      w = (w - n + 2) // 2
    refs, dist = imgs[:2], imgs[2:]
    # No centering: black backgrounds (exact zeros) then give exactly zero variance, as in
    # float64. Bright flat regions leave float32 noise of order 255^2 * 2^-24 in the
    # variances, which moves VIF by < 1e-4 relative on the golden sets.
    maps = _filter_valid(jnp.concatenate([imgs, imgs * imgs, refs * dist]), taps)
    mu1, mu2 = maps[0:2], maps[2:3]
    s1 = jnp.maximum(maps[3:5] - mu1 * mu1, 0.0)
    s2 = jnp.maximum(maps[5:6] - mu2 * mu2, 0.0)
    s12 = maps[6:8] - mu1 * mu2
    mask = _mask(maps.shape[-2:], h - n + 1, w - n + 1)
    g = s12 / (s1 + _VIF_EPS)
    sv = s2 - g * s12
    low1 = s1 < _VIF_EPS
    g = jnp.where(low1, 0.0, g)
    sv = jnp.where(low1, s2, sv)
    s1 = jnp.where(low1, 0.0, s1)
    low2 = s2 < _VIF_EPS
    g = jnp.where(low2, 0.0, g)
    sv = jnp.where(low2, 0.0, sv)
    neg = g < 0
    sv = jnp.where(neg, s2, sv)
    g = jnp.where(neg, 0.0, g)
    sv = jnp.maximum(sv, _VIF_EPS)
    num += _sum(jnp.log10(1.0 + g * g * s1 / (sv + _VIF_SIGMA_NSQ)), mask)
    den += _sum(jnp.log10(1.0 + s1 / _VIF_SIGMA_NSQ), mask)
  v = num / den
  return jnp.where(jnp.isnan(v), 1.0, v)


def vif(fused: Array, ir: Array, vis: Array, *, size=None) -> Array:
  """VIF: VIFp(A, F) + VIFp(B, F), pixel-domain 4-scale VIF with sigma_n^2 = 2.

  Needs images of at least MIN_SIZE x MIN_SIZE (a smaller `size` on a larger canvas gives
  NaN-free but meaningless values; `evaluation` rejects such images).
  """
  if min(fused.shape[-2:]) < MIN_SIZE:
    raise ValueError(
        f"VIF needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels, got shape {fused.shape}")
  h, w = _size(fused, size)
  mask = _mask(fused.shape, h, w)
  f, a, b = (_prepare(x, mask) for x in (fused, ir, vis))
  return jnp.sum(_vif_pair(a, b, f, h, w))


# Qabf: Xydeas-Petrovic edge preservation with 3x3 Sobel responses.


def _sobel(x: Array) -> tuple[Array, Array]:
  """scipy `convolve2d(x, k, 'same')` (zero padding) for the two Sobel kernels of Qabf.

  Returns:
    (sx, sy) for kx = [[-1,0,1],[-2,0,2],[-1,0,1]] and ky = [[1,2,1],[0,0,0],[-1,-2,-1]];
    convolution flips the kernels, so sx = smooth_v(x[j-1] - x[j+1]) and
    sy = smooth_h(x[i+1] - x[i-1]).
  """
  p = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)])
  smooth_v = p[..., :-2, :] + 2.0 * p[..., 1:-1, :] + p[..., 2:, :]  # (H, W+2)
  smooth_h = p[..., :, :-2] + 2.0 * p[..., :, 1:-1] + p[..., :, 2:]  # (H+2, W)
  sx = smooth_v[..., :, :-2] - smooth_v[..., :, 2:]
  sy = smooth_h[..., 2:, :] - smooth_h[..., :-2, :]
  return sx, sy


def _arctan(x: Array) -> Array:
  """float32 arctan (Cephes atanf, max error ~1.4e-7); XLA's CPU arctan is much slower."""
  ax = jnp.abs(x)
  big = ax > np.float32(2.414213562373095)  # tan(3 pi / 8)
  mid = (ax > np.float32(0.4142135623730950)) & ~big  # tan(pi / 8)
  t = jnp.where(big, -1.0 / jnp.where(big, ax, 1.0), jnp.where(mid, (ax - 1.0) / (ax + 1.0), ax))
  y0 = jnp.where(big, np.float32(math.pi / 2), jnp.where(mid, np.float32(math.pi / 4), 0.0))
  z = t * t
  y = y0 + ((((np.float32(8.05374449538e-2) * z - np.float32(1.38776856032e-1)) * z
               + np.float32(1.99777106478e-1)) * z - np.float32(3.33329491539e-1)) * z * t + t)
  return jnp.where(x < 0, -y, y)


def _edges(x: Array) -> tuple[Array, Array]:
  sx, sy = _sobel(x)
  g = jnp.sqrt(sx * sx + sy * sy)
  alpha = jnp.where(sx == 0, np.float32(math.pi / 2), _arctan(sy / jnp.where(sx == 0, 1.0, sx)))
  return g, alpha


def _qabf_q(g_x: Array, a_x: Array, g_f: Array, a_f: Array) -> Array:
  ratio = jnp.where(g_x > g_f, g_f / jnp.where(g_x > g_f, g_x, 1.0),
                    jnp.where(g_x == g_f, g_f, g_x / jnp.where(g_x < g_f, g_f, 1.0)))
  angle = 1.0 - jnp.abs(a_x - a_f) / np.float32(math.pi / 2)
  q_g = 0.9994 / (1.0 + jnp.exp(-15.0 * (ratio - 0.5)))
  q_a = 0.9879 / (1.0 + jnp.exp(-22.0 * (angle - 0.8)))
  return q_g * q_a


def qabf(fused: Array, ir: Array, vis: Array, *, size=None) -> Array:
  """Qabf: gradient-weighted edge preservation sum(Q_AF gA + Q_BF gB) / sum(gA + gB)."""
  h, w = _size(fused, size)
  mask = _mask(fused.shape, h, w)
  g, alpha = _edges(jnp.stack([_prepare(x, mask) for x in (ir, vis, fused)]))
  g_src, a_src = g[:2], alpha[:2]
  q = _qabf_q(g_src, a_src, g[2:], alpha[2:])
  return jnp.sum(_sum(q * g_src, mask)) / jnp.sum(_sum(g_src, mask))


# SSIM: scikit-image 0.19 defaults (7x7 uniform window, sample covariance, borders cropped).

_SSIM_WIN = 7


def _window_n2_cov(n: float, sum_xy: Array, sum_x: Array, sum_y: Array) -> Array:
  """`n * sum_xy - sum_x * sum_y` with a single rounding for integer-valued window sums.

  Both products exceed float32's exact integer range (2^24) for 7x7 windows of 8-bit data,
  and rounding them separately leaves noise comparable to SSIM's constants where the
  window is flat. Splitting every factor into a coarse part (few significant bits) and a
  small remainder makes each partial product exact; the coarse terms cancel exactly, and
  only the final addition rounds (relative error 2^-24 of the result).
  """
  s_hi = jnp.floor(sum_xy * np.float32(1 / 16)) * 16.0
  s_lo = sum_xy - s_hi
  x_hi = jnp.round(sum_x * np.float32(1 / 64)) * 64.0
  x_lo = sum_x - x_hi
  y_hi = jnp.round(sum_y * np.float32(1 / 64)) * 64.0
  y_lo = sum_y - y_hi
  big = n * s_hi - x_hi * y_hi
  small = n * s_lo - x_hi * y_lo - x_lo * y_hi - x_lo * y_lo
  return big + small


def _ssim_pair(a: Array, b: Array, f: Array, h: Array, w: Array, data_range: float) -> Array:
  """(SSIM(F, A), SSIM(F, B)), box-filtering all maps as one stacked array."""
  n = _SSIM_WIN
  np_ = float(n * n)
  cov_norm = np_ / (np_ - 1.0)
  c1 = (0.01 * data_range) ** 2
  c2 = (0.03 * data_range) ** 2
  # Window sums of integer-valued images centred by 128 (|x| <= 128, so up to
  # 49 * 128^2 < 2^24) are exact in float32.
  imgs = jnp.stack([a, b, f]) - 128.0
  src, fc = imgs[:2], imgs[2:]
  sums = _filter_valid(jnp.concatenate([imgs, imgs * imgs, src * fc]), (1.0,) * n)
  s_src, s_f = sums[0:2], sums[2:3]
  inv = np.float32(1.0 / (np_ * np_))
  var_src = _window_n2_cov(np_, sums[3:5], s_src, s_src) * inv
  var_f = _window_n2_cov(np_, sums[5:6], s_f, s_f) * inv
  cov = _window_n2_cov(np_, sums[6:8], s_f, s_src) * inv
  mu_src = s_src / np.float32(np_) + 128.0
  mu_f = s_f / np.float32(np_) + 128.0
  a1 = 2.0 * mu_f * mu_src + c1
  a2 = 2.0 * cov_norm * cov + c2
  b1 = mu_f * mu_f + mu_src * mu_src + c1
  b2 = cov_norm * (var_f + var_src) + c2
  mask = _mask(sums.shape[-2:], h - n + 1, w - n + 1)
  return _sum((a1 * a2) / (b1 * b2), mask) / _count(h - n + 1, w - n + 1)


def ssim(fused: Array, ir: Array, vis: Array, *, size=None, data_range: float = 2.0) -> Array:
  """SSIM: SSIM(F, A) + SSIM(F, B), skimage 0.19 defaults with data_range 2 (published)."""
  h, w = _size(fused, size)
  mask = _mask(fused.shape, h, w)
  f, a, b = (_prepare(x, mask) for x in (fused, ir, vis))
  return jnp.sum(_ssim_pair(a, b, f, h, w, data_range))


# ---------------------------------------------------------------------------------------------
# The full set.


def _one_metric(name: str, fused: Array, ir: Array, vis: Array, size, ssim_data_range: float,
                mi_base: Optional[float]) -> Array:
  fns: dict[str, Callable[[], Array]] = {
      "EN": lambda: en(fused, size=size),
      "SD": lambda: sd(fused, size=size),
      "SF": lambda: sf(fused, size=size),
      "AG": lambda: ag(fused, size=size),
      "MI": lambda: mi(fused, ir, vis, size=size, base=mi_base),
      "SCD": lambda: scd(fused, ir, vis, size=size),
      "VIF": lambda: vif(fused, ir, vis, size=size),
      "Qabf": lambda: qabf(fused, ir, vis, size=size),
      "SSIM": lambda: ssim(fused, ir, vis, size=size, data_range=ssim_data_range),
      "CC": lambda: cc(fused, ir, vis, size=size),
      "PSNR": lambda: psnr(fused, ir, vis, size=size),
      "MSE": lambda: mse(fused, ir, vis, size=size),
      "Floor": lambda: floor_share(fused, ir, vis, size=size),
  }
  return fns[name]()


@functools.partial(jax.jit, static_argnames=("name", "ssim_data_range", "mi_base"))
def _metric_program(name: str, fused: Array, ir: Array, vis: Array, size, ssim_data_range: float,
                    mi_base: Optional[float]) -> Array:
  """One metric, compiled on its own, for one image or (vmapped) a batch."""
  fn = functools.partial(_one_metric, name, ssim_data_range=ssim_data_range, mi_base=mi_base)
  if fused.ndim == 2:
    return fn(fused, ir, vis, size)
  return jax.vmap(fn)(fused, ir, vis, size)


def all_metrics(fused: Array | np.ndarray, ir: Array | np.ndarray, vis: Array | np.ndarray,
                size: Optional[Array | np.ndarray] = None, *,
                names: tuple[str, ...] = METRIC_NAMES, ssim_data_range: float = 2.0,
                mi_base: Optional[float] = None) -> dict[str, Array]:
  """All metrics of `names` for one image triple (H, W) or a batch (B, H, W).

  Each metric runs as its own compiled program (cached per shape). On CPU, eleven small
  programs dispatched one after the other run faster than one program holding them all,
  whose cross-metric fusions XLA schedules poorly (figures: docs/benchmarks.md). Called
  inside an outer `jax.jit` or `jax.vmap`, this still traces to one pure function.

  Args:
    fused, ir, vis: float images on 0..255, all of the same shape (JAX or NumPy arrays).
    size: optional valid (h, w) (or (B, 2) for a batch) of zero-or-otherwise padded images.
    names: which metrics (from `ALL_NAMES`) to compute.
    ssim_data_range: SSIM's data range (2 as published; 255 the textbook convention).
    mi_base: logarithm base of MI (None: natural log, as published).

  Returns:
    {name: value}, scalars or (B,) arrays for a batch.
  """
  unknown = set(names) - set(ALL_NAMES)
  if unknown:
    raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(ALL_NAMES)}")
  if fused.ndim not in (2, 3):
    raise ValueError(f"expected (H, W) or (B, H, W) images, got shape {fused.shape}")
  if fused.ndim == 3 and size is None:
    size = jnp.broadcast_to(jnp.asarray(fused.shape[-2:], jnp.int32), (fused.shape[0], 2))
  return {name: _metric_program(name, fused, ir, vis, size, ssim_data_range, mi_base)
          for name in names}
