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

Speed (XLA on CPU): the windowed metrics filter with shifted slices; the pass along the rows
is materialised and the pass along the columns fuses into the per-pixel formula
(`_filter_valid` says why and how); each division in a formula has a single user, so that
the formula stays one loop; `all_metrics` runs a few programs (`_PROGRAMS`). The comments
give the measured reasons; `bench.py metrics --per_metric --profile DIR` measures.

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


def _rows_of_product(factors: Sequence[Array], taps: Sequence[float], stride: int) -> Array:
  """'valid' correlation along the rows (axis -2) of the product of `factors`.

  The product is taken per tap, of row-shifted slices, rather than sliced once formed: XLA
  does not fuse a producer into a consumer that reads it at more than 15 offsets (17-tap
  windows), so a formed product would be materialised first (a pass over memory per map).
  `taps` is symmetric; mirrored taps are added first, as `filters.filter_axis` does (the
  same operations, so one factor goes there, for its cheaper derivative).
  """
  n = len(taps)
  axis = factors[0].ndim - 2
  if len(factors) == 1:
    return filters.filter_axis(factors[0], taps, axis, stride)
  out_len = (factors[0].shape[axis] - n) // stride + 1

  def tap(k: int) -> Array:
    sliced = [jax.lax.slice_in_dim(x, k, k + (out_len - 1) * stride + 1, stride, axis=axis)
              for x in factors]
    return functools.reduce(jnp.multiply, sliced)

  acc: Optional[Array] = None
  for k in range((n + 1) // 2):
    term = tap(k) if k == n - 1 - k else tap(k) + tap(n - 1 - k)
    if taps[k] != 1.0:
      term = term * np.float32(taps[k])
    acc = term if acc is None else acc + term
  assert acc is not None
  return acc


def _pad_column(x: Array) -> Array:
  """x with a zero column on the right, which is materialised where several loops read it.

  XLA does not fuse a pad into a consumer that reads it at several offsets, or into several
  consumers (the second pass of `_filter_valid` explains why that matters). The column
  itself lies outside the valid region, like a padded canvas's: the metrics mask it out.
  """
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, 1)])


def _filter_valid(factors: Sequence[Array], taps: Sequence[float], stride: int = 1) -> Array:
  """'valid' 2-D correlation of the product of `factors` with the window outer(taps, taps).

  For one factor x, equals scipy's `convolve2d(x, rot90(outer(taps, taps), 2),
  'valid')[::stride, ::stride]` on each 2-D slice (last two axes); `taps` is symmetric. The
  pass along the rows is materialised before the pass along the columns: XLA fuses a
  producer into a consumer that reads it at up to 15 offsets, and then recomputes it for
  every tap (n^2 instead of 2n operations per pixel: 25 ms instead of 3 ms for SSIM at
  640x480), but it never fuses a pad into a consumer that reads it at several offsets.
  Padding the first pass by one row makes it that barrier at no cost: every column offset
  of the second pass reads the padded row (so XLA cannot simplify the pad away), and the
  extra output row is cropped. The second pass is left to fuse into its consumer (the
  metric's per-pixel formula).

  Every output reads only the inputs under its window, so outputs inside a padded image's
  valid region never read its padding: the metrics that only filter need no masking.
  """
  assert all(taps[k] == taps[-1 - k] for k in range(len(taps)))
  y = _rows_of_product(factors, taps, stride)
  y = jnp.pad(y, [(0, 0)] * (y.ndim - 2) + [(0, 1), (0, 0)])
  return filters.filter_axis(y, taps, y.ndim - 1, stride)[..., :-1, :]


# ---------------------------------------------------------------------------------------------
# Single-image metrics.


def _histogram_levels(x: Array) -> Array:
  """Integer gray levels 0..255 of an image on 0..255 (rounded, clipped)."""
  return jnp.clip(jnp.round(x), 0, 255).astype(jnp.int32)


def _entropy_bits(hist: Array, count: Array) -> Array:
  """Shannon entropy in bits of a histogram of `count` pixels."""
  p = hist / count
  return -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0))


def en(fused: Array, *, size=None) -> Array:
  """EN: Shannon entropy in bits of the 256-bin histogram of F (levels rounded to integers)."""
  h, w = _size(fused, size)
  mask = _mask(fused.shape, h, w)
  levels = jnp.where(mask, _histogram_levels(fused), 256).reshape(-1)
  hist = jnp.zeros(257, jnp.float32).at[levels].add(1.0)[:256]
  return _entropy_bits(hist, _count(h, w))


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
  # Both differences on F's grid (a zero last column or row), summed as one stack: one loop
  # and one pair of dots instead of two.
  dx = jnp.pad(f[..., :, 1:] - f[..., :, :-1], [(0, 0)] * (f.ndim - 1) + [(0, 1)])
  dy = jnp.pad(f[..., 1:, :] - f[..., :-1, :], [(0, 0)] * (f.ndim - 2) + [(0, 1), (0, 0)])
  mx = _mask(f.shape[-2:], h, w - 1)
  my = _mask(f.shape[-2:], h - 1, w)
  s = _sum(jnp.stack([jnp.where(mx, dx * dx, 0.0), jnp.where(my, dy * dy, 0.0)]))
  return jnp.sqrt(s[0] / _count(h, w - 1) + s[1] / _count(h - 1, w))


def _gradient(p: Array, n: Array, axis: int) -> Array:
  """np.gradient along `axis` (0 or 1) of an image whose valid length there is `n` (dynamic).

  `p` is the (H, W) image padded by one pixel on every side, so that the image and both
  neighbours are slices of one array (the padding is never selected): XLA materialises
  that pad once, where shifted copies (concatenations, or pads of their own) are
  materialised one by one.
  """
  height, width = p.shape[0] - 2, p.shape[1] - 2

  def shifted(step: int) -> Array:
    di, dj = (step, 0) if axis == 0 else (0, step)
    return p[1 + di:1 + di + height, 1 + dj:1 + dj + width]

  f, nxt, prv = shifted(0), shifted(1), shifted(-1)
  length = (height, width)[axis]
  shape = [1, 1]
  shape[axis] = length
  idx = jnp.arange(length, dtype=jnp.int32).reshape(shape)
  central = (nxt - prv) * np.float32(0.5)
  return jnp.where(idx == 0, nxt - f, jnp.where(idx == n - 1, f - prv, central))


def ag(fused: Array, *, size=None) -> Array:
  """AG: mean of sqrt((Gx^2 + Gy^2) / 2), np.gradient differences (one-sided at borders)."""
  h, w = _size(fused, size)
  mask = _mask(fused.shape, h, w)
  p = jnp.pad(jnp.asarray(fused, jnp.float32), 1)
  gy = _gradient(p, h, 0)
  gx = _gradient(p, w, 1)
  return _mean(jnp.sqrt((gx * gx + gy * gy) * np.float32(0.5)), mask, _count(h, w))


# ---------------------------------------------------------------------------------------------
# Metrics of the fused image against both sources.


def _joint_histogram(levels_f: Array, x: Array, mask: Array) -> Array:
  """256x256 joint histogram of F's levels and x's, as float32 counts (exact below 2^24).

  Each pair is counted by its own scatter: one scatter of both pairs' indices would first
  materialise their concatenation.
  """
  idx = jnp.where(mask, levels_f * 256 + _histogram_levels(x), 65536).reshape(-1)
  # Masked-out pixels land in a last bin, which is dropped.
  return jnp.zeros(65537, jnp.float32).at[idx].add(1.0)[:65536].reshape(256, 256)


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


def _en_mi(fused: Array, ir: Array, vis: Array, size, base: Optional[float]
           ) -> tuple[Array, Array]:
  """(EN, MI) from the same joint histograms: F's histogram is their row sums (exactly)."""
  h, w = _size(fused, size)
  mask = _mask(fused.shape, h, w)
  lf = _histogram_levels(fused)
  ja, jb = (_joint_histogram(lf, x, mask) for x in (ir, vis))
  count = _count(h, w)
  total = _mutual_information(ja, count) + _mutual_information(jb, count)
  entropy = _entropy_bits(jnp.sum(ja, axis=1), count)
  return entropy, (total if base is None else total / np.float32(math.log(base)))


def mi(fused: Array, ir: Array, vis: Array, *, size=None, base: Optional[float] = None) -> Array:
  """MI: MI(F,A) + MI(F,B) of 256-level joint histograms, in nats (log base `base`, default e)."""
  return _en_mi(fused, ir, vis, size, base)[1]


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
  s = _sum(jnp.stack([(a - f) ** 2, (b - f) ** 2]), mask) / count
  return (s[0] + s[1]) * np.float32(0.5)


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


def _vif_terms(mu1: Array, mu2: Array, e11: Array, e22: Array, e12: Array) -> tuple[Array, Array]:
  """Per-pixel (numerator, denominator) terms of VIFp from window means and raw moments.

  Natural logarithms: VIF is their ratio, so the base (log10 as published) cancels. The
  published rules, in order: where s1 < eps, g = 0 and sv = s2 (and s1 = 0); where
  s2 < eps, g = 0 and sv = 0; where g < 0, sv = s2 and g = 0; then sv >= eps. Each of them
  sets g to 0 and overrides sv, so g is computed once and zeroed in one select; g < 0 is
  s12 < 0 (s1 + eps > 0). The division then has a single user: XLA would not fuse a
  division read by several operations into one loop with the rest, and would compute the
  filters feeding it once per loop instead.
  """
  s1 = jnp.maximum(e11 - mu1 * mu1, 0.0)
  s2 = jnp.maximum(e22 - mu2 * mu2, 0.0)
  s12 = e12 - mu1 * mu2
  low1 = s1 < _VIF_EPS
  low2 = s2 < _VIF_EPS
  neg = s12 < 0
  g = jnp.where(low1 | low2 | neg, 0.0, s12 / (s1 + _VIF_EPS))
  sv = jnp.where(low2, 0.0, jnp.where(low1 | neg, s2, s2 - g * s12))
  sv = jnp.maximum(sv, _VIF_EPS)
  s1 = jnp.where(low1, 0.0, s1)
  return (jnp.log(1.0 + g * g * s1 / (sv + _VIF_SIGMA_NSQ)),
          jnp.log(1.0 + s1 * np.float32(1.0 / _VIF_SIGMA_NSQ)))


def _vif_pair(a: Array, b: Array, f: Array, h: Array, w: Array) -> Array:
  """(VIFp(A, F), VIFp(B, F)), filtering each of the eight maps of a scale on its own.

  Separate maps rather than one stacked array: a concatenation is materialised (a copy of
  all maps), while each map's product (A * F, ...) fuses into its filter.
  """
  num = jnp.zeros((2,), jnp.float32)
  den = jnp.zeros((2,), jnp.float32)
  for scale in range(1, 5):
    taps = _vif_taps(scale)
    n = len(taps)
    if scale > 1:
      # A zero column materialises each downsampled image, which the next filters read at
      # several row offsets: without it XLA recomputes the downsampling in each of them,
      # per tap.
      a, b, f = (_pad_column(_filter_valid([x], taps, stride=2)) for x in (a, b, f))
      h = (h - n + 2) // 2  # ceil((h - n + 1) / 2)
      w = (w - n + 2) // 2
    # No centering: black backgrounds (exact zeros) then give exactly zero variance, as in
    # float64. Bright flat regions leave float32 noise of order 255^2 * 2^-24 in the
    # variances, which moves VIF by < 1e-4 relative on the golden sets. A zero column on
    # each filtered map (outside the valid region) materialises the maps that two of the
    # four terms below read (see _filter_valid): the stacked sum computes each term on its
    # own, and would filter them again for each (10% slower).
    mu_a, mu_b, mu_f, e_aa, e_bb, e_ff, e_af, e_bf = (
        _pad_column(_filter_valid(m, taps))
        for m in ([a], [b], [f], [a, a], [b, b], [f, f], [a, f], [b, f]))
    num_a, den_a = _vif_terms(mu_a, mu_f, e_aa, e_ff, e_af)
    num_b, den_b = _vif_terms(mu_b, mu_f, e_bb, e_ff, e_bf)
    sums = _sum(jnp.stack([num_a, num_b, den_a, den_b]),
                _mask(mu_a.shape[-2:], h - n + 1, w - n + 1))
    num += sums[:2]
    den += sums[2:]
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
  # No masking: the valid region's outputs never read the padding (see _filter_valid).
  f, a, b = (jnp.asarray(x, jnp.float32) for x in (fused, ir, vis))
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


def _arctan_ratio(y: Array, x: Array) -> Array:
  """float32 arctan(y / x) for x != 0 (Cephes atanf, max error ~1.4e-7).

  XLA's CPU arctan is much slower. The sign is taken from y and x rather than from the
  ratio, so that each division has a single user: XLA does not fuse a division read by
  several operations into one loop with them (it materialises it, and recomputes the
  Sobel responses in each loop that reads it).
  """
  ax = jnp.abs(y / x)
  big = ax > np.float32(2.414213562373095)  # tan(3 pi / 8)
  mid = (ax > np.float32(0.4142135623730950)) & ~big  # tan(pi / 8)
  # -1 / ax where big, (ax - 1) / (ax + 1) where mid: one division for both.
  reduced = jnp.where(big, -1.0, ax - 1.0) / jnp.where(big, ax, ax + 1.0)
  t = jnp.where(big | mid, reduced, ax)
  y0 = jnp.where(big, np.float32(math.pi / 2), jnp.where(mid, np.float32(math.pi / 4), 0.0))
  z = t * t
  r = y0 + ((((np.float32(8.05374449538e-2) * z - np.float32(1.38776856032e-1)) * z
               + np.float32(1.99777106478e-1)) * z - np.float32(3.33329491539e-1)) * z * t + t)
  # arctan(y / x) < 0 exactly where the signs differ (a zero ratio gives -0.0 here, +0.0
  # from the ratio's sign: equal values).
  return jnp.where((y < 0) != (x < 0), -r, r)


def _edges(x: Array) -> tuple[Array, Array]:
  """Edge strength g and orientation alpha (pi / 2 where the horizontal response is 0)."""
  sx, sy = _sobel(x)
  g = jnp.sqrt(sx * sx + sy * sy)
  zero = sx == 0
  alpha = jnp.where(zero, np.float32(math.pi / 2), _arctan_ratio(sy, jnp.where(zero, 1.0, sx)))
  return g, alpha


def _qabf_q(g_x: Array, a_x: Array, g_f: Array, a_f: Array) -> Array:
  # min / max is g_f / g_x where g_x > g_f and g_x / g_f where g_x < g_f: one division
  # instead of two (the denominator is guarded where it is not used, for finite gradients).
  equal = g_x == g_f
  ratio = jnp.where(equal, g_f,
                    jnp.minimum(g_x, g_f) / jnp.where(equal, 1.0, jnp.maximum(g_x, g_f)))
  angle = 1.0 - jnp.abs(a_x - a_f) / np.float32(math.pi / 2)
  q_g = 0.9994 / (1.0 + jnp.exp(-15.0 * (ratio - 0.5)))
  q_a = 0.9879 / (1.0 + jnp.exp(-22.0 * (angle - 0.8)))
  return q_g * q_a


def qabf(fused: Array, ir: Array, vis: Array, *, size=None) -> Array:
  """Qabf: gradient-weighted edge preservation sum(Q_AF gA + Q_BF gB) / sum(gA + gB)."""
  h, w = _size(fused, size)
  mask = _mask(fused.shape, h, w)
  # Each image on its own: stacking them would materialise a copy of all three.
  (g_a, al_a), (g_b, al_b), (g_f, al_f) = (_edges(_prepare(x, mask)) for x in (ir, vis, fused))
  num = _qabf_q(g_a, al_a, g_f, al_f) * g_a + _qabf_q(g_b, al_b, g_f, al_f) * g_b
  sums = _sum(jnp.stack([num, g_a + g_b]), mask)
  return sums[0] / sums[1]


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
  """(SSIM(F, A), SSIM(F, B)), box-filtering each of the eight maps on its own."""
  n = _SSIM_WIN
  np_ = float(n * n)
  cov_norm = np_ / (np_ - 1.0)
  c1 = (0.01 * data_range) ** 2
  c2 = (0.03 * data_range) ** 2
  # Window sums of integer-valued images centred by 128 (|x| <= 128, so up to
  # 49 * 128^2 < 2^24) are exact in float32.
  a, b, f = (x - 128.0 for x in (a, b, f))
  box = (1.0,) * n
  s_a, s_b, s_f, s_aa, s_bb, s_ff, s_af, s_bf = (
      _filter_valid(m, box) for m in ([a], [b], [f], [a, a], [b, b], [f, f], [a, f], [b, f]))
  inv = np.float32(1.0 / (np_ * np_))
  var_f = _window_n2_cov(np_, s_ff, s_f, s_f) * inv
  mu_f = s_f / np.float32(np_) + 128.0

  def one(s_x: Array, s_xx: Array, s_xf: Array) -> Array:
    var_x = _window_n2_cov(np_, s_xx, s_x, s_x) * inv
    cov = _window_n2_cov(np_, s_xf, s_f, s_x) * inv
    mu_x = s_x / np.float32(np_) + 128.0
    a1 = 2.0 * mu_f * mu_x + c1
    a2 = 2.0 * cov_norm * cov + c2
    b1 = mu_f * mu_f + mu_x * mu_x + c1
    b2 = cov_norm * (var_f + var_x) + c2
    return (a1 * a2) / (b1 * b2)

  maps = jnp.stack([one(s_a, s_aa, s_af), one(s_b, s_bb, s_bf)])
  mask = _mask(maps.shape[-2:], h - n + 1, w - n + 1)
  return _sum(maps, mask) / _count(h - n + 1, w - n + 1)


def ssim(fused: Array, ir: Array, vis: Array, *, size=None, data_range: float = 2.0) -> Array:
  """SSIM: SSIM(F, A) + SSIM(F, B), skimage 0.19 defaults with data_range 2 (published)."""
  h, w = _size(fused, size)
  # No masking: the valid region's outputs never read the padding (see _filter_valid).
  f, a, b = (jnp.asarray(x, jnp.float32) for x in (fused, ir, vis))
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


_PROGRAMS = (("VIF",), ("Qabf",), ("SSIM",), ("EN", "MI"),
             ("SD", "SF", "AG", "SCD", "CC", "MSE", "PSNR", "Floor"))
"""How `all_metrics` groups the metrics into compiled programs.

The windowed metrics run alone: one program holding them all runs about twice as slow as
separate ones on CPU (XLA schedules the fusions of different metrics poorly). The light
metrics share one program, where XLA computes their common terms (means, masks) once and
which costs less than their separate dispatches; EN and MI share the joint histograms.
"""


_LOOP_PIXELS = 1 << 18
"""Batches with at least this many pixels in all are scored image by image.

A vmapped program's temporary buffers grow with the batch; on CPU, past a few tens of
megabytes they come from fresh memory on every call, and touching it costs a page fault per
4 KiB page: about half the time of a vmapped call on 4 images of 640x480 (186 ms; 93 ms
image by image). Below this size (8 images of 128x128: 16 ms vmapped, 18 ms one by one)
the vmapped program, one dispatch per program, is the faster.
"""


def _group(names: tuple[str, ...], fused: Array, ir: Array, vis: Array, size,
           ssim_data_range: float, mi_base: Optional[float]) -> dict[str, Array]:
  out = {}
  if "EN" in names and "MI" in names:
    out["EN"], out["MI"] = _en_mi(fused, ir, vis, size, mi_base)
  for name in names:
    if name not in out:
      out[name] = _one_metric(name, fused, ir, vis, size, ssim_data_range, mi_base)
  return out


@functools.partial(jax.jit, static_argnames=("names", "ssim_data_range", "mi_base"))
def _program(names: tuple[str, ...], fused: Array, ir: Array, vis: Array, size,
             ssim_data_range: float, mi_base: Optional[float]) -> dict[str, Array]:
  """The metrics `names`, compiled together, for one image or (vmapped) a batch."""
  fn = functools.partial(_group, names, ssim_data_range=ssim_data_range, mi_base=mi_base)
  if fused.ndim == 2:
    return fn(fused, ir, vis, size)
  return jax.vmap(fn)(fused, ir, vis, size)


def _metric_program(name: str, fused: Array, ir: Array, vis: Array, size, ssim_data_range: float,
                    mi_base: Optional[float]) -> Array:
  """One metric, compiled on its own (as the benchmark's breakdown times it)."""
  return _program((name,), fused, ir, vis, size, ssim_data_range, mi_base)[name]


def all_metrics(fused: Array | np.ndarray, ir: Array | np.ndarray, vis: Array | np.ndarray,
                size: Optional[Array | np.ndarray] = None, *,
                names: tuple[str, ...] = METRIC_NAMES, ssim_data_range: float = 2.0,
                mi_base: Optional[float] = None) -> dict[str, Array]:
  """All metrics of `names` for one image triple (H, W) or a batch (B, H, W).

  The metrics run as a few compiled programs (cached per shape and per subset of `names`):
  VIF, Qabf and SSIM each on its own, EN with MI, and the light ones together (see
  `_PROGRAMS`). On CPU, that runs faster than one program holding them all, whose
  cross-metric fusions XLA schedules poorly (figures: docs/benchmarks.md). A batch of
  small images runs the vmapped programs; a larger one (`_LOOP_PIXELS`) runs the
  single-image programs image by image, which is faster (see there). Called inside an outer
  `jax.jit` or `jax.vmap`, this still traces to one pure function.

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
  if fused.ndim == 3 and fused.size >= _LOOP_PIXELS:
    assert size is not None
    per_image = [all_metrics(fused[i], ir[i], vis[i], size[i], names=names,
                             ssim_data_range=ssim_data_range, mi_base=mi_base)
                 for i in range(fused.shape[0])]
    return {name: jnp.stack([o[name] for o in per_image]) for name in names}
  out: dict[str, Array] = {}
  for group in _PROGRAMS:
    subset = tuple(name for name in group if name in names)
    if subset:
      out.update(_program(subset, fused, ir, vis, size, ssim_data_range, mi_base))
  return {name: out[name] for name in names}
