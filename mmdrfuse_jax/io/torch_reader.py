"""A restricted reader (and a small writer) of PyTorch's zip checkpoint format.

`torch.save` writes a zip archive holding `<name>/data.pkl`, a pickle of the state dict whose
tensors point, through pickle "persistent ids", at raw storages `<name>/data/<key>`. Loading
such a pickle with `pickle.load` would run whatever callables it names, so this module
unpickles with an allow-list: the only globals it resolves are `collections.OrderedDict`,
the tensor-rebuilding functions and the storage types, each mapped to a NumPy stand-in. Any
other global (for example `os.system` or `builtins.eval`) stops loading with a
`WeightsError` before anything runs. PyTorch itself is never imported.
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import struct
import zipfile
from typing import Mapping

import numpy as np

from mmdrfuse_jax.errors import MMDRFuseError
from mmdrfuse_jax.io import files


class WeightsError(MMDRFuseError, ValueError):
  """A weights file cannot be used; the message names the file and the problem."""


# Storage type name (as pickled by torch) -> NumPy dtype.
_STORAGE_DTYPES: dict[str, type[np.generic] | str] = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    # bfloat16 has no NumPy dtype: read the bits and widen to float32 below.
    "BFloat16Storage": "bfloat16",
}


class _StorageType:
  """Stands in for `torch.<X>Storage`; only its dtype is used."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args):
  """NumPy version of `torch._utils._rebuild_tensor_v2` (and `_rebuild_tensor`)."""
  size, stride = tuple(size), tuple(stride)
  if not size:
    return storage[storage_offset].copy()
  needed = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
  if any(n == 0 for n in size):
    return np.zeros(size, storage.dtype)
  if needed > storage.size:
    raise _CorruptError(
        f"tensor of size {size} does not fit its storage of {storage.size} elements")
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=size, strides=[s * storage.itemsize for s in stride])
  return np.array(view)  # Contiguous copy, independent of the storage buffer.


def _rebuild_parameter(data, *unused_args):
  """`torch._utils._rebuild_parameter`: a parameter is its tensor here."""
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}
_ALLOWED_GLOBALS.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})


class _CorruptError(Exception):
  pass


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a state dict, resolving only allow-listed globals to NumPy stand-ins."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix
    self._byteorder = byteorder
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"refusing to load {module}.{name}: a weights file may only hold tensors") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError("storage of an unknown type")
    key = str(key)
    if key not in self._storages:
      try:
        raw = self._archive.read(f"{self._prefix}data/{key}")
      except KeyError:
        raise _CorruptError(f"storage {key} is missing from the archive") from None
      if storage_type.dtype == "bfloat16":
        bits = np.frombuffer(raw, dtype=self._byteorder + "u2").astype(np.uint32) << 16
        array = bits.view(np.float32)
      else:
        array = np.frombuffer(raw, dtype=np.dtype(storage_type.dtype).newbyteorder(self._byteorder))
        array = array.astype(array.dtype.newbyteorder("="))
      if array.size < numel:
        raise _CorruptError(f"storage {key} holds {array.size} elements, expected {numel}")
      self._storages[key] = array
    return self._storages[key]


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch `state_dict` saved with `torch.save` into NumPy arrays.

  Args:
    path: a `.pth`/`.pt`/`.model` file in PyTorch's zip format (PyTorch >= 1.6).

  Returns:
    The state dict's entries, in file order, as float/int NumPy arrays.

  Raises:
    WeightsError: the file is missing, truncated, not a PyTorch zip checkpoint, not a
      mapping of names to tensors, or names any Python object other than tensors.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise WeightsError(f"{path}: no such weights file")
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(8)
    if head[:1] == b"\x80":
      raise WeightsError(
          f"{path}: legacy (pre-1.6) PyTorch format; re-save it with torch.save(..., "
          "_use_new_zipfile_serialization=True) or use a zip checkpoint")
    raise WeightsError(f"{path}: not a PyTorch zip checkpoint (truncated or another format)")
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
      if len(pickles) != 1:
        raise _CorruptError("no single data.pkl record in the archive")
      prefix = pickles[0][: -len("data.pkl")]
      byteorder = "<"
      if f"{prefix}byteorder" in archive.namelist():
        byteorder = "<" if archive.read(f"{prefix}byteorder").strip() == b"little" else ">"
      data = archive.read(pickles[0])
      state = _RestrictedUnpickler(io.BytesIO(data), archive, prefix, byteorder).load()
  except pickle.UnpicklingError as e:
    raise WeightsError(f"{path}: {e}") from None
  except _CorruptError as e:
    raise WeightsError(f"{path}: corrupt checkpoint: {e}") from None
  except (zipfile.BadZipFile, EOFError, struct.error, ValueError, TypeError, IndexError,
          AttributeError, KeyError, OSError) as e:
    raise WeightsError(
        f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {e})") from None
  if not isinstance(state, Mapping) or not all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()):
    raise WeightsError(f"{path}: does not hold a state dict (a mapping of names to tensors)")
  return dict(state)


# ---------------------------------------------------------------------------------------
# Writer: produces files that `torch.load` reads, without PyTorch (used by tests and tools).

_DTYPE_STORAGES = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items() if v != "bfloat16"}


def _global(module: str, name: str) -> bytes:
  return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _int(n: int) -> bytes:
  return pickle.BININT + struct.pack("<i", n)


def _str(s: str) -> bytes:
  b = s.encode()
  return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _tuple(items: list[bytes]) -> bytes:
  return pickle.MARK + b"".join(items) + pickle.TUPLE


def save_state_dict(path: str | os.PathLike, state: Mapping[str, np.ndarray], *,
                    name: str = "archive") -> None:
  """Writes `state` in PyTorch's zip format (what `torch.save(state_dict)` would write).

  The pickle is emitted opcode by opcode, so no PyTorch (or any torch-named module) is
  needed. Arrays are stored C-contiguous, little-endian.
  """
  body = [pickle.PROTO + b"\x02", _global("collections", "OrderedDict"), pickle.EMPTY_TUPLE,
          pickle.REDUCE, pickle.MARK]
  storages = {}
  for index, (key, value) in enumerate(state.items()):
    array = np.ascontiguousarray(value)
    dtype = array.dtype.newbyteorder("=")
    if dtype not in _DTYPE_STORAGES:
      raise ValueError(f"{key}: dtype {array.dtype} has no PyTorch storage type")
    storage_key = str(index)
    storages[storage_key] = array.astype(dtype.newbyteorder("<")).tobytes()
    strides = [s // array.itemsize for s in array.strides] if array.size else [1] * array.ndim
    persistent_id = _tuple([_str("storage"), _global("torch", _DTYPE_STORAGES[dtype]),
                            _str(storage_key), _str("cpu"), _int(array.size)])
    body += [
        _str(key), _global("torch._utils", "_rebuild_tensor_v2"), pickle.MARK,
        persistent_id, pickle.BINPERSID, _int(0), _tuple([_int(n) for n in array.shape]),
        _tuple([_int(s) for s in strides]), pickle.NEWFALSE,
        _global("collections", "OrderedDict"), pickle.EMPTY_TUPLE, pickle.REDUCE,
        pickle.TUPLE, pickle.REDUCE,
    ]
  body += [pickle.SETITEMS, pickle.STOP]
  with (files.atomic_write(path) as f,
        zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive):
    archive.writestr(f"{name}/data.pkl", b"".join(body))
    archive.writestr(f"{name}/byteorder", b"little")
    for key, raw in storages.items():
      archive.writestr(f"{name}/data/{key}", raw)
    archive.writestr(f"{name}/version", b"3\n")
