"""Network weights: the published PyTorch files and the project's own formats.

Three formats are read by `load_params`, chosen by what the path is:
- a PyTorch zip checkpoint (`.model`, `.pth`, `.pt`: the published weights), read by the
  restricted reader of `torch_reader` (no PyTorch, no code execution);
- a `.npz` file of the project (arrays named `conv1/kernel`, ...; never unpickled), the
  handy single-file format for the 0.44 KB student;
- a directory holding an orbax checkpoint of the parameter tree.

The network is the one whose layers the file holds, unless the caller names one. The layers,
names, shapes and dtypes a file declares (in its pickle, `.npy` headers or orbax metadata) are
checked against that network's before any array is read, so a file declaring more than the
network needs is refused without being read (see `torch_reader`).

Every problem with a file (missing, truncated, wrong layers or shapes, a teacher given as a
student) is a `WeightsError` whose one-line message names the file and the problem.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pathlib
import re
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from mmdrfuse_jax.io import files, torch_reader
from mmdrfuse_jax.io.torch_reader import ArrayInfo, WeightsError
from mmdrfuse_jax.models import networks
from mmdrfuse_jax.runtime import cli

__all__ = ["WeightsError", "expected_shapes", "load_params", "params_from_state_dict",
           "params_to_state_dict", "save_params"]


def expected_shapes(model: str) -> dict[str, dict[str, tuple[int, ...]]]:
  """Flax parameter shapes per layer of `model`, e.g. {"conv1": {"kernel": (3,3,2,4), ...}}."""
  return {layer: dict(shapes) for layer, shapes in _expected_shapes(model).items()}


@functools.lru_cache(maxsize=None)
def _expected_shapes(model: str) -> dict[str, dict[str, tuple[int, ...]]]:
  # Cached: each weights file is checked against them twice, and tracing the teacher to get
  # them takes a fifth of a second.
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


def _model_of_layers(source: str, layers: set[str], model: str | None) -> str:
  """The network `layers` are meant for: `model`, or (None) the one whose layers they are.

  Raises:
    WeightsError: the layers are not `model`'s, or (None) neither network's; the message
      names what differs from the network asked for, or else from the closer one.
  """
  if model is None:
    model = networks.find_model(layers) or min(
        networks.MODEL_LAYERS, key=lambda name: len(layers ^ set(networks.layer_names(name))))
  _check_layers(source, layers, model)
  return model


def _check_entries(source: str, declared: Mapping[tuple[str, str], ArrayInfo],
                   model: str | None) -> str:
  """Checks the entries a file declares ({(layer, "kernel"|"bias"): shape and dtype}).

  Everything here is known before an array's data is read: the layers, the names, the
  shapes and the dtypes.

  Returns:
    The network the entries are (`model`, when given).

  Raises:
    WeightsError: an entry is missing, unexpected, of another shape or not floats, or the
      layers are another network's than `model`.
  """
  model = _model_of_layers(source, {layer for layer, _ in declared}, model)
  expected = expected_shapes(model)
  for layer, shapes in expected.items():
    for name, shape in shapes.items():
      if (layer, name) not in declared:
        raise WeightsError(f"{source}: missing {layer} {name}")
      info = declared[(layer, name)]
      if info.shape != shape:
        raise WeightsError(f"{source}: {layer} {name} has shape {info.shape}, expected {shape}")
      if not np.issubdtype(info.dtype, np.floating):
        raise WeightsError(f"{source}: {layer} {name} has dtype {info.dtype}, expected floats")
  unexpected = set(declared) - {(ly, n) for ly, s in expected.items() for n in s}
  if unexpected:
    raise WeightsError(f"{source}: unexpected entries {sorted('/'.join(k) for k in unexpected)}")
  return model


def _validated(source: str, flat: Mapping[tuple[str, str], np.ndarray], model: str | None
               ) -> dict:
  """Builds the Flax tree from {(layer, "kernel"|"bias"): array}, checking every entry."""
  arrays = {key: np.asarray(value) for key, value in flat.items()}
  model = _check_entries(
      source, {key: ArrayInfo(a.shape, a.dtype) for key, a in arrays.items()}, model)
  params: dict[str, dict[str, np.ndarray]] = {}
  for layer, shapes in expected_shapes(model).items():
    params[layer] = {}
    for name in shapes:
      value = arrays[(layer, name)]
      if not np.all(np.isfinite(value)):
        raise WeightsError(f"{source}: {layer} {name} holds non-finite values")
      params[layer][name] = value.astype(np.float32)
  return params


def _published_entry(source: str, key: str, shape: tuple[int, ...]
                     ) -> tuple[tuple[str, str], tuple[int, ...] | None]:
  """(layer, "kernel"|"bias") of a published state dict's `key`, and the axes that take an
  OIHW kernel to HWIO (None for a bias)."""
  parts = key.split(".")
  if len(parts) != 3 or parts[1] != "1" or parts[2] not in ("weight", "bias"):
    raise WeightsError(f"{source}: unexpected entry {key!r} (expected '<layer>.1.weight|bias')")
  if parts[2] == "bias":
    return (parts[0], "bias"), None
  if len(shape) != 4:
    raise WeightsError(f"{source}: {key} has shape {shape}, expected a 4-D OIHW kernel")
  return (parts[0], "kernel"), (2, 3, 1, 0)


def params_from_state_dict(state: Mapping[str, np.ndarray], model: str | None = None,
                           source: str = "state dict") -> dict:
  """Converts a published PyTorch state dict (`<layer>.1.weight`, OIHW) to Flax params (HWIO).

  Args:
    state: the state dict.
    model: "student" or "teacher"; None: the network whose layers `state` has.
    source: what the message of an error names.
  """
  flat = {}
  for key, value in state.items():
    value = np.asarray(value)
    entry, axes = _published_entry(source, key, value.shape)
    flat[entry] = value if axes is None else value.transpose(axes)
  return _validated(source, flat, model)


def params_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of `params_from_state_dict`: Flax params to a published-style state dict."""
  state = {}
  for layer, p in params.items():
    state[f"{layer}.1.weight"] = np.asarray(p["kernel"], np.float32).transpose(3, 2, 0, 1)
    state[f"{layer}.1.bias"] = np.asarray(p["bias"], np.float32)
  return state


def _load_state_dict(path: pathlib.Path, model: str | None) -> dict:
  """A published PyTorch checkpoint, its tensors checked from the pickle before any is read."""
  source = str(path)
  chosen: list[str] = []  # The network `expect` found, for the conversion after the read.

  def expect(infos: Mapping[str, ArrayInfo]) -> dict[str, tuple[int, ...]]:
    declared = {}
    for key, info in infos.items():
      entry, axes = _published_entry(source, key, info.shape)
      shape = info.shape if axes is None else tuple(info.shape[a] for a in axes)
      declared[entry] = ArrayInfo(shape, info.dtype)
    chosen.append(_check_entries(source, declared, model))
    return {key: info.shape for key, info in infos.items()}

  state = torch_reader.load_state_dict(path, expect)
  return params_from_state_dict(state, chosen[0], source)


def _npz_entry(key: str) -> tuple[str, str]:
  layer, _, name = key.partition("/")
  return layer, name


def _load_npz(path: pathlib.Path, model: str | None) -> dict:
  """The project's `.npz`, its members checked from their headers before any is read."""
  source = str(path)
  chosen: list[str] = []  # The network `expect` found, for the conversion after the read.

  def expect(infos: Mapping[str, ArrayInfo]) -> dict[str, tuple[int, ...]]:
    chosen.append(_check_entries(
        source, {_npz_entry(key): info for key, info in infos.items()}, model))
    return {key: info.shape for key, info in infos.items()}

  arrays = torch_reader.load_npz(path, expect)
  return _validated(source, {_npz_entry(key): a for key, a in arrays.items()}, chosen[0])


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


_event_loop_reports_ignored = False


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
  """Keeps orbax's reports of an unreadable checkpoint off stderr: its error says it all.

  While reading, orbax logs absl warnings and errors ("Failed to get item metadata ...",
  "Failed to json parse Metadata file ..."); after a failed read, tensorstore's threads may
  call back into orbax's closed asyncio loop, which Python reports (through
  `sys.unraisablehook`) as "Event loop is closed" tracebacks, even after the tool has
  printed its one-line error. None says more than the error does: the read either fails
  with it or gives parameters that are checked whole.
  """
  global _event_loop_reports_ignored
  if not _event_loop_reports_ignored:  # Once per process: the hook stays for late reports.
    cli.ignore_closed_event_loop_reports()
    _event_loop_reports_ignored = True
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def _orbax_reason(error: Exception) -> str:
  """The first line of an orbax/tensorstore error, without tensorstore's JSON spec."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = re.sub(r"\s*\[tensorstore_spec=.*$", "", text)
  if len(text) > 500:
    text = text[:500] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _declared_entries(tree: Any) -> dict[tuple[str, str], ArrayInfo] | None:
  """{(layer, name): shape and dtype} from an orbax metadata tree, if it is a tree of layers."""
  if not isinstance(tree, Mapping):
    return None
  declared = {}
  for layer, entries in tree.items():
    if not isinstance(entries, Mapping):
      return None
    for name, meta in entries.items():
      shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
      if shape is None or dtype is None:
        return None
      declared[(str(layer), str(name))] = ArrayInfo(tuple(shape), np.dtype(dtype))
  return declared


def _load_orbax(path: pathlib.Path, model: str | None) -> dict:
  import orbax.checkpoint as ocp

  item = _checkpoint_item(path).resolve()
  source = str(path)
  try:
    with _quiet_orbax():
      checkpointer = ocp.PyTreeCheckpointer()
      tree = checkpointer.metadata(item)
      tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
      if isinstance(tree, Mapping) and isinstance(tree.get("params"), Mapping):
        # A training state: read its parameters alone, as NumPy arrays (not the optimiser
        # state or the refresh memories, which may be large and sharded over other devices).
        params = tree["params"]
        declared = _declared_entries(params)
        if declared is not None:  # Checked before anything is restored.
          model = _check_entries(source, declared, model)
        restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(
            item={"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), params)},
            restore_args={"params": jax.tree.map(
                lambda m: ocp.RestoreArgs(restore_type=np.ndarray), params)},
            transforms={}))["params"]
      else:
        declared = _declared_entries(tree)
        if declared is not None:
          model = _check_entries(source, declared, model)
        restored = ocp.StandardCheckpointer().restore(item)
  except WeightsError:
    raise
  except Exception as e:  # orbax raises many types for a folder that is not a checkpoint.
    raise WeightsError(f"{path}: not a readable orbax checkpoint ({_orbax_reason(e)})") from None
  if not isinstance(restored, Mapping):
    raise WeightsError(f"{path}: the orbax checkpoint does not hold a parameter tree")
  flat = {}
  for layer, p in restored.items():
    if not isinstance(p, Mapping):
      raise WeightsError(f"{path}: entry {layer!r} is not a layer of parameters")
    for name, value in p.items():
      flat[(layer, name)] = np.asarray(value)
  return _validated(source, flat, model)


def load_params(path: str | os.PathLike, model: str | None = None) -> dict:
  """Loads network weights from any supported format.

  Args:
    path: a published PyTorch checkpoint, the project's `.npz` or an orbax checkpoint folder.
    model: "student" or "teacher": the network the weights must be; None: the one whose
      layers the file holds.

  Raises:
    WeightsError: the file is missing or unusable, or holds the other network than `model`;
      the message says why. Sizes are checked from what the file declares before its arrays
      are read.
  """
  if model is not None:
    networks.check_model_name(model)
  path = pathlib.Path(path)
  if path.is_dir():
    return _load_orbax(path, model)
  if not path.is_file():
    raise WeightsError(f"{path}: no such weights file")
  if path.suffix == ".npz":
    return _load_npz(path, model)
  return _load_state_dict(path, model)


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
