"""The precision setting: `exact` is the parity mode, `default` equals it on a CPU, and
`bfloat16` computes VGG-19 and the teacher in bfloat16 with float32 results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdrfuse_jax.configs import default
from mmdrfuse_jax.models import networks, precision, vgg
from mmdrfuse_jax.train import distill, loop, losses, run_settings, update


def _rel_err(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.random((2, 16, 24, 2), dtype=np.float32))


@pytest.fixture(scope="module")
def teacher_params():
  return networks.init_params("teacher", jax.random.PRNGKey(3))


@pytest.fixture(scope="module")
def teacher_targets(images, teacher_params):
  """`distill.teacher_targets` ([sum of features, output]) in the exact and bfloat16 modes."""
  compute = jax.jit(distill.teacher_targets, static_argnums=2)
  return {mode: compute(teacher_params, images, mode) for mode in ("exact", "bfloat16")}


@pytest.mark.slow
def test_teacher_in_bfloat16_is_float32_and_close(teacher_targets):
  exact, bf16 = teacher_targets["exact"], teacher_targets["bfloat16"]
  assert bf16.dtype == exact.dtype == jnp.float32
  for channel in (0, 1):  # The summed features, the output.
    error = _rel_err(bf16[..., channel], exact[..., channel])
    assert 1e-5 < error < 5e-2, (channel, error)  # Really bfloat16, and still close.


def test_vgg_taps_in_each_mode(images):
  params = jax.tree_util.tree_map(jnp.asarray, vgg.random_params())
  taps = {mode: jax.jit(update.vgg_taps, static_argnums=(2, 3))(params, images[..., :1], 3, mode)
          for mode in precision.MODES}
  for exact, default_, bf16 in zip(taps["exact"], taps["default"], taps["bfloat16"]):
    assert bf16.dtype == default_.dtype == jnp.float32
    assert _rel_err(default_, exact) <= 1e-6  # A CPU has no faster float32 mode.
    assert 1e-5 < _rel_err(bf16, exact) < 5e-2


def test_unknown_mode_is_refused():
  with pytest.raises(ValueError, match="precision must be one of exact, default, bfloat16"):
    precision.check("fp8")
  with pytest.raises(ValueError, match="precision"):
    update.StepConfig("student", losses.PUBLISHED_WEIGHTS["student"], precision="half")
  config = default.get_config("student")
  config.precision = "half"
  with pytest.raises(loop.TrainingError, match="config.precision must be one of"):
    run_settings.check_config(config)
