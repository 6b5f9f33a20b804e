"""The dynamic refresh rule (SPEC section 4) on hand-made cases."""

import jax.numpy as jnp
import numpy as np
import pytest

from mmdrfuse_jax.configs import default
from mmdrfuse_jax.train import refresh, run_spec

T, F = True, False


def _decide(cur, best, written, *, higher=True, per_sample=False):
  return refresh.decide(jnp.asarray(cur, jnp.float32), jnp.asarray(best, jnp.float32),
                        jnp.asarray(written), higher_is_better=higher, per_sample=per_sample)


@pytest.mark.parametrize("higher", [True, False])
def test_first_epoch_writes_without_loss(higher):
  d = _decide([0.1, 0.9], [np.nan, np.nan], [F, F], higher=higher)
  np.testing.assert_array_equal(d["replace"], [T, T])
  np.testing.assert_array_equal(d["weight"], [0.0, 0.0])
  assert float(d["gap"]) == 0.0 and not bool(d["any_written"])


def test_ssim_batch_better_refreshes_all():
  # Batch means: cur 0.6 > best 0.5, so every slot takes the new output even though sample 1
  # alone is worse (the published batch-level decision).
  d = _decide([0.8, 0.4], [0.5, 0.5], [T, T])
  np.testing.assert_array_equal(d["replace"], [T, T])
  np.testing.assert_array_equal(d["weight"], [0.0, 0.0])
  np.testing.assert_allclose(d["gap"], -0.1, atol=1e-6)


def test_ssim_batch_worse_gives_weight():
  d = _decide([0.4, 0.6], [0.7, 0.5], [T, T])
  np.testing.assert_array_equal(d["replace"], [F, F])
  np.testing.assert_allclose(d["weight"], [1.0, 1.0], atol=1e-6)  # 10 * (0.6 - 0.5)
  np.testing.assert_allclose(d["gap"], 0.1, atol=1e-6)


def test_equal_neither_refreshes_nor_weights():
  for higher in (True, False):
    d = _decide([0.5, 0.5], [0.5, 0.5], [T, T], higher=higher)
    np.testing.assert_array_equal(d["replace"], [F, F])
    np.testing.assert_array_equal(d["weight"], [0.0, 0.0])


def test_gmsd_lower_is_better():
  better = _decide([0.1, 0.2], [0.3, 0.3], [T, T], higher=False)
  np.testing.assert_array_equal(better["replace"], [T, T])
  np.testing.assert_array_equal(better["weight"], [0.0, 0.0])
  worse = _decide([0.5, 0.3], [0.3, 0.3], [T, T], higher=False)
  np.testing.assert_array_equal(worse["replace"], [F, F])
  np.testing.assert_allclose(worse["weight"], [1.0, 1.0], atol=1e-6)  # 10 * (0.4 - 0.3)
  np.testing.assert_allclose(worse["gap"], 0.1, atol=1e-6)


def test_per_sample_mode():
  d = _decide([0.8, 0.4, 0.5, 0.9], [0.5, 0.5, 0.5, np.nan], [T, T, T, F], per_sample=True)
  np.testing.assert_array_equal(d["replace"], [T, F, F, T])
  np.testing.assert_allclose(d["weight"], [0.0, 1.0, 0.0, 0.0], atol=1e-6)
  g = _decide([0.1, 0.5], [0.3, 0.3], [T, T], higher=False, per_sample=True)
  np.testing.assert_array_equal(g["replace"], [T, F])
  np.testing.assert_allclose(g["weight"], [0.0, 2.0], atol=1e-6)


def test_batch_mode_ignores_unwritten_slots():
  # The unwritten slot's (garbage) scores do not enter the decision; it is simply written.
  d = _decide([0.4, 100.0], [0.5, np.nan], [T, F])
  np.testing.assert_array_equal(d["replace"], [F, T])
  np.testing.assert_allclose(d["weight"], [1.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("dtype,tol",
                         [("float32", 0.0), ("bfloat16", 4e-3), ("uint8", 1 / 254 + 1e-6)])
def test_memory_contents_after_scatter(dtype, tol):
  cfg = refresh.RefreshConfig(memory_dtype=dtype)
  mem = refresh.init_memory(5, 4, 4, cfg)
  x, written = refresh.gather(mem["best_ssim"], jnp.arange(5), dtype)
  assert not np.any(written) and np.all(np.asarray(x) == 0)
  out = jnp.linspace(-1, 1, 3 * 16).reshape(3, 4, 4, 1)
  ids = jnp.array([4, 0, 2])
  new = refresh.scatter(mem["best_ssim"], ids, out, jnp.array([T, F, T]), dtype)
  x, written = refresh.gather(new, jnp.arange(5), dtype)
  np.testing.assert_array_equal(written, [F, F, T, F, T])
  np.testing.assert_allclose(x[4], out[0], atol=tol)
  np.testing.assert_allclose(x[2], out[2], atol=tol)
  np.testing.assert_array_equal(x[0], 0.0)
  # A second write over a written slot replaces it; an unselected written slot stays.
  new2 = refresh.scatter(new, jnp.array([4, 2]), -out[:2], jnp.array([T, F]), dtype)
  x2, _ = refresh.gather(new2, jnp.arange(5), dtype)
  np.testing.assert_allclose(x2[4], -out[0], atol=tol)
  np.testing.assert_allclose(x2[2], out[2], atol=tol)


def test_uint8_endpoints_exact():
  x = jnp.array([-1.0, 0.0, 1.0, 1.5]).reshape(4, 1, 1, 1)
  dec, written = refresh.decode(refresh.encode(x, "uint8"), "uint8")
  np.testing.assert_array_equal(dec.ravel(), [-1.0, 0.0, 1.0, 1.0])
  assert np.all(written)


def test_bytes_per_sample():
  assert refresh.bytes_per_sample(refresh.RefreshConfig(memory_dtype="float32")) == 131072
  assert refresh.bytes_per_sample(refresh.RefreshConfig()) == 65536  # a quarter of 262,144
  assert refresh.bytes_per_sample(refresh.RefreshConfig(memory_dtype="uint8")) == 32768
  assert refresh.bytes_per_sample(
      refresh.RefreshConfig(memories=("ssim",), memory_dtype="uint8")) == 16384
  assert list(refresh.init_memory(3, 8, 8,
                                  refresh.RefreshConfig(memories=("gmsd",)))) == ["best_gmsd"]


def test_config_switches_select_memory_kinds():
  config = default.get_config()
  config.refresh.update(dict(ssim=False, gmsd=True, per_sample=True, memory_dtype="uint8",
                             weight_scale=10.0))
  cfg = run_spec.RunSpec.from_config(config).refresh
  assert [kind.name for kind in cfg.kinds] == ["gmsd"] and cfg.per_sample
  assert [kind.key for kind in refresh.MEMORY_KINDS] == ["best_ssim", "best_gmsd"]
  with pytest.raises(ValueError, match="unknown refresh memories"):
    refresh.RefreshConfig(memories=("psnr",))
