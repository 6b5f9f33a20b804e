"""VGG-19 feature stack: golden taps, single pass, weight conversion and files."""

import functools
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script

from mmdrfuse_jax.io import files, torch_reader
from mmdrfuse_jax.models import vgg


def _rel_err(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _recipe_params() -> dict:
  """Weights from the golden file's recipe, written out here independently of the library."""
  rng = np.random.default_rng(20241127)
  cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512]
  state, index, cin = {}, 0, 3
  for item in cfg:
    if item == "M":
      index += 1
      continue
    weight = rng.standard_normal((item, cin, 3, 3)) * np.sqrt(2 / (cin * 9))
    bias = rng.standard_normal(item) * 0.01
    state[f"features.{index}.weight"] = weight.astype(np.float32)
    state[f"features.{index}.bias"] = bias.astype(np.float32)
    index, cin = index + 2, item
  return state


@pytest.fixture(scope="module")
def torch_state():
  return _recipe_params()


@pytest.fixture(scope="module")
def params(torch_state):
  return vgg.params_from_torchvision(torch_state)


@pytest.fixture(scope="module")
def golden(shared):
  with np.load(shared / "reference" / "golden" / "vgg19_random.npz") as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def taps_fn():
  # Full float32 convolutions, so the parity holds on GPUs that default to TF32 too.
  return jax.jit(functools.partial(vgg.vgg19_taps, precision=jax.lax.Precision.HIGHEST),
                 static_argnames="num_taps")


def test_recipe_matches_library(golden, params):
  assert "default_rng(20241127)" in str(golden["recipe"])
  lib = vgg.random_params(20241127)
  for name in vgg.LAYER_NAMES:
    np.testing.assert_array_equal(lib[name]["kernel"], params[name]["kernel"])
    np.testing.assert_array_equal(lib[name]["bias"], params[name]["bias"])


def test_golden_taps(golden, params, taps_fn):
  x = jnp.asarray(golden["x"].transpose(0, 2, 3, 1))
  taps = taps_fn(params, x)
  assert len(taps) == 5
  for k, tap in enumerate(taps, start=1):
    ref = golden[f"tap_{k}"].transpose(0, 2, 3, 1)
    assert tap.shape == ref.shape
    assert _rel_err(tap, ref) < 1e-4, k


def test_gray_input_is_repeated(golden, params, taps_fn):
  gray = jnp.asarray(golden["x"][:, :1].transpose(0, 2, 3, 1))
  a = taps_fn(params, gray, num_taps=2)
  b = taps_fn(params, jnp.repeat(gray, 3, axis=-1), num_taps=2)
  for ta, tb in zip(a, b):
    np.testing.assert_allclose(ta, tb, rtol=1e-6, atol=1e-6)


def test_fewer_taps_are_a_prefix(golden, params, taps_fn):
  x = jnp.asarray(golden["x"][:2].transpose(0, 2, 3, 1))
  five = taps_fn(params, x)
  three = taps_fn(params, x, num_taps=3)
  assert len(three) == 3
  for a, b in zip(three, five):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("num_taps,convs", [(5, 16), (3, 8), (1, 2)])
def test_single_pass(params, num_taps, convs):
  # One conv per layer up to the last tap: no prefix is recomputed per tap.
  x = jnp.zeros((1, 32, 32, 1))
  jaxpr = jax.make_jaxpr(lambda p, x: vgg.vgg19_taps(p, x, num_taps))(params, x)
  assert str(jaxpr).count("conv_general_dilated") == convs


def test_gradient_through_taps(params):
  def loss(x):
    return sum(jnp.mean(t**2) for t in vgg.vgg19_taps(params, x, num_taps=2))
  grads = jax.jit(jax.grad(loss))(jax.random.uniform(jax.random.PRNGKey(0), (1, 8, 8, 1)))
  assert bool(jnp.all(jnp.isfinite(grads))) and float(jnp.max(jnp.abs(grads))) > 0


def test_odd_size_floor_pooling(params, taps_fn):
  taps = taps_fn(params, jnp.zeros((1, 37, 35, 1)))
  assert [t.shape[1:3] for t in taps] == [(37, 35), (18, 17), (9, 8), (4, 4), (2, 2)]


def test_bad_arguments(params):
  with pytest.raises(ValueError, match="num_taps"):
    vgg.vgg19_taps(params, jnp.zeros((1, 8, 8, 1)), num_taps=6)
  with pytest.raises(ValueError, match="shape"):
    vgg.vgg19_taps(params, jnp.zeros((1, 8, 8, 2)))


def test_params_from_torchvision_errors(torch_state):
  state = dict(torch_state)
  state["features.5.weight"] = np.zeros((128, 64, 1, 1), np.float32)
  with pytest.raises(vgg.VGGWeightsError, match=r"features\.5\.weight has shape"):
    vgg.params_from_torchvision(state)
  state = {k: v for k, v in torch_state.items() if k != "features.34.bias"}
  with pytest.raises(vgg.VGGWeightsError, match=r"missing features\.34\.bias"):
    vgg.params_from_torchvision(state)


def test_save_load_roundtrip(tmp_path, params):
  path = tmp_path / "vgg19.npz"
  vgg.save_params(path, params)
  loaded = vgg.load_params(path)
  assert [p.name for p in tmp_path.iterdir()] == ["vgg19.npz"]  # No temporary left behind.
  for name in vgg.LAYER_NAMES:
    np.testing.assert_array_equal(loaded[name]["kernel"], params[name]["kernel"])
    np.testing.assert_array_equal(loaded[name]["bias"], params[name]["bias"])


def test_load_errors(tmp_path, params):
  missing = tmp_path / "absent.npz"
  with pytest.raises(vgg.VGGWeightsError, match="not found.*convert_vgg19") as e:
    vgg.load_params(missing)
  assert "\n" not in str(e.value) and str(missing) in str(e.value)
  corrupt = tmp_path / "corrupt.npz"
  corrupt.write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(vgg.VGGWeightsError, match="not a readable VGG-19 weights file"):
    vgg.load_params(corrupt)
  partial = tmp_path / "partial.npz"
  np.savez(partial, **{"conv1_1/kernel": params["conv1_1"]["kernel"]})
  with pytest.raises(vgg.VGGWeightsError, match="conv1_1/bias.*convert_vgg19"):
    vgg.load_params(partial)
  assert issubclass(vgg.VGGWeightsError, torch_reader.WeightsError)


def _convert_main():
  return load_script("convert_vgg19").main


def test_convert_script(tmp_path, torch_state, params, capsys):
  src = tmp_path / "vgg19-dcbb9e9d.pth"
  # torchvision's file also holds the classifier; the converter ignores it.
  state = dict(torch_state, **{"classifier.6.bias": np.zeros(10, np.float32)})
  torch_reader.save_state_dict(src, state)
  dst = tmp_path / "vgg19.npz"
  assert _convert_main()([str(src), str(dst)]) == 0
  loaded = vgg.load_params(dst)
  for name in vgg.LAYER_NAMES:
    np.testing.assert_array_equal(loaded[name]["kernel"], params[name]["kernel"])


def test_convert_script_errors(tmp_path, capsys):
  main = _convert_main()
  dst = tmp_path / "out.npz"
  assert main([str(tmp_path / "absent.pth"), str(dst)]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "absent.pth" in err
  small = tmp_path / "small.pth"
  torch_reader.save_state_dict(small, {"features.0.weight": np.zeros((2, 3, 3, 3), np.float32)})
  assert main([str(small), str(dst)]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "features.0.weight has shape" in err
  assert not dst.exists()


def test_convert_script_stopped_by_sigterm_writes_nothing(tmp_path, torch_state, capsys,
                                                          monkeypatch):
  src, dst = tmp_path / "vgg19-dcbb9e9d.pth", tmp_path / "vgg19.npz"
  torch_reader.save_state_dict(src, torch_state)
  real_savez = files.np.savez

  def savez_then_sigterm(f, **arrays):  # The signal arrives with the file half-written.
    f.write(b"PK\x03\x04 partial")
    os.kill(os.getpid(), signal.SIGTERM)
    real_savez(f, **arrays)

  monkeypatch.setattr(files.np, "savez", savez_then_sigterm)
  handler = signal.getsignal(signal.SIGTERM)
  assert _convert_main()([str(src), str(dst)]) == 143
  err = capsys.readouterr().err
  assert err == f"stopped by SIGTERM: {dst} not written\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]  # No temporary file left.
  assert signal.getsignal(signal.SIGTERM) is handler  # Restored.
