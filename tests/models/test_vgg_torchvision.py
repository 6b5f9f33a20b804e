"""VGG-19 against torchvision itself: a genuine `torch.save` file, converted, gives its taps.

Builds `torchvision.models.vgg19(weights=None)` with a fixed seed (torchvision's own random
initialisation, no download; the conv biases, which it zeroes, are drawn too), writes its
whole `state_dict()` (classifier included, as in `vgg19-dcbb9e9d.pth`) with `torch.save`,
converts it with `bin/convert_vgg19.py` (which reads it without PyTorch, through
`mmdrfuse_jax.io.torch_reader`), loads the result with `vgg.load_params`, and checks that

* every converted array equals torchvision's tensor (OIHW -> HWIO for kernels), bit for bit;
* `vgg.vgg19_taps` on an NHWC batch (RGB, and gray, which it repeats to three channels)
  equals torchvision's `features` forward on the same batch in NCHW, after relu1_2, relu2_2,
  relu3_4, relu4_4 and relu5_4 (`features[3]`, `[8]`, `[17]`, `[26]`, `[35]`), to 1e-4 of
  each tap's largest value. Neither side normalises the input (`vgg19_taps` uses values as
  they are), so both get the same raw pixels; the size is odd and not square, so
  torchvision's floor-mode pooling and the H/W order are checked too.

PyTorch is not a dependency of the project: without `torch` and `torchvision` this module
skips. To run it, use a throwaway venv outside the repository, for example (checked with
torch 2.14.1, torchvision 0.29.1, jax 0.10.2, numpy 2.4.6, Python 3.11.7):

  python3 -m venv /work/venv-torch
  /work/venv-torch/bin/pip install torch torchvision jax flax optax orbax-checkpoint numpy \\
      pillow ml-collections absl-py 'etils[epath]' tqdm pytest
  PYTHONPATH=. /work/venv-torch/bin/python -m pytest -q tests/test_vgg_torchvision.py
"""

import functools

import jax
import numpy as np
import pytest
from conftest import load_script

from mmdrfuse_jax.models import vgg

_HOW = "PyTorch is not a project dependency; see this module's docstring to run it"
torch = pytest.importorskip("torch", reason=f"torch not importable ({_HOW})")
torchvision = pytest.importorskip("torchvision", reason=f"torchvision not importable ({_HOW})")

# torchvision `features` index of the ReLU whose output is each tap (see vgg.py's docstring).
_TAP_INDICES = (3, 8, 17, 26, 35)
_SEED = 20241127


@pytest.fixture(scope="module")
def model():
  torch.manual_seed(_SEED)
  net = torchvision.models.vgg19(weights=None)
  # torchvision's init zeroes the conv biases; give them values so their conversion counts.
  with torch.no_grad():
    for layer in net.features:
      if isinstance(layer, torch.nn.Conv2d):
        layer.bias.normal_(0.0, 0.05)
  return net.eval()


@pytest.fixture(scope="module")
def converted(model, tmp_path_factory):
  """Parameters read back from the converter's output for `model`'s `torch.save` file."""
  tmp = tmp_path_factory.mktemp("vgg19_torchvision")
  src, dst = tmp / "vgg19-random.pth", tmp / "vgg19.npz"
  torch.save(model.state_dict(), src)
  assert load_script("convert_vgg19").main([str(src), str(dst)]) == 0
  src.unlink()  # ~550 MB, mostly the classifier.
  return vgg.load_params(dst)


def test_layer_indices_match_torchvision(model):
  features = model.features
  assert len(features) == 37
  for name, index, cin, cout in vgg.LAYERS:
    conv = features[index]
    assert isinstance(conv, torch.nn.Conv2d), name
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (
        cin, cout, (3, 3), (1, 1)), name
  for index in _TAP_INDICES:
    assert isinstance(features[index], torch.nn.ReLU)
    assert isinstance(features[index + 1], torch.nn.MaxPool2d)
  # The last tap ends the conv stack: only the final max-pool follows it.
  assert _TAP_INDICES[-1] == len(features) - 2


def test_converted_params_equal_torchvision(model, converted):
  state = model.state_dict()
  for name, index, _, _ in vgg.LAYERS:
    weight = state[f"features.{index}.weight"].numpy()
    bias = state[f"features.{index}.bias"].numpy()
    np.testing.assert_array_equal(converted[name]["kernel"], weight.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(converted[name]["bias"], bias)
    assert np.all(bias != 0), name  # The model fixture's biases, not torchvision's zeros.


def _torchvision_taps(model, x_nchw: np.ndarray) -> list[np.ndarray]:
  taps = []
  with torch.no_grad():
    y = torch.from_numpy(x_nchw)
    for index, layer in enumerate(model.features[:_TAP_INDICES[-1] + 1]):
      y = layer(y)
      if index in _TAP_INDICES:
        taps.append(y.numpy().transpose(0, 2, 3, 1).copy())  # NCHW -> NHWC, own copy.
  return taps


@pytest.mark.parametrize("channels", [3, 1])
def test_taps_match_torchvision(model, converted, channels):
  rng = np.random.default_rng(_SEED)
  x = rng.uniform(0.0, 1.0, (2, 67, 45, channels)).astype(np.float32)  # NHWC, [0, 1] pixels.
  # vgg19_taps repeats a gray channel to three, as the published code does before VGG.
  x_nchw = np.ascontiguousarray(np.repeat(x, 3 // channels, axis=-1).transpose(0, 3, 1, 2))
  ref = _torchvision_taps(model, x_nchw)
  taps_fn = jax.jit(functools.partial(vgg.vgg19_taps, precision=jax.lax.Precision.HIGHEST))
  got = taps_fn(converted, x)
  assert len(got) == len(ref) == vgg.NUM_TAPS
  for name, g, r in zip(vgg.TAP_NAMES, got, ref):
    g = np.asarray(g, np.float64)
    assert g.shape == r.shape, name
    scale = float(np.max(np.abs(r)))
    assert scale > 0 and np.count_nonzero(r) > r.size // 10, f"{name} vanished"
    rel = float(np.max(np.abs(g - r))) / scale
    print(f"{name} {tuple(r.shape)}: max |diff| / max |torchvision| = {rel:.3g}")
    assert rel < 1e-4, name
