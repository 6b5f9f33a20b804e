"""VGG-19 perception network: torchvision's `vgg19().features` up to relu5_4, in NHWC.

The losses of MMDRFuse compare images through five taps of torchvision's VGG-19
(configuration "E"): the outputs after relu1_2, relu2_2, relu3_4, relu4_4 and relu5_4
(`features[:4]`, `[:9]`, `[:18]`, `[:27]`, `[:36]`). `vgg19_taps` computes all of them in a
single pass over the stack; the published code recomputed every prefix once per tap.

Parameters are a dict `{"conv1_1": {"kernel": (3, 3, I, O), "bias": (O,)}, ...}` of float32
arrays (HWIO kernels). They are frozen during training. The project stores them as one `.npz`
of plain arrays with keys `conv1_1/kernel`, `conv1_1/bias`, ...; `bin/convert_vgg19.py` writes
that file from torchvision's `vgg19-dcbb9e9d.pth`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmdrfuse_jax.io import files, torch_reader

# Channels per conv of each block (configuration "E"); a 2x2/2 max-pool ends blocks 1..4.
_BLOCKS = ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512),
           (512, 512, 512, 512))

NUM_TAPS = len(_BLOCKS)
TAP_NAMES = ("relu1_2", "relu2_2", "relu3_4", "relu4_4", "relu5_4")

HOW_TO_GET = ("download torchvision's vgg19-dcbb9e9d.pth "
              "(https://download.pytorch.org/models/vgg19-dcbb9e9d.pth) and run "
              "`python bin/convert_vgg19.py vgg19-dcbb9e9d.pth DST.npz`")


class VGGWeightsError(torch_reader.WeightsError):
  """Missing, corrupt or mismatched VGG-19 weights (message is one line)."""


def _layer_specs() -> list[tuple[str, int, int, int]]:
  """(name, torchvision `features` index, in channels, out channels) of every conv, in order."""
  specs = []
  index, cin = 0, 3
  for b, block in enumerate(_BLOCKS, start=1):
    for i, cout in enumerate(block, start=1):
      specs.append((f"conv{b}_{i}", index, cin, cout))
      index += 2  # conv, relu
      cin = cout
    index += 1  # max-pool
  return specs


LAYERS = tuple(_layer_specs())
LAYER_NAMES = tuple(name for name, *_ in LAYERS)


def param_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
  """Expected shapes of the parameter tree (HWIO kernels)."""
  return {name: {"kernel": (3, 3, cin, cout), "bias": (cout,)} for name, _, cin, cout in LAYERS}


def _conv_relu(x: jax.Array, layer: Mapping[str, jax.Array], precision) -> jax.Array:
  y = jax.lax.conv_general_dilated(
      x, layer["kernel"].astype(x.dtype), window_strides=(1, 1), padding=((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
  return jax.nn.relu(y + layer["bias"].astype(x.dtype))


def _max_pool(x: jax.Array) -> jax.Array:
  # torchvision MaxPool2d(2, 2): floor mode, odd trailing rows/columns dropped.
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def vgg19_taps(params: Mapping[str, Mapping[str, jax.Array]], x: jax.Array,
               num_taps: int = NUM_TAPS, precision=None, dtype=jnp.float32
               ) -> tuple[jax.Array, ...]:
  """The first `num_taps` VGG-19 taps of `x`, computed in one pass.

  Args:
    params: VGG-19 parameter tree (see module docstring).
    x: (B, H, W, 1) gray images (repeated to 3 channels, as the published code does) or
      (B, H, W, 3). Values are used as they are (no ImageNet normalisation).
    num_taps: how many taps to return (1..5); the stack stops after the last one needed.
    precision: passed to the convolutions (None: the backend's default).
    dtype: what the stack computes in (the float32 parameters are cast to it); the taps
      are returned as float32 either way (see `precision.py`).

  Returns:
    Tuple of `num_taps` float32 NHWC arrays: relu1_2 (H), relu2_2 (H/2), relu3_4 (H/4),
    relu4_4 (H/8), relu5_4 (H/16), with torchvision's floor-mode pooling.
  """
  if not 1 <= num_taps <= NUM_TAPS:
    raise ValueError(f"num_taps must be in 1..{NUM_TAPS}, got {num_taps}")
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"expected (B, H, W, 1) or (B, H, W, 3) images, got shape {x.shape}")
  x = jnp.asarray(x, dtype)
  if x.shape[-1] == 1:
    x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
  taps = []
  for b, block in enumerate(_BLOCKS, start=1):
    if b > 1:
      x = _max_pool(x)
    for i in range(1, len(block) + 1):
      x = _conv_relu(x, params[f"conv{b}_{i}"], precision)
    taps.append(x.astype(jnp.float32))
    if len(taps) == num_taps:
      break
  return tuple(taps)


def check_params(params: Mapping[str, Mapping[str, np.ndarray]], source: str = "VGG-19 params"
                 ) -> None:
  """Raises VGGWeightsError (one line) if `params` lacks a layer or has a wrong shape."""
  for name, shapes in param_shapes().items():
    if name not in params:
      raise VGGWeightsError(f"{source}: missing layer {name}")
    for kind, shape in shapes.items():
      got = getattr(params[name].get(kind), "shape", None)
      if got != shape:
        raise VGGWeightsError(f"{source}: {name}/{kind} has shape {got}, expected {shape}")


def _torchvision_keys() -> list[tuple[str, str, str, tuple[int, ...]]]:
  """(layer, "kernel"|"bias", torchvision key, OIHW shape) of every array the tree takes."""
  return [(name, kind, key, shape) for name, index, cin, cout in LAYERS
          for kind, key, shape in (("kernel", f"features.{index}.weight", (cout, cin, 3, 3)),
                                   ("bias", f"features.{index}.bias", (cout,)))]


def _check_torchvision_shapes(shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
  """Raises VGGWeightsError unless `shapes` ({key: shape}) has every conv of torchvision's vgg19."""
  for _, _, key, shape in _torchvision_keys():
    if key not in shapes:
      raise VGGWeightsError(f"{source}: missing {key}; is this torchvision's vgg19?")
    if tuple(shapes[key]) != shape:
      raise VGGWeightsError(
          f"{source}: {key} has shape {tuple(shapes[key])}, expected {shape}; is this "
          "torchvision's vgg19?")


def params_from_torchvision(state_dict: Mapping[str, np.ndarray], source: str = "state dict"
                            ) -> dict[str, dict[str, np.ndarray]]:
  """Converts torchvision `vgg19` weights (`features.N.weight/bias`, OIHW) to the tree (HWIO).

  Other keys (the classifier) are ignored.
  """
  _check_torchvision_shapes({k: np.shape(v) for k, v in state_dict.items()}, source)
  params: dict[str, dict[str, np.ndarray]] = {}
  for name, kind, key, _ in _torchvision_keys():
    value = np.asarray(state_dict[key]).astype(np.float32)
    params.setdefault(name, {})[kind] = (
        np.ascontiguousarray(value.transpose(2, 3, 1, 0)) if kind == "kernel" else value)
  return params


def random_params(seed: int = 20241127) -> dict[str, dict[str, np.ndarray]]:
  """Seeded random He-normal weights, following the recipe of the reference's golden taps.

  For each conv in order: weight = N(0,1) of shape (out, in, 3, 3) * sqrt(2 / (in * 9)), then
  bias = N(0,1) * 0.01 of shape (out,), drawn in float64 from `np.random.default_rng(seed)` and
  cast to float32. Used by tests and by the quickstart when no real VGG weights are configured
  (its perception loss is then only a structural stand-in).
  """
  rng = np.random.default_rng(seed)
  state = {}
  for _, index, cin, cout in LAYERS:
    weight = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))
    bias = rng.standard_normal(cout) * 0.01
    state[f"features.{index}.weight"] = weight.astype(np.float32)
    state[f"features.{index}.bias"] = bias.astype(np.float32)
  return params_from_torchvision(state, source="random VGG-19")


def save_params(path: str | os.PathLike, params: Mapping[str, Mapping[str, np.ndarray]]) -> None:
  """Writes the tree as one `.npz` of float32 arrays (`conv1_1/kernel`, ...), atomically."""
  path = pathlib.Path(path)
  check_params(params, source=str(path))
  files.write_npz_tree(path, {name: {kind: np.asarray(params[name][kind], np.float32)
                                     for kind in ("kernel", "bias")} for name in LAYER_NAMES})


def load_params(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
  """Reads weights written by `save_params`; raises VGGWeightsError with a one-line message.

  Every array's shape is checked from its `.npy` header before any data is read (other
  members are not read), so a file declaring more than VGG-19 needs is refused unread.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise VGGWeightsError(f"{path}: VGG-19 weights not found; {HOW_TO_GET}")

  def expect(infos: Mapping[str, torch_reader.ArrayInfo]) -> dict[str, tuple[int, ...]]:
    wanted = {}
    for name, shapes in param_shapes().items():
      for kind, shape in shapes.items():
        key = f"{name}/{kind}"
        if key not in infos:
          raise VGGWeightsError(f"{path}: missing {key}")
        if infos[key].shape != shape:
          raise VGGWeightsError(f"{path}: {key} has shape {infos[key].shape}, expected {shape}")
        if not np.issubdtype(infos[key].dtype, np.floating):
          raise VGGWeightsError(f"{path}: {key} has dtype {infos[key].dtype}, expected floats")
        wanted[key] = shape
    return wanted

  try:
    arrays = torch_reader.load_npz(path, expect)
  except VGGWeightsError as e:
    raise VGGWeightsError(f"{e}; {HOW_TO_GET}") from None
  except torch_reader.WeightsError as e:
    problem = str(e).removeprefix(f"{path}: ")
    raise VGGWeightsError(
        f"{path}: not a readable VGG-19 weights file ({problem}); {HOW_TO_GET}") from None
  return {name: {k: arrays[f"{name}/{k}"].astype(np.float32) for k in ("kernel", "bias")}
          for name in LAYER_NAMES}


def convert_torchvision_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Reads torchvision's vgg19 `.pth` (no PyTorch needed) and writes the project's `.npz`.

  Only the convolutions' tensors are read (not the classifier's, 400 MB of the 548), each
  checked from the pickle before its storage is read.

  Raises:
    torch_reader.WeightsError (or its subclass VGGWeightsError): unreadable or wrong `src`.
    OSError: `dst` cannot be written.
  """
  def expect(infos: Mapping[str, torch_reader.ArrayInfo]) -> dict[str, tuple[int, ...]]:
    _check_torchvision_shapes({key: info.shape for key, info in infos.items()}, str(src))
    return {key: shape for _, _, key, shape in _torchvision_keys()}

  state = torch_reader.load_state_dict(src, expect)
  save_params(dst, params_from_torchvision(state, source=str(src)))
