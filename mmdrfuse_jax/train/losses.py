"""MMDRFuse's training losses (SPEC sections 3 and 4), as pure functions on NHWC arrays.

Images are (B, H, W, 1) float arrays; VGG taps are the tuples returned by
`mmdrfuse_jax.models.vgg.vgg19_taps` (1-based tap k is `taps[k - 1]`), so the trainer runs
VGG-19 once per image and shares the taps between the perception and the refresh losses.

Every function is jittable: the data-dependent choices of the published code (the SSIM data
range, GMSD's x255 scaling) are made with `jnp.where`, never with Python branches on values.
Per-sample variants return shape (B,) and their mean equals the batch version wherever that is
mathematically true (every per-sample mean is over equally sized images).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence, cast

import jax
import jax.numpy as jnp
import numpy as np

from mmdrfuse_jax.evaluation import filters

Taps = Sequence[jax.Array]

_PREWITT = (1 / 3, 0.0, -1 / 3)  # The Prewitt kernel [[1, 0, -1]] * 3 / 3 is outer(ones, this).
_GMSD_C = 170.0


def _per_sample_mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _filter_planes(x: jax.Array, taps: Sequence[float], *, stride: int = 1,
                   taps_h: Sequence[float] | None = None) -> jax.Array:
  """'valid' separable filter of every channel of NHWC `x` (see `evaluation.filters`).

  The channels move to the front so that the filter runs along contiguous rows: on a CPU
  that is several times faster than filtering NHWC in place.
  """
  planes = jnp.moveaxis(x, -1, 0)
  out = filters.filter_valid(planes, taps, stride=stride, taps_h=taps_h)
  return jnp.moveaxis(out, 0, -1)


# ----------------------------------------------------------------------------- basic terms


def intensity_loss(out: jax.Array, ir: jax.Array, vi: jax.Array) -> jax.Array:
  """L_int = mean(|max(ir, vi) - out|)."""
  return jnp.mean(jnp.abs(jnp.maximum(ir, vi) - out))


def gradient(x: jax.Array) -> jax.Array:
  """Laplacian-like response: [[1,1,1],[1,-8,1],[1,1,1]] / 8, zero padding 1, per channel."""
  # The kernel is a 3x3 box sum minus 9 times the centre: a separable filter and a product.
  box = _filter_planes(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (1.0, 1.0, 1.0))
  return (box - 9 * x) / 8


# The gradient term's forms (`config.loss.gradient_form`, see `gradient_mse`).
GRADIENT_FORMS = ("code", "paper")


def gradient_mse(out: jax.Array, ir: jax.Array, vi: jax.Array, form: str = "code"
                 ) -> jax.Array:
  """Mean squared gradient error before the /10 of the published code.

  form="code": against grad(max(ir, vi)) (published code);
  form="paper": against max(grad(ir), grad(vi)) (the paper's Eq. 3).
  """
  if form == "code":
    target = gradient(jnp.maximum(ir, vi))
  elif form == "paper":
    target = jnp.maximum(gradient(ir), gradient(vi))
  else:
    raise ValueError(f"gradient loss form must be 'code' or 'paper', got {form!r}")
  return jnp.mean(jnp.square(gradient(out) - target))


def gradient_loss(out: jax.Array, ir: jax.Array, vi: jax.Array, form: str = "code"
                  ) -> jax.Array:
  """L_grad = gradient_mse(...) / 10 (the /10 of the published code, kept for both forms)."""
  return gradient_mse(out, ir, vi, form) / 10


def _tap_mse(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(a - b))


def perception_loss(taps_out: Taps, taps_ir: Taps, taps_vi: Taps) -> jax.Array:
  """L_percep = mean over taps k of mean((max(phi_k(ir), phi_k(vi)) - phi_k(out))^2)."""
  if not len(taps_out) == len(taps_ir) == len(taps_vi):
    raise ValueError("perception_loss needs the same number of taps for out, ir and vi")
  terms = [_tap_mse(jnp.maximum(i, v), o) for o, i, v in zip(taps_out, taps_ir, taps_vi)]
  # A sum of arrays (an int 0 only for no taps, where the division raises).
  return cast(jax.Array, sum(terms)) / len(terms)


# How the distillation term normalises its maps (`config.loss.distill_normalize`).
DISTILL_NORMALIZATIONS = ("batch", "sample")


def _normalized_attention(x: jax.Array, normalize: str) -> jax.Array:
  a = jnp.sum(x, axis=-1)  # (B, H, W): sum over channels.
  if normalize == "batch":  # Published code: one norm over the whole batch tensor.
    norm = jnp.sqrt(jnp.sum(jnp.square(a)))
  elif normalize == "sample":  # The paper's Eq. 1: each sample normalised on its own.
    norm = jnp.sqrt(jnp.sum(jnp.square(a), axis=(1, 2), keepdims=True))
  else:
    raise ValueError(f"distillation normalize must be 'batch' or 'sample', got {normalize!r}")
  # Like torch.nn.functional.normalize's eps: avoids 0/0 for an all-zero map.
  return a / jnp.maximum(norm, 1e-12)


def distillation_loss(s_feat: jax.Array, t_feat: jax.Array, s_out: jax.Array,
                      t_out: jax.Array, normalize: str = "batch") -> jax.Array:
  """L_distill (before the x5 weight) = (term(feat) + term(out)) / 2.

  term(s, t) = sum((a(s) - a(t))^2), where a(x) is x summed over channels and divided by its
  L2 norm over the whole batch (normalize="batch", published code) or per sample ("sample").
  The teacher tensors should be constants (the caller stops their gradient).
  """
  def term(s, t):
    return jnp.sum(jnp.square(_normalized_attention(s, normalize) -
                              _normalized_attention(t, normalize)))
  return (term(s_feat, t_feat) + term(s_out, t_out)) / 2


def alive_loss(feat_pre: jax.Array, *, margin: float = 0.05) -> jax.Array:
  """L_alive: how far each pixel's strongest first-layer feature is below `margin`, averaged.

  mean(relu(margin - max_k feat_pre[..., k])) over the batch's pixels. Not in the published
  recipe (weight 0 there). Where every ReLU of the student's `conv1` is off, its output is one
  constant whatever the inputs: the dark regions of night and medical scenes go flat
  (`evaluation.diagnostics.dead_unit_share`). The published student keeps one unit on there (a
  conv1 bias of +0.21); students trained here drove all four biases negative. The term is zero
  wherever some unit is on by at least `margin`, so it asks nothing of the other pixels.

  Args:
    feat_pre: (B, H, W, C) pre-activations of the first layer (`Student(...)["feat_pre"]`).
    margin: how far on the strongest unit should be, in the features' units.

  Returns:
    A scalar.
  """
  return jnp.mean(jax.nn.relu(margin - jnp.max(feat_pre, axis=-1)))


# ------------------------------------------------------------------------ training SSIM/GMSD


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size, dtype=np.float64) - size // 2
  g = np.exp(-x**2 / (2 * sigma**2))
  return (g / g.sum()).astype(np.float32)


def ssim_data_range(x: jax.Array, axis=None) -> jax.Array:
  """The published code's L: (255 if max(x) > 128 else 1) - (-1 if min(x) < -0.5 else 0).

  axis=None decides over the whole batch (as the published code); axis=(1, 2, 3) per image.
  """
  hi = jnp.where(jnp.max(x, axis=axis) > 128, 255.0, 1.0)
  lo = jnp.where(jnp.min(x, axis=axis) < -0.5, -1.0, 0.0)
  return hi - lo


def _ssim_map(x: jax.Array, y: jax.Array, data_range: jax.Array) -> jax.Array:
  """SSIM map, 11x11 Gaussian (sigma 1.5), 'valid'; data_range broadcasts against (B,1,1,1)."""
  size = min(11, x.shape[1], x.shape[2])  # The published window shrinks for tiny images.
  g = [float(t) for t in _gaussian_1d(size)]
  c = x.shape[-1]
  # One separable filtering pass over the five moments stacked as channels.
  stacked = jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1)
  filt = _filter_planes(stacked, g)
  mu_x, mu_y, e_xx, e_yy, e_xy = (filt[..., i * c:(i + 1) * c] for i in range(5))
  mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
  var_x, var_y, cov = e_xx - mu_xx, e_yy - mu_yy, e_xy - mu_xy
  c1 = (0.01 * data_range)**2
  c2 = (0.03 * data_range)**2
  v1 = 2 * cov + c2
  v2 = var_x + var_y + c2
  return (2 * mu_xy + c1) * v1 / ((mu_xx + mu_yy + c1) * v2)


def ssim_per_image(x: jax.Array, y: jax.Array, data_range: jax.Array | float | None = None
                   ) -> jax.Array:
  """Training SSIM of each image pair, shape (B,).

  data_range None: L chosen from each image of `x` on its own (what the published code would
  pick for a batch of one). Pass `ssim_data_range(x)` to use the batch's L, so that the mean
  of this equals `ssim(x, y)` exactly.
  """
  if data_range is None:
    data_range = ssim_data_range(x, axis=(1, 2, 3))
  data_range = jnp.reshape(jnp.asarray(data_range, jnp.float32), (-1, 1, 1, 1))
  return _per_sample_mean(_ssim_map(x, y, data_range))


def ssim(x: jax.Array, y: jax.Array, data_range: jax.Array | float | None = None) -> jax.Array:
  """Training SSIM (published code): mean of the SSIM map over the batch; L from all of `x`."""
  if data_range is None:
    data_range = ssim_data_range(x)
  return jnp.mean(ssim_per_image(x, y, data_range))


def _safe_sqrt(x: jax.Array) -> jax.Array:
  # sqrt with a zero (not NaN) gradient at 0, for flat image regions.
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _gradient_magnitude(x: jax.Array) -> jax.Array:
  # Each image scaled to 0..255 when its own max is <= 1 (as the published code decides).
  scale = jnp.where(jnp.max(x, axis=(1, 2, 3), keepdims=True) <= 1, 255.0, 1.0)
  x = x * scale
  # 2x2 mean filter ('valid') then every second row/column from 0 == 2x2 filter with stride 2.
  x = _filter_planes(x, (0.5, 0.5), stride=2)
  gx = _filter_planes(x, _PREWITT, taps_h=(1.0, 1.0, 1.0))
  gy = _filter_planes(x, (1.0, 1.0, 1.0), taps_h=_PREWITT)
  return _safe_sqrt(gx * gx + gy * gy)


def gmsd_per_image(x: jax.Array, y: jax.Array) -> jax.Array:
  """Training GMSD of each image pair, shape (B,): std (n - 1) of the GMS map."""
  ma, mb = _gradient_magnitude(x), _gradient_magnitude(y)
  gms = (2 * ma * mb + _GMSD_C) / (ma * ma + mb * mb + _GMSD_C)
  gms = gms.reshape(gms.shape[0], -1)
  # std with Bessel's correction; _safe_sqrt keeps the gradient finite when GMS is constant.
  return _safe_sqrt(jnp.var(gms, axis=1, ddof=1))


def gmsd(x: jax.Array, y: jax.Array) -> jax.Array:
  """Training GMSD (published code): per-image GMSD averaged over the batch."""
  return jnp.mean(gmsd_per_image(x, y))


# ----------------------------------------------------------------------------- refresh terms


def refresh_ssim_loss_per_sample(taps_mem: Taps, taps_out: Taps, mem: jax.Array,
                                 out: jax.Array) -> jax.Array:
  """Per-sample L_s, shape (B,): (1/2) sum_{k=4,5} mse(phi_k(mem), phi_k(out)) + l1(mem, out).

  `taps_mem`/`taps_out` hold (at least) the five VGG taps; only taps 4 and 5 are used.
  """
  vgg = sum(_per_sample_mean(jnp.square(taps_mem[k] - taps_out[k])) for k in (3, 4)) / 2
  return vgg + _per_sample_mean(jnp.abs(mem - out))


def refresh_ssim_loss(taps_mem: Taps, taps_out: Taps, mem: jax.Array, out: jax.Array
                      ) -> jax.Array:
  """Batch L_s (the published code's), the mean of `refresh_ssim_loss_per_sample`."""
  return jnp.mean(refresh_ssim_loss_per_sample(taps_mem, taps_out, mem, out))


def refresh_gmsd_loss_per_sample(taps_mem: Taps, taps_out: Taps, mem: jax.Array,
                                 out: jax.Array) -> jax.Array:
  """Per-sample L_g, shape (B,): (1/3) sum_{k=1..3} mse(taps) + mse(grad(out), grad(mem)).

  Only the first three taps are used, so callers may pass `vgg19_taps(..., num_taps=3)`.
  """
  vgg = sum(_per_sample_mean(jnp.square(taps_mem[k] - taps_out[k])) for k in range(3)) / 3
  return vgg + _per_sample_mean(jnp.square(gradient(out) - gradient(mem)))


def refresh_gmsd_loss(taps_mem: Taps, taps_out: Taps, mem: jax.Array, out: jax.Array
                      ) -> jax.Array:
  """Batch L_g (the published code's), the mean of `refresh_gmsd_loss_per_sample`."""
  return jnp.mean(refresh_gmsd_loss_per_sample(taps_mem, taps_out, mem, out))


# ------------------------------------------------------------------------------- totals


# The terms of the comprehensive loss, in the order `LossWeights.total` sums them.
TERMS = ("int", "percep", "grad", "distill", "refresh", "alive")


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights of the comprehensive loss's terms (SPEC section 3).

  A run reads them from its config (`config.loss.w_*`, `run_spec.RunSpec.from_config`);
  `PUBLISHED_WEIGHTS` holds the published code's values, which the configs start from. A term
  whose weight is 0 is not computed at all (the train step skips its VGG passes).
  """

  w_int: float
  w_percep: float
  w_grad: float
  w_distill: float
  w_refresh: float
  w_alive: float = 0.0  # Not in the published recipe: `alive_loss`.

  def total(self, terms: Mapping[str, jax.Array]) -> jax.Array:
    """The weighted sum of the terms present in `terms` (keys `l_int`, `l_percep`, ...)."""
    total = jnp.zeros((), jnp.float32)
    for name in TERMS:
      if f"l_{name}" in terms:
        total = total + getattr(self, f"w_{name}") * terms[f"l_{name}"]
    return total


# The published training code's weights (SPEC section 3). The paper's student weights
# (gamma=2, delta=1, theta=0.1) are in configs/student_paper.py.
PUBLISHED_WEIGHTS = {
    "teacher": LossWeights(w_int=2.0, w_percep=1.0, w_grad=1.0, w_distill=0.0, w_refresh=1.0),
    "student": LossWeights(w_int=1.0, w_percep=2.0, w_grad=1.0, w_distill=5.0, w_refresh=1.0),
}
