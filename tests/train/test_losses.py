"""Training losses: every term against the published code's goldens, jit and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdrfuse_jax.models import vgg
from mmdrfuse_jax.train import losses

RTOL = 1e-4


def _rel_err(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _nhwc(a) -> jax.Array:
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def batch(golden):
  net = golden["networks"]
  return {
      "ir": _nhwc(net["ir"]), "vi": _nhwc(net["vi"]),
      "out": _nhwc(net["student_decoder_0"]), "s_feat": _nhwc(net["student_encoder_0"]),
      "t_out": _nhwc(golden["losses"]["teacher_out"]), "t_feat": _nhwc(net["teacher_decoder_1"]),
  }


@pytest.fixture(scope="module")
def taps(batch):
  """Random-VGG taps of out, ir, vi and the memory (teacher output), one pass of 16 images."""
  params = vgg.random_params(20241127)
  x = jnp.concatenate([batch["out"], batch["ir"], batch["vi"], batch["t_out"]])
  all_taps = jax.jit(vgg.vgg19_taps, static_argnames="precision")(
      params, x, precision=jax.lax.Precision.HIGHEST)  # No TF32 on GPUs: parity at 1e-4.
  return dict(zip(("out", "ir", "vi", "mem"), zip(*[jnp.split(t, 4) for t in all_taps])))


# ------------------------------------------------------------------------------ goldens


def test_teacher_out_is_networks_golden(golden):
  np.testing.assert_array_equal(golden["losses"]["teacher_out"],
                                golden["networks"]["teacher_decoder_0"])


def test_intensity(golden, batch):
  got = jax.jit(losses.intensity_loss)(batch["out"], batch["ir"], batch["vi"])
  assert _rel_err(got, golden["losses"]["intensity_l1"]) < RTOL


def test_gradient_map(golden, batch):
  got = jax.jit(losses.gradient)(batch["out"])
  assert _rel_err(got, golden["losses"]["gradient2_out"].transpose(0, 2, 3, 1)) < RTOL


def test_gradient_loss_code_form(golden, batch):
  args = (batch["out"], batch["ir"], batch["vi"])
  mse = jax.jit(losses.gradient_mse)(*args)
  assert _rel_err(mse, golden["losses"]["gradient_mse"]) < RTOL
  np.testing.assert_allclose(losses.gradient_loss(*args), mse / 10, rtol=1e-6)


def _np_gradient(x):
  """Naive NumPy reference of `gradient` on (B, H, W, 1)."""
  k = np.array([[1, 1, 1], [1, -8, 1], [1, 1, 1]], np.float64) / 8
  p = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  return sum(k[i, j] * p[:, i:i + h, j:j + w] for i in range(3) for j in range(3))


def test_gradient_loss_paper_form(batch):
  out, ir, vi = batch["out"][:2, :32, :32], batch["ir"][:2, :32, :32], batch["vi"][:2, :32, :32]
  ref = np.mean((_np_gradient(out) - np.maximum(_np_gradient(ir), _np_gradient(vi)))**2)
  got = losses.gradient_mse(out, ir, vi, form="paper")
  assert _rel_err(got, ref) < RTOL
  assert _rel_err(losses.gradient_loss(out, ir, vi, form="paper"), ref / 10) < RTOL
  with pytest.raises(ValueError, match="form"):
    losses.gradient_loss(out, ir, vi, form="other")


@pytest.mark.parametrize("src,key", [("ir", "ssim_out_ir"), ("vi", "ssim_out_vi")])
def test_ssim(golden, batch, src, key):
  got = jax.jit(losses.ssim)(batch["out"], batch[src])
  assert _rel_err(got, golden["losses"][key]) < RTOL


@pytest.mark.parametrize("src,key", [("ir", "gmsd_out_ir"), ("vi", "gmsd_out_vi")])
def test_gmsd(golden, batch, src, key):
  got = jax.jit(losses.gmsd)(batch["out"], batch[src])
  assert _rel_err(got, golden["losses"][key]) < RTOL


def test_gmsd_per_image(golden, batch):
  got = jax.jit(losses.gmsd_per_image)(batch["out"], batch["ir"])
  assert got.shape == (4,)
  assert _rel_err(got, golden["losses"]["gmsd_per_image_out_ir"]) < RTOL
  np.testing.assert_allclose(np.mean(got), losses.gmsd(batch["out"], batch["ir"]), rtol=1e-6)


def test_distillation(golden, batch):
  got = jax.jit(losses.distillation_loss)(batch["s_feat"], batch["t_feat"], batch["out"],
                                          batch["t_out"])
  # The golden is 6.3e-5 (relative) from the exact float64 value, which this matches.
  assert _rel_err(got, golden["losses"]["distill_raw"]) < RTOL


def test_distillation_per_sample_normalisation(batch):
  def np_term(s, t):
    a = [np.asarray(x, np.float64).sum(-1) for x in (s, t)]
    a = [x / np.sqrt((x**2).sum(axis=(1, 2), keepdims=True)) for x in a]
    return ((a[0] - a[1])**2).sum()
  ref = (np_term(batch["s_feat"], batch["t_feat"]) + np_term(batch["out"], batch["t_out"])) / 2
  got = losses.distillation_loss(batch["s_feat"], batch["t_feat"], batch["out"], batch["t_out"],
                                 normalize="sample")
  assert _rel_err(got, ref) < RTOL
  with pytest.raises(ValueError, match="normalize"):
    losses.distillation_loss(batch["out"], batch["out"], batch["out"], batch["out"], "x")


def test_perception(golden, taps):
  got = jax.jit(losses.perception_loss)(taps["out"], taps["ir"], taps["vi"])
  assert _rel_err(got, golden["vgg19_random"]["perception"]) < RTOL


def test_refresh_ssim(golden, batch, taps):
  ref = golden["vgg19_random"]
  fn = jax.jit(losses.refresh_ssim_loss)
  got = fn(taps["mem"], taps["out"], batch["t_out"], batch["out"])
  assert _rel_err(got, ref["refresh_ssim_loss"]) < RTOL
  zeros = jnp.zeros_like(batch["out"])  # Pixel term vanishes: VGG part alone.
  assert _rel_err(fn(taps["mem"], taps["out"], zeros, zeros), ref["refresh_ssim_vgg"]) < RTOL
  per_sample = losses.refresh_ssim_loss_per_sample(taps["mem"], taps["out"], batch["t_out"],
                                                   batch["out"])
  assert per_sample.shape == (4,)
  np.testing.assert_allclose(np.mean(per_sample), got, rtol=1e-6)


def test_refresh_gmsd(golden, batch, taps):
  ref = golden["vgg19_random"]
  fn = jax.jit(losses.refresh_gmsd_loss)
  got = fn(taps["mem"], taps["out"], batch["t_out"], batch["out"])
  assert _rel_err(got, ref["refresh_gmsd_loss"]) < RTOL
  zeros = jnp.zeros_like(batch["out"])
  assert _rel_err(fn(taps["mem"], taps["out"], zeros, zeros), ref["refresh_gmsd_vgg"]) < RTOL
  # Only taps 1..3 are needed.
  np.testing.assert_allclose(fn(taps["mem"][:3], taps["out"][:3], batch["t_out"], batch["out"]),
                             got, rtol=1e-7)
  per_sample = losses.refresh_gmsd_loss_per_sample(taps["mem"], taps["out"], batch["t_out"],
                                                   batch["out"])
  assert per_sample.shape == (4,)
  np.testing.assert_allclose(np.mean(per_sample), got, rtol=1e-6)


# ----------------------------------------------------- data-dependent choices, under jit


def test_ssim_data_range_under_jit():
  fn = jax.jit(losses.ssim_data_range)
  assert float(fn(jnp.array([0.0, 1.0]))) == 1.0
  assert float(fn(jnp.array([-0.2, 1.0]))) == 1.0
  assert float(fn(jnp.array([-0.9, 1.0]))) == 2.0
  assert float(fn(jnp.array([0.0, 200.0]))) == 255.0
  assert float(fn(jnp.array([-1.0, 200.0]))) == 256.0
  per_image = jax.jit(losses.ssim_data_range, static_argnames="axis")(
      jnp.stack([jnp.full((4, 4, 1), 0.5), jnp.full((4, 4, 1), -0.9)]), axis=(1, 2, 3))
  np.testing.assert_array_equal(per_image, [1.0, 2.0])


@pytest.mark.slow
def test_ssim_scales_with_data_range():
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  x = jax.random.uniform(k1, (2, 24, 24, 1))
  y = jnp.clip(x + 0.3 * jax.random.normal(k2, x.shape), 0, 1)
  fn = jax.jit(losses.ssim)
  np.testing.assert_allclose(fn(x * 255, y * 255), fn(x, y), rtol=1e-4)  # L = 255 branch.
  np.testing.assert_allclose(fn(x, x), 1.0, rtol=1e-6)
  shifted, y_shifted = x * 2 - 1.0, y * 2 - 1.0  # min < -0.5: L = 1 - (-1) = 2.
  np.testing.assert_allclose(fn(shifted, y_shifted), losses.ssim(shifted, y_shifted, 2.0),
                             rtol=1e-6)
  assert abs(float(fn(shifted, y_shifted) - losses.ssim(shifted, y_shifted, 1.0))) > 1e-3


def test_ssim_per_image(batch):
  x, y = batch["out"], batch["ir"]
  per_image = jax.jit(losses.ssim_per_image)(x, y, losses.ssim_data_range(x))
  assert per_image.shape == (4,)
  np.testing.assert_allclose(np.mean(per_image), losses.ssim(x, y), rtol=1e-6)
  alone = [float(losses.ssim(x[i:i + 1], y[i:i + 1])) for i in range(4)]
  np.testing.assert_allclose(losses.ssim_per_image(x, y), alone, rtol=1e-6)


def test_gmsd_255_scaling_under_jit(batch):
  x, y = batch["out"][:2, :32, :32], batch["ir"][:2, :32, :32]
  fn = jax.jit(losses.gmsd_per_image)
  # Images whose max is <= 1 are scaled by 255 first, so pre-scaling changes nothing.
  np.testing.assert_allclose(fn(x * 255, y), fn(x, y), rtol=1e-5)
  np.testing.assert_allclose(fn(x, y * 255), fn(x, y), rtol=1e-5)
  np.testing.assert_allclose(fn(x, x), 0.0, atol=1e-7)


# ---------------------------------------------------------------------------- gradients


@pytest.mark.slow
def test_finite_gradients_through_all_losses():
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(0), 5)
  shape = (2, 32, 32, 1)
  ir, vi = jax.random.uniform(k1, shape), jax.random.uniform(k2, shape)
  mem = jnp.tanh(jax.random.normal(k3, shape))
  t_feat = jax.nn.relu(jax.random.normal(k4, shape[:3] + (4,)))
  # Stand-in taps keep this fast; gradients through VGG itself are tested in test_vgg.py.
  def fake_taps(x):
    return tuple(jax.nn.relu(x * (k + 1) - 0.2 * k) for k in range(5))
  taps_ir, taps_vi, taps_mem = fake_taps(ir), fake_taps(vi), fake_taps(mem)

  def total(out_pre):
    out = jnp.tanh(out_pre)
    s_feat = jax.nn.relu(jnp.concatenate([out_pre, -out_pre, out_pre, 2 * out_pre], axis=-1))
    taps_out = fake_taps(out)
    refresh = (losses.refresh_ssim_loss(taps_mem, taps_out, mem, out) +
               losses.refresh_gmsd_loss(taps_mem, taps_out, mem, out) +
               losses.distillation_loss(s_feat, t_feat, out, mem, normalize="sample") +
               losses.gradient_loss(out, ir, vi, form="paper") +
               # Decision metrics, including degenerate cases (identical and flat images).
               losses.ssim(out, ir) + losses.gmsd(out, ir) + losses.gmsd(out, out) +
               losses.gmsd(0.0 * out, ir) + losses.ssim(0.0 * out, 0.0 * out))
    return losses.PUBLISHED_WEIGHTS["student"].total({
        "l_int": losses.intensity_loss(out, ir, vi),
        "l_percep": losses.perception_loss(taps_out, taps_ir, taps_vi),
        "l_grad": losses.gradient_loss(out, ir, vi),
        "l_distill": losses.distillation_loss(s_feat, t_feat, out, mem),
        "l_refresh": refresh})

  value, grads = jax.jit(jax.value_and_grad(total))(jax.random.normal(k5, shape))
  assert bool(jnp.isfinite(value))
  assert bool(jnp.all(jnp.isfinite(grads)))
  assert float(jnp.max(jnp.abs(grads))) > 0


def test_totals():
  teacher, student = losses.PUBLISHED_WEIGHTS["teacher"], losses.PUBLISHED_WEIGHTS["student"]
  terms = {"l_int": 1.0, "l_percep": 2.0, "l_grad": 3.0, "l_refresh": 4.0}
  np.testing.assert_allclose(teacher.total(terms), 2 + 2 + 3 + 4)
  np.testing.assert_allclose(student.total({**terms, "l_distill": 4.0, "l_refresh": 5.0}),
                             1 + 4 + 3 + 20 + 5)
  paper = losses.LossWeights(w_int=1, w_percep=2, w_grad=0.1, w_distill=1, w_refresh=1)
  ones = dict.fromkeys(["l_int", "l_percep", "l_grad", "l_distill"], 1.0)
  np.testing.assert_allclose(paper.total(ones), 4.1)
  # Terms that are off are absent from `terms`, and add nothing.
  np.testing.assert_allclose(student.total({"l_int": 1.0}), 1.0)


def test_alive_loss_against_hand_computed_values():
  # Two pixels with every unit off (strongest -0.2 and -0.01), one on by less than the margin
  # (0.02), one on by more (0.3): (0.05+0.2 + 0.05+0.01 + 0.05-0.02 + 0) / 4.
  feat_pre = jnp.array([[[[-0.5, -0.2, -0.3, -1.0], [-0.01, -0.4, -0.02, -0.03]],
                         [[0.02, -1.0, 0.01, -2.0], [0.3, -0.5, 0.1, -0.1]]]])
  np.testing.assert_allclose(losses.alive_loss(feat_pre, margin=0.05),
                             (0.25 + 0.06 + 0.03) / 4, rtol=1e-6)
  # The gradient reaches only the strongest unit of each pixel under the margin.
  grad = jax.grad(lambda f: losses.alive_loss(f, margin=0.05))(feat_pre)
  want = np.zeros(feat_pre.shape, np.float32)
  want[0, 0, 0, 1] = want[0, 0, 1, 0] = want[0, 1, 0, 0] = -0.25
  np.testing.assert_allclose(grad, want)
  # A student with the term's weight: it adds to the total, and is absent by default.
  weights = losses.LossWeights(w_int=1, w_percep=0, w_grad=0, w_distill=0, w_refresh=0,
                               w_alive=10)
  np.testing.assert_allclose(weights.total({"l_int": 1.0, "l_alive": 0.5}), 6.0)
  assert losses.PUBLISHED_WEIGHTS["student"].w_alive == 0
