"""Network weights: the published PyTorch files and the project's own formats.

Three formats are read by `load_params`, chosen by what the path is:
- a PyTorch zip checkpoint (`.model`, `.pth`, `.pt`: the published weights), read by the
  restricted reader of `torch_reader` (no PyTorch, no code execution);
- a `.npz` file of the project (arrays named `conv1/kernel`, ...; read with
  `allow_pickle=False`), the handy single-file format for the 0.44 KB student;
- a directory holding an orbax checkpoint of the parameter tree.

Every problem with a file (missing, truncated, wrong layers or shapes, a teacher given as a
student) is a `WeightsError` whose one-line message names the file and the problem.
"""

from __future__ import annotations

import os
import pathlib
import zipfile
from typing import Any, Mapping

import jax
import numpy as np

from mmdrfuse_jax.io import files
from mmdrfuse_jax.io.torch_reader import WeightsError, load_state_dict
from mmdrfuse_jax.models import networks

__all__ = ["WeightsError", "expected_shapes", "load_params", "params_from_state_dict",
           "params_to_state_dict", "save_params"]


def expected_shapes(model: str) -> dict[str, dict[str, tuple[int, ...]]]:
  """Flax parameter shapes per layer of `model`, e.g. {"conv1": {"kernel": (3,3,2,4), ...}}."""
  shapes = jax.eval_shape(lambda: networks.init_params(model, jax.random.key(0)))
  return {layer: {k: tuple(v.shape) for k, v in p.items()} for layer, p in shapes.items()}


def _check_layers(source: str, layers: set[str], model: str) -> None:
  """Raises WeightsError when `layers` are not exactly `model`'s layers."""
  expected = set(networks.layer_names(model))
  if layers == expected:
    return
  found = networks.find_model(layers)
  if found is not None:
    raise WeightsError(f"{source}: holds {found} weights, but the {model} was asked for")
  missing = sorted(expected - layers)
  extra = sorted(layers - expected)
  parts = []
  if missing:
    parts.append(f"missing layers {', '.join(missing)}")
  if extra:
    parts.append(f"unexpected layers {', '.join(extra)}")
  raise WeightsError(f"{source}: not {model} weights ({'; '.join(parts)})")


def _validated(source: str, flat: Mapping[tuple[str, str], np.ndarray], model: str) -> dict:
  """Builds the Flax tree from {(layer, "kernel"|"bias"): array}, checking every entry."""
  _check_layers(source, {layer for layer, _ in flat}, model)
  params: dict[str, dict[str, np.ndarray]] = {}
  for layer, shapes in expected_shapes(model).items():
    params[layer] = {}
    for name, shape in shapes.items():
      if (layer, name) not in flat:
        raise WeightsError(f"{source}: missing {layer} {name}")
      value = np.asarray(flat[(layer, name)])
      if value.shape != shape:
        raise WeightsError(f"{source}: {layer} {name} has shape {value.shape}, expected {shape}")
      if not np.issubdtype(value.dtype, np.floating):
        raise WeightsError(f"{source}: {layer} {name} has dtype {value.dtype}, expected floats")
      if not np.all(np.isfinite(value)):
        raise WeightsError(f"{source}: {layer} {name} holds non-finite values")
      params[layer][name] = value.astype(np.float32)
  unexpected = set(flat) - {(ly, n) for ly, s in expected_shapes(model).items() for n in s}
  if unexpected:
    raise WeightsError(f"{source}: unexpected entries {sorted('/'.join(k) for k in unexpected)}")
  return params


def params_from_state_dict(state: Mapping[str, np.ndarray], model: str,
                           source: str = "state dict") -> dict:
  """Converts a published PyTorch state dict (`<layer>.1.weight`, OIHW) to Flax params (HWIO)."""
  flat = {}
  for key, value in state.items():
    parts = key.split(".")
    if len(parts) != 3 or parts[1] != "1" or parts[2] not in ("weight", "bias"):
      raise WeightsError(f"{source}: unexpected entry {key!r} (expected '<layer>.1.weight|bias')")
    value = np.asarray(value)
    if parts[2] == "weight":
      if value.ndim != 4:
        raise WeightsError(f"{source}: {key} has shape {value.shape}, expected a 4-D OIHW kernel")
      flat[(parts[0], "kernel")] = value.transpose(2, 3, 1, 0)
    else:
      flat[(parts[0], "bias")] = value
  return _validated(source, flat, model)


def params_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of `params_from_state_dict`: Flax params to a published-style state dict."""
  state = {}
  for layer, p in params.items():
    state[f"{layer}.1.weight"] = np.asarray(p["kernel"], np.float32).transpose(3, 2, 0, 1)
    state[f"{layer}.1.bias"] = np.asarray(p["bias"], np.float32)
  return state


def _load_npz(path: pathlib.Path, model: str) -> dict:
  try:
    tree = files.read_npz_tree(path)
  except ValueError as e:
    # allow_pickle=False refuses object arrays (which could run code) with a ValueError.
    raise WeightsError(f"{path}: not a plain-array .npz weights file ({e})") from None
  except (OSError, zipfile.BadZipFile, EOFError) as e:
    raise WeightsError(f"{path}: corrupt or truncated .npz ({type(e).__name__}: {e})") from None
  flat = {(layer, name): value
          for layer, entries in tree.items() for name, value in entries.items()}
  return _validated(str(path), flat, model)


def _checkpoint_item(path: pathlib.Path) -> pathlib.Path:
  """The orbax item folder that `path` names.

  `path` may be the item itself (what `save_params` writes), one step of a training run's
  `CheckpointManager` (`WORKDIR/checkpoints/900`: its `default` item), the manager's folder
  (`WORKDIR/checkpoints`: its newest committed step) or the run's folder (`WORKDIR`).
  """
  def steps(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted((p for p in folder.iterdir() if p.name.isdigit()
                   and (p / "default").is_dir() and (p / "commit_success.txt").is_file()),
                  key=lambda p: int(p.name)) if folder.is_dir() else []

  if (path / "default").is_dir():
    return path / "default"
  for root in (path, path / "checkpoints"):
    found = steps(root)
    if found:
      return found[-1] / "default"
  return path


def _load_orbax(path: pathlib.Path, model: str) -> dict:
  import orbax.checkpoint as ocp

  item = _checkpoint_item(path).resolve()
  try:
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(item)
    tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
    if isinstance(tree, Mapping) and isinstance(tree.get("params"), Mapping):
      # A training state: read its parameters alone, as NumPy arrays (not the optimiser
      # state or the refresh memories, which may be large and sharded over other devices).
      params = tree["params"]
      restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(
          item={"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), params)},
          restore_args={"params": jax.tree.map(
              lambda m: ocp.RestoreArgs(restore_type=np.ndarray), params)},
          transforms={}))["params"]
    else:
      restored = ocp.StandardCheckpointer().restore(item)
  except Exception as e:  # orbax raises many types for a folder that is not a checkpoint.
    raise WeightsError(
        f"{path}: not a readable orbax checkpoint ({type(e).__name__}: {e})") from None
  if not isinstance(restored, Mapping):
    raise WeightsError(f"{path}: the orbax checkpoint does not hold a parameter tree")
  flat = {}
  for layer, p in restored.items():
    if not isinstance(p, Mapping):
      raise WeightsError(f"{path}: entry {layer!r} is not a layer of parameters")
    for name, value in p.items():
      flat[(layer, name)] = np.asarray(value)
  return _validated(str(path), flat, model)


def load_params(path: str | os.PathLike, model: str = "student") -> dict:
  """Loads the weights of `model` ("student" or "teacher") from any supported format.

  Raises:
    WeightsError: the file is missing or unusable; the message says why.
  """
  networks.check_model_name(model)
  path = pathlib.Path(path)
  if path.is_dir():
    return _load_orbax(path, model)
  if not path.is_file():
    raise WeightsError(f"{path}: no such weights file")
  if path.suffix == ".npz":
    return _load_npz(path, model)
  return params_from_state_dict(load_state_dict(path), model, str(path))


def save_params(path: str | os.PathLike, params: Mapping[str, Any]) -> None:
  """Saves a parameter tree: `.npz` single file, else an orbax checkpoint directory.

  Both are written under a temporary name and renamed, so an interrupted save never
  leaves a half-written weights file behind.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  host = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
  if path.suffix == ".npz":
    files.write_npz_tree(path, host)
    return
  import orbax.checkpoint as ocp

  # Orbax itself writes to a temporary directory and renames it when complete.
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path.resolve(), host, force=True)
  checkpointer.wait_until_finished()
