"""Bounded, restricted readers of weight files: PyTorch's zip checkpoints and NumPy's `.npz`.

`torch.save` writes a zip archive holding `<name>/data.pkl`, a pickle of the state dict whose
tensors point, through pickle "persistent ids", at raw storages `<name>/data/<key>`. Loading
such a pickle with `pickle.load` would run whatever callables it names, so this module
unpickles with an allow-list: the only globals it resolves are `collections.OrderedDict`,
the tensor-rebuilding functions and the storage types, each mapped to a stand-in that only
records what the file declares. Any other global (for example `os.system` or
`builtins.eval`) stops loading with a `WeightsError` before anything runs. PyTorch itself is
never imported. A `.npz` is read the same way: never unpickled, `.npy` headers first.

Both readers are bounded by the bytes a file holds, never by the sizes it declares. They
first read what is small and read with a limit: the zip directory, the pickle (its opcodes
walked before it is unpickled) or the `.npy` headers. From these they know every array's
shape and dtype, which the caller's `expect` checks against the shapes it needs, and every
array's layout, which must fit the bytes its zip member holds, before any array data is
read. A member whose directory entry declares more than the archive holds is refused
unread, and no array is allocated that is larger than the bytes of its member.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import operator
import os
import pathlib
import pickle
import pickletools
import struct
import zipfile
import zlib
from typing import Any, Callable, Literal, Mapping

import numpy as np

from mmdrfuse_jax.errors import MMDRFuseError
from mmdrfuse_jax.io import files


class WeightsError(MMDRFuseError, ValueError):
  """A weights file cannot be used; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
  """What a weights file declares about one array, known before any of its data is read."""

  shape: tuple[int, ...]
  dtype: np.dtype


# Given what a file declares ({name: ArrayInfo}), the shape of each array to read; raises
# WeightsError (its message naming the file) to refuse the file.
Expect = Callable[[Mapping[str, ArrayInfo]], Mapping[str, tuple[int, ...]]]

# A state dict's pickle takes about 100 bytes a tensor: 16 MiB is some 100,000 tensors.
MAX_PICKLE_BYTES = 16 * 2**20
# numpy's own limit on a .npy header (`max_header_size`), plus its magic and length fields.
_MAX_NPY_HEADER_BYTES = 10_000 + 12
# The networks have at most a few dozen arrays; more members is not a weights file (and
# each one's header would be read before the caller sees the names).
MAX_NPZ_MEMBERS = 4096
# Deflate cannot expand its input more than 1032 times (258 bytes from 2 bits): a member
# declaring more is lying about its size.
_MAX_DEFLATE_RATIO = 1032


class _CorruptError(Exception):
  pass


def _one_line(text: object) -> str:
  return " ".join(str(text).split())


def _check_member(info: zipfile.ZipInfo, archive_size: int) -> None:
  """Raises _CorruptError unless the sizes `info` declares can be what the archive holds."""
  name = info.filename
  if info.flag_bits & 0x1:
    raise _CorruptError(f"{name}: encrypted")
  if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
    raise _CorruptError(f"{name}: compression method {info.compress_type} is not supported")
  if info.header_offset + info.compress_size > archive_size:
    raise _CorruptError(f"{name}: the zip directory declares {info.compress_size} bytes, beyond "
                        f"the end of the {archive_size}-byte file")
  if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
    raise _CorruptError(f"{name}: the zip directory declares {info.file_size} bytes, but "
                        f"{info.compress_size} stored")
  if (info.compress_type == zipfile.ZIP_DEFLATED
      and info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 64):
    raise _CorruptError(f"{name}: the zip directory declares {info.file_size} bytes, more than "
                        f"its {info.compress_size} compressed bytes can hold")


def _read_exact(member: Any, size: int, what: str) -> bytes:
  """`size` bytes of an open zip member (`size` checked against its directory entry)."""
  data = member.read(size)
  if len(data) != size:
    raise _CorruptError(f"{what}: truncated ({len(data)} of {size} bytes)")
  return data


# ---------------------------------------------------------------------------------------
# PyTorch zip checkpoints.

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

  @property
  def itemsize(self) -> int:
    return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize

  @property
  def result_dtype(self) -> np.dtype:
    """The dtype of the arrays read from this storage (bfloat16 is widened to float32)."""
    return np.dtype(np.float32 if self.dtype == "bfloat16" else self.dtype)


@dataclasses.dataclass
class _Storage:
  """A storage as the pickle declares it; its record is read only once it is known to fit."""

  key: str
  type: _StorageType
  numel: int


@dataclasses.dataclass
class _Tensor:
  """A tensor as the pickle declares it: a strided view of part of a storage."""

  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args):
  """Stands in for `torch._utils._rebuild_tensor_v2` (and `_rebuild_tensor`): records the view."""
  if not isinstance(storage, _Storage):
    raise _CorruptError("a tensor without a storage")
  try:
    return _Tensor(storage, operator.index(storage_offset),
                   tuple(operator.index(n) for n in size), tuple(operator.index(s) for s in stride))
  except TypeError:
    raise _CorruptError("a tensor whose offset, size or stride is not integers") from None


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


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles a state dict, resolving only allow-listed globals to recording stand-ins."""

  def __init__(self, file):
    super().__init__(file)
    self.storages: dict[str, _Storage] = {}

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
    try:
      numel = operator.index(numel)
    except TypeError:
      raise _CorruptError(f"storage {key} declares a size that is not an integer") from None
    key = str(key)
    storage = self.storages.setdefault(key, _Storage(key, storage_type, numel))
    if storage.type is not storage_type or storage.numel != numel or numel < 0:
      raise _CorruptError(f"storage {key} is declared with different types or sizes")
    return storage


def _scan_pickle(data: bytes, name: str) -> None:
  """Walks the opcodes of `data` before the unpickler runs them.

  The C unpickler allocates what some opcodes declare before it reads them: the length of a
  bytes or string argument, and a memo that grows to twice the index of a slot stored into.
  `pickletools.genops` reads each argument only from the bytes that remain, refusing longer
  lengths; memo indices are limited to the number of opcodes seen (picklers number them in
  order, from 0).
  """
  try:
    for count, (opcode, arg, _) in enumerate(pickletools.genops(data), start=1):
      if (opcode.name in ("PUT", "BINPUT", "LONG_BINPUT")
          and not (isinstance(arg, int) and 0 <= arg < count)):
        raise _CorruptError(f"{name}: memo index {arg} at its opcode {count}")
  except ValueError as e:  # Truncated, an unknown opcode, or a length beyond the data.
    raise _CorruptError(f"{name}: {_one_line(e)}") from None


def _span(key: str, tensor: _Tensor) -> int:
  """The elements of its storage that `tensor` reaches (from the storage's start).

  Raises _CorruptError for a layout that no state dict's tensor has: negative values, a
  stride 0 (one value repeated, a broadcast view), strides that make elements overlap, or a
  view beyond its storage's declared size.
  """
  size, stride, offset = tensor.size, tensor.stride, tensor.offset
  if len(size) != len(stride):
    raise _CorruptError(f"{key}: size {size} and stride {stride} differ in length")
  if offset < 0 or min(size + stride, default=0) < 0:
    raise _CorruptError(f"{key}: negative offset, size or stride ({offset}, {size}, {stride})")
  if 0 in size:
    return 0
  end = 1
  for step, n in sorted((s, n) for n, s in zip(size, stride) if n > 1):
    if step == 0:
      raise _CorruptError(f"{key}: stride 0 on a dimension of size {n} (one value repeated "
                          "through a broadcast view, not a tensor of weights)")
    if step < end:
      raise _CorruptError(f"{key}: overlapping strides {stride} for size {size}")
    end += (n - 1) * step
  end += offset
  if end > tensor.storage.numel:
    raise _CorruptError(f"{key}: the tensor of size {size} (stride {stride}, offset {offset}) "
                        f"does not fit its storage of {tensor.storage.numel} elements")
  return end


def _storage_array(archive: zipfile.ZipFile, info: zipfile.ZipInfo, storage: _Storage,
                   count: int, byteorder: Literal["<", ">"]) -> np.ndarray:
  """The first `count` elements of `storage` (`count` checked against its record's bytes)."""
  with archive.open(info) as member:
    raw = _read_exact(member, count * storage.type.itemsize, info.filename)
  if storage.type.dtype == "bfloat16":
    bits = np.frombuffer(raw, dtype=byteorder + "u2").astype(np.uint32) << 16
    return bits.view(np.float32)
  array = np.frombuffer(raw, dtype=np.dtype(storage.type.dtype).newbyteorder(byteorder))
  return array.astype(array.dtype.newbyteorder("="))


def _tensor_array(tensor: _Tensor, storage: np.ndarray) -> np.ndarray:
  """`tensor` as a contiguous array of its own (`storage` holds at least its span)."""
  if not tensor.size:
    return np.array(storage[tensor.offset])
  if 0 in tensor.size:
    return np.zeros(tensor.size, storage.dtype)
  view = np.lib.stride_tricks.as_strided(
      storage[tensor.offset:], shape=tensor.size,
      strides=[s * storage.itemsize for s in tensor.stride])
  return np.array(view)  # Contiguous copy, independent of the storage buffer.


def _selected(source: str, infos: Mapping[str, ArrayInfo],
              expect: Expect | None) -> Mapping[str, tuple[int, ...]]:
  """The shapes of the arrays to read: all of them, or those `expect` names (checked)."""
  if expect is None:
    return {key: info.shape for key, info in infos.items()}
  wanted = expect(infos)
  for key, shape in wanted.items():
    if key not in infos:
      raise WeightsError(f"{source}: missing {key}")
    if infos[key].shape != tuple(shape):
      raise WeightsError(f"{source}: {key} has shape {infos[key].shape}, expected {tuple(shape)}")
  return wanted


def load_state_dict(path: str | os.PathLike,
                    expect: Expect | None = None) -> dict[str, np.ndarray]:
  """Reads a PyTorch `state_dict` saved with `torch.save` into NumPy arrays.

  Args:
    path: a `.pth`/`.pt`/`.model` file in PyTorch's zip format (PyTorch >= 1.6).
    expect: called with every tensor's declared shape and dtype once the pickle is read and
      every tensor's layout checked against its storage, before any storage is read; returns
      the shapes of the tensors to read (the others are not read) and raises WeightsError to
      refuse the file. Without it, every tensor is read.

  Returns:
    The state dict's entries (those `expect` chose), in file order, as NumPy arrays.

  Raises:
    WeightsError: the file is missing, truncated, not a PyTorch zip checkpoint, not a
      mapping of names to tensors, names any Python object other than tensors, declares
      more than it holds, has a tensor laid out as no weights are (stride 0, overlapping,
      beyond its storage), or is refused by `expect`.
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
      archive_size = path.stat().st_size
      pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
      if len(pickles) != 1:
        raise _CorruptError("no single data.pkl record in the archive")
      prefix = pickles[0][: -len("data.pkl")]
      byteorder: Literal["<", ">"] = "<"
      if f"{prefix}byteorder" in archive.namelist():
        info = archive.getinfo(f"{prefix}byteorder")
        _check_member(info, archive_size)
        with archive.open(info) as member:
          byteorder = "<" if member.read(64).strip() == b"little" else ">"
      info = archive.getinfo(pickles[0])
      _check_member(info, archive_size)
      if info.file_size > MAX_PICKLE_BYTES:
        raise _CorruptError(f"{info.filename}: {info.file_size} bytes, more than the "
                            f"{MAX_PICKLE_BYTES} of a state dict's pickle")
      with archive.open(info) as member:
        data = _read_exact(member, info.file_size, info.filename)
      _scan_pickle(data, info.filename)
      unpickler = _RestrictedUnpickler(io.BytesIO(data))
      state = unpickler.load()
      if not isinstance(state, Mapping) or not all(
          isinstance(k, str) and isinstance(v, _Tensor) for k, v in state.items()):
        raise WeightsError(
            f"{path}: does not hold a state dict (a mapping of names to tensors)")
      records = {}
      for key, storage in unpickler.storages.items():
        name = f"{prefix}data/{key}"
        if name not in archive.NameToInfo:
          raise _CorruptError(f"storage {key} is missing from the archive")
        records[key] = archive.getinfo(name)
        _check_member(records[key], archive_size)
        if storage.numel * storage.type.itemsize > records[key].file_size:
          raise _CorruptError(f"storage {key} declares {storage.numel} elements, its record "
                              f"holds {records[key].file_size // storage.type.itemsize}")
      spans = {key: _span(key, tensor) for key, tensor in state.items()}
      wanted = _selected(str(path), {key: ArrayInfo(t.size, t.storage.type.result_dtype)
                                     for key, t in state.items()}, expect)
      needed: dict[str, int] = {}
      for key in wanted:
        storage_key = state[key].storage.key
        needed[storage_key] = max(needed.get(storage_key, 0), spans[key])
      storages = {key: _storage_array(archive, records[key], unpickler.storages[key], count,
                                      byteorder) for key, count in needed.items()}
      return {key: _tensor_array(tensor, storages[tensor.storage.key])
              for key, tensor in state.items() if key in wanted}
  except WeightsError:
    raise
  except pickle.UnpicklingError as e:
    raise WeightsError(f"{path}: {_one_line(e)}") from None
  except _CorruptError as e:
    raise WeightsError(f"{path}: corrupt checkpoint: {e}") from None
  except (zipfile.BadZipFile, EOFError, struct.error, ValueError, TypeError, IndexError,
          AttributeError, KeyError, OSError, zlib.error, RecursionError) as e:
    raise WeightsError(f"{path}: corrupt or truncated checkpoint "
                       f"({type(e).__name__}: {_one_line(e)})") from None


# ---------------------------------------------------------------------------------------
# NumPy .npz files.

@dataclasses.dataclass
class _NpyMember:
  info: zipfile.ZipInfo
  array: ArrayInfo
  fortran_order: bool
  data_offset: int  # The length of the header: where the data starts in the member.


class _LimitedReader:
  """A zip member read through a byte budget: numpy reads a header's declared length whole."""

  def __init__(self, member: Any, limit: int, what: str):
    self._member, self._left, self._what = member, limit, what
    self.count = 0

  def read(self, size: int = -1, /) -> bytes:
    if not 0 <= size <= self._left:  # numpy reads headers by their declared lengths.
      raise _CorruptError(f"{self._what}: a .npy header longer than {_MAX_NPY_HEADER_BYTES} bytes")
    data = self._member.read(size)
    self._left -= len(data)
    self.count += len(data)
    return data


def _npy_header(path: pathlib.Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo,
                key: str) -> _NpyMember:
  """Reads (only) the .npy header of a member and checks what it declares."""
  with archive.open(info) as member:
    reader = _LimitedReader(member, _MAX_NPY_HEADER_BYTES, key)
    version = np.lib.format.read_magic(reader)
    if version == (1, 0):
      shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(reader)
    elif version == (2, 0):
      shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(reader)
    else:
      raise _CorruptError(f"{key}: .npy format version {version} is not supported")
  if dtype.hasobject:
    raise WeightsError(f"{path}: not a plain-array .npz weights file ({key} holds Python "
                       "objects, which are never unpickled: that could run code)")
  if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
    raise _CorruptError(f"{key}: dtype {dtype} is not plain numbers")
  if min(shape, default=0) < 0:
    raise _CorruptError(f"{key}: negative shape {shape}")
  return _NpyMember(info, ArrayInfo(tuple(shape), dtype), fortran_order, reader.count)


def load_npz(path: str | os.PathLike, expect: Expect | None = None) -> dict[str, np.ndarray]:
  """Reads the arrays of a `.npz` file (as `numpy.savez` writes it), never unpickling.

  Args:
    path: the `.npz` file.
    expect: called with every member's declared shape and dtype (keys without `.npy`), read
      from the zip directory and the `.npy` headers alone; returns the shapes of the arrays to
      read (the others are not read) and raises WeightsError to refuse the file. Without it,
      every array is read.

  Returns:
    The arrays (those `expect` chose), by key, in file order.

  Raises:
    WeightsError: the file is missing, not a zip archive, truncated or corrupt, holds
      Python objects or anything but plain numeric `.npy` members, declares sizes that its
      members do not hold, or is refused by `expect`.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise WeightsError(f"{path}: no such weights file")
  if not zipfile.is_zipfile(path):
    raise WeightsError(f"{path}: not a .npz file (not a zip archive: truncated or another format)")
  try:
    with zipfile.ZipFile(path) as archive:
      archive_size = path.stat().st_size
      infos = archive.infolist()
      if len(infos) > MAX_NPZ_MEMBERS:
        raise _CorruptError(f"{len(infos)} members, more than the {MAX_NPZ_MEMBERS} of a "
                            "weights file")
      members: dict[str, _NpyMember] = {}
      for info in infos:
        if not info.filename.endswith(".npy"):
          raise _CorruptError(f"member {info.filename!r} is not a .npy array")
        key = info.filename[: -len(".npy")]
        if key in members:
          raise _CorruptError(f"member {info.filename!r} is there twice")
        _check_member(info, archive_size)
        members[key] = _npy_header(path, archive, info, key)
      wanted = _selected(str(path), {key: m.array for key, m in members.items()}, expect)
      for key in wanted:
        member = members[key]
        nbytes = math.prod(member.array.shape) * member.array.dtype.itemsize
        if member.info.file_size - member.data_offset != nbytes:
          raise _CorruptError(f"{key}: its header declares {nbytes} bytes of data, the member "
                              f"holds {member.info.file_size - member.data_offset}")
      arrays = {}
      for key in wanted:
        member = members[key]
        with archive.open(member.info) as f:
          _read_exact(f, member.data_offset, key)
          # Reading to the member's end makes zipfile check its CRC.
          raw = _read_exact(f, member.info.file_size - member.data_offset, key)
        shape, dtype = member.array.shape, member.array.dtype
        flat = np.frombuffer(raw, dtype=dtype, count=math.prod(shape))
        array = (flat.reshape(shape[::-1]).transpose() if member.fortran_order
                 else flat.reshape(shape))
        arrays[key] = array.copy(order="K")  # Writable, as numpy.load gives it.
      return arrays
  except WeightsError:
    raise
  except _CorruptError as e:
    raise WeightsError(f"{path}: corrupt .npz: {e}") from None
  except (zipfile.BadZipFile, EOFError, struct.error, ValueError, TypeError, KeyError, OSError,
          zlib.error, NotImplementedError, RuntimeError) as e:
    raise WeightsError(
        f"{path}: corrupt or truncated .npz ({type(e).__name__}: {_one_line(e)})") from None


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
