"""Hostile weight files: tiny on disk, refused from what they declare, before it is allocated.

Each file here is a few KB (at most a few hundred KB) but declares terabytes, or hides a large
member: the readers must refuse it with one line naming the file and the problem, and the
peak of Python's (and NumPy's) traced allocations must stay small. On the code before the
bounded readers, these files gave a NumPy `MemoryError` traceback or were unpacked whole.
"""

import io
import pickle
import struct
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
from conftest import random_params

from mmdrfuse_jax.io import torch_reader
from mmdrfuse_jax.models import vgg, weight_files

# The student weighs 0.44 KB and the teacher 2.2 MB; reading a refused file may take the
# zip directory, the pickle and the .npy headers, never what they declare.
MAX_PEAK_BYTES = 16 * 2**20


@pytest.fixture(scope="module", autouse=True)
def _warm_expected_shapes():
  # The networks' shapes come from tracing them once: not part of what a file makes us
  # allocate.
  for model in ("student", "teacher"):
    weight_files.expected_shapes(model)


def _refused(load, path, match, error=torch_reader.WeightsError) -> str:
  """Runs `load(path)`, expecting a one-line `error` naming `path`; checks the peak memory."""
  tracemalloc.start()
  try:
    with pytest.raises(error, match=match) as raised:
      load(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  message = str(raised.value)
  assert "\n" not in message and message.startswith(f"{path}: "), message
  assert peak < MAX_PEAK_BYTES, f"peak of {peak / 2**20:.0f} MiB while refusing {path}"
  return message


# ---------------------------------------------------------------------------------------------
# Building the files.

def _npy(array=None, *, descr="<f4", shape=None, data=b"") -> bytes:
  """A .npy member: `array` written by NumPy, or a header declaring `descr`, `shape`, + `data`."""
  out = io.BytesIO()
  if array is not None:
    np.lib.format.write_array(out, np.asarray(array), allow_pickle=False)
  else:
    np.lib.format.write_array_header_1_0(
        out, {"descr": descr, "fortran_order": False, "shape": shape})
    out.write(data)
  return out.getvalue()


def _student_npy() -> dict[str, bytes]:
  params = random_params("student", 0)
  return {f"{layer}/{name}.npy": _npy(value)
          for layer, p in params.items() for name, value in p.items()}


def _raw_zip(path, members) -> None:
  """Writes a zip whose directory says what `members` declare, not what they hold.

  Args:
    path: the file to write.
    members: (name, bytes stored, compression method, declared compressed size, declared
      uncompressed size, crc).
  """
  out, central = bytearray(), bytearray()
  for name, payload, method, packed, size, crc in members:
    offset, encoded = len(out), name.encode()
    out += (b"PK\x03\x04" + struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0x21, crc, packed,
                                         size, len(encoded), 0) + encoded + payload)
    central += (b"PK\x01\x02"
                + struct.pack("<HHHHHHIIIHHHHHII", 20, 20, 0, method, 0, 0x21, crc, packed,
                              size, len(encoded), 0, 0, 0, 0, 0, offset) + encoded)
  start = len(out)
  out += central + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(members), len(members),
                                                len(central), start, 0)
  path.write_bytes(bytes(out))


def _stored(name: str, payload: bytes):
  return (name, payload, zipfile.ZIP_STORED, len(payload), len(payload), zlib.crc32(payload))


def _deflated(name: str, stream: bytes, size: int, crc: int):
  return (name, stream, zipfile.ZIP_DEFLATED, len(stream), size, crc)


def _deflated_zeros(prefix: bytes, mib: int):
  """(raw deflate stream, size, crc) of `prefix` and `mib` MiB of zeros: about 1 KB per MiB."""
  compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
  stream = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
  # After a full flush the compressor starts afresh: each further MiB compresses the same.
  one_mib = compressor.compress(bytes(2**20)) + compressor.flush(zlib.Z_FULL_FLUSH)
  stream += one_mib * mib + compressor.flush(zlib.Z_FINISH)
  crc = zlib.crc32(prefix)
  zeros = bytes(2**20)
  for _ in range(mib):
    crc = zlib.crc32(zeros, crc)
  return stream, len(prefix) + mib * 2**20, crc


def _torch_zip(path, tensors, storages) -> None:
  """A PyTorch zip checkpoint of `tensors` with the layouts they declare.

  Args:
    path: the file to write.
    tensors: {key: (storage key, storage's declared elements, offset, size, stride)}, float32.
    storages: {storage key: the bytes of its record}.
  """
  def glob(module, name):
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()

  def text(s):
    return pickle.BINUNICODE + struct.pack("<I", len(s.encode())) + s.encode()

  def integer(n):
    return pickle.dumps(n, protocol=2)[2:-1]  # Without PROTO and STOP: any size of int.

  def tup(items):
    return pickle.MARK + b"".join(items) + pickle.TUPLE

  body = [pickle.PROTO + b"\x02", glob("collections", "OrderedDict"), pickle.EMPTY_TUPLE,
          pickle.REDUCE, pickle.MARK]
  for key, (storage, numel, offset, size, stride) in tensors.items():
    pid = tup([text("storage"), glob("torch", "FloatStorage"), text(storage), text("cpu"),
               integer(numel)])
    body += [text(key), glob("torch._utils", "_rebuild_tensor_v2"), pickle.MARK, pid,
             pickle.BINPERSID, integer(offset), tup([integer(n) for n in size]),
             tup([integer(s) for s in stride]), pickle.NEWFALSE,
             glob("collections", "OrderedDict"), pickle.EMPTY_TUPLE, pickle.REDUCE,
             pickle.TUPLE, pickle.REDUCE]
  body += [pickle.SETITEMS, pickle.STOP]
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", b"".join(body))
    archive.writestr("archive/byteorder", b"little")
    for key, raw in storages.items():
      archive.writestr(f"archive/data/{key}", raw)


def _student_tensors():
  """The student's four tensors, contiguous, each in its own storage ("0".."3")."""
  state = weight_files.params_to_state_dict(random_params("student", 0))
  tensors, storages = {}, {}
  for index, (key, value) in enumerate(state.items()):
    strides = tuple(s // value.itemsize for s in value.strides)
    tensors[key] = (str(index), value.size, 0, value.shape, strides)
    storages[str(index)] = value.astype("<f4").tobytes()
  return tensors, storages


def _zip_pickle(path, payload: bytes) -> None:
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", payload)


# ---------------------------------------------------------------------------------------------
# The project's .npz.

def test_npz_member_declaring_a_terabyte_is_refused(tmp_path):
  path = tmp_path / "huge.npz"
  members = _student_npy()
  members["conv1/kernel.npy"] = _npy(shape=(2**38,), data=bytes(16))  # 1 TiB declared
  with zipfile.ZipFile(path, "w") as archive:
    for name, data in members.items():
      archive.writestr(name, data)
  assert path.stat().st_size < 2048
  _refused(weight_files.load_params, path,
           r"conv1 kernel has shape \(274877906944,\), expected \(3, 3, 2, 4\)")


def test_npz_with_a_large_extra_member_is_refused_before_it_is_read(tmp_path):
  # The file: the student and a large extra layer that deflates to a few KB per MiB
  # (3 GiB in the issue; 256 MiB here keeps the old reader's failure short).
  stream, size, crc = _deflated_zeros(_npy(shape=(2**26,)), 256)
  path = tmp_path / "extra.npz"
  _raw_zip(path, [_stored(name, data) for name, data in _student_npy().items()]
           + [_deflated("conv9/kernel.npy", stream, size, crc)])
  assert path.stat().st_size < 400_000
  _refused(weight_files.load_params, path, r"not student weights \(unexpected layers conv9\)")


def test_npz_directory_sizes_must_match_the_declared_array(tmp_path):
  members = _student_npy()
  kernel = members["conv1/kernel.npy"]
  # The directory declares 1 GiB for the kernel that needs 288 bytes of data.
  lying = [_stored(name, data) for name, data in members.items() if name != "conv1/kernel.npy"]
  path = tmp_path / "lying.npz"
  _raw_zip(path, lying + [("conv1/kernel.npy", kernel, zipfile.ZIP_STORED, len(kernel), 2**30,
                           zlib.crc32(kernel))])
  _refused(weight_files.load_params, path, "conv1/kernel")
  # A deflated member declaring far more than its compressed bytes can hold.
  path = tmp_path / "bomb.npz"
  packed = zlib.compressobj(9, zlib.DEFLATED, -15)
  stream = packed.compress(kernel) + packed.flush()
  _raw_zip(path, lying + [_deflated("conv1/kernel.npy", stream, 2**31, zlib.crc32(kernel))])
  # A stored member declaring (compressed and not) 4 GiB, of which the file holds 416 bytes.
  path = tmp_path / "beyond.npz"
  _raw_zip(path, lying + [("conv1/kernel.npy", kernel, zipfile.ZIP_STORED, 2**32 - 1, 2**32 - 1,
                           zlib.crc32(kernel))])
  _refused(weight_files.load_params, path, "conv1/kernel")
  _refused(weight_files.load_params, path, "conv1/kernel")
  # A header of the right shape, but fewer bytes of data than it needs.
  path = tmp_path / "short.npz"
  _raw_zip(path, lying + [_stored("conv1/kernel.npy", kernel[:-8])])
  _refused(weight_files.load_params, path, "conv1/kernel")


def test_npz_of_python_objects_is_refused_unread(tmp_path):
  path = tmp_path / "objects.npz"
  members = _student_npy()
  members["conv2/bias.npy"] = _npy(descr="|O", shape=(1,), data=pickle.dumps([1]))
  with zipfile.ZipFile(path, "w") as archive:
    for name, data in members.items():
      archive.writestr(name, data)
  _refused(weight_files.load_params, path, "not a plain-array .npz")


def test_vgg_npz_declaring_a_terabyte_is_refused(tmp_path):
  path = tmp_path / "vgg19.npz"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("conv1_1/kernel.npy", _npy(shape=(2**38,), data=bytes(16)))
  _refused(vgg.load_params, path, r"conv1_1/kernel has shape \(274877906944,\)",
           vgg.VGGWeightsError)


# ---------------------------------------------------------------------------------------------
# PyTorch zip checkpoints.

def test_stride_zero_tensor_of_four_tebibytes_is_refused(tmp_path):
  tensors, storages = _student_tensors()
  tensors["conv1.1.weight"] = ("0", 1, 0, (1024, 1024, 1024, 1024), (0, 0, 0, 0))
  storages["0"] = bytes(4)
  path = tmp_path / "stride0.model"
  _torch_zip(path, tensors, storages)
  assert path.stat().st_size < 2048
  _refused(weight_files.load_params, path, r"conv1\.1\.weight: stride 0")
  # The generic reader (no expected shapes) refuses it too.
  _refused(torch_reader.load_state_dict, path, r"conv1\.1\.weight: stride 0")


def _conv1_layout_refused(path, layout, match) -> None:
  """The student's checkpoint with conv1's weight declared as `layout` (see `_torch_zip`) is
  refused by `weight_files.load_params` with `match`."""
  tensors, storages = _student_tensors()
  tensors["conv1.1.weight"] = layout
  _torch_zip(path, tensors, storages)
  _refused(weight_files.load_params, path, match)


def test_broadcast_and_overlapping_layouts_are_refused(tmp_path):
  # Small enough to allocate, and of the expected shape: still not a tensor of its own.
  _conv1_layout_refused(tmp_path / "broadcast.model", ("0", 1, 0, (4, 2, 3, 3), (0, 0, 0, 0)),
                        r"conv1\.1\.weight: stride 0")
  _conv1_layout_refused(tmp_path / "overlap.model", ("0", 72, 0, (4, 2, 3, 3), (1, 1, 1, 1)),
                        r"conv1\.1\.weight: overlapping strides")


def test_tensor_beyond_its_storage_is_refused(tmp_path):
  _conv1_layout_refused(tmp_path / "beyond.model", ("0", 72, 1, (4, 2, 3, 3), (18, 9, 3, 1)),
                        r"conv1\.1\.weight: .*does not fit its storage")
  # A storage declaring 2^40 elements that its record does not hold.
  _conv1_layout_refused(tmp_path / "declared.model",
                        ("0", 2**40, 0, (4, 2, 3, 3), (18, 9, 3, 1)),
                        "storage 0 declares 1099511627776 elements")


def test_storage_record_larger_than_the_archive_is_refused(tmp_path):
  tensors, storages = _student_tensors()
  names = {"archive/data.pkl", "archive/byteorder"} | {f"archive/data/{k}" for k in storages}
  path = tmp_path / "lying.model"
  _torch_zip(path, tensors, storages)
  last = "archive/data/0"
  with zipfile.ZipFile(path) as archive:
    members = [_stored(n, archive.read(n)) for n in sorted(names, key=lambda n: n == last)]
  # The directory declares 4 GiB for storage 0 (last), stored: the file holds 288 bytes of it.
  name, payload, method, _, _, crc = members.pop()
  _raw_zip(path, members + [(name, payload, method, 2**32 - 1, 2**32 - 1, crc)])
  _refused(weight_files.load_params, path, "archive/data/0")


def test_expected_shapes_are_checked_before_storages_are_read(tmp_path):
  # A teacher-sized kernel under a student name: refused from the pickle, its storage unread.
  tensors, storages = _student_tensors()
  tensors["conv1.1.weight"] = ("0", 2**23, 0, (2**21, 2, 1, 2), (4, 2, 2, 1))
  path = tmp_path / "big.model"
  _torch_zip(path, tensors, {**storages, "0": bytes(2**25)})  # 32 MiB, present in the file
  _refused(weight_files.load_params, path,
           r"conv1 kernel has shape \(1, 2, 2, 2097152\), expected \(3, 3, 2, 4\)")


@pytest.mark.parametrize("payload", [
    b"\x80\x02}q\x00r" + struct.pack("<I", 2**32 - 1) + b".",  # memo index 4294967295
    b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"abc.",  # BINBYTES8 of 4 EiB
], ids=["memo", "bytes"])
def test_pickle_declaring_huge_sizes_is_refused(tmp_path, payload):
  path = tmp_path / "evil.pth"
  _zip_pickle(path, payload)
  _refused(torch_reader.load_state_dict, path, r"corrupt checkpoint: archive/data\.pkl: ")


def test_deflated_pickle_of_many_mebibytes_is_refused(tmp_path):
  stream, size, crc = _deflated_zeros(b"\x80\x02", 256)
  path = tmp_path / "bomb.pth"
  _raw_zip(path, [_deflated("archive/data.pkl", stream, size, crc)])
  assert path.stat().st_size < 400_000
  _refused(torch_reader.load_state_dict, path, "data.pkl")


def test_vgg_conversion_refuses_a_stride_zero_classifier(tmp_path):
  # The converter reads the features alone; a tensor it would skip (torchvision's classifier)
  # declaring 4 TiB through a stride-0 view still makes the file unsound: refused unread.
  tensors = {"classifier.0.weight": ("c", 1, 0, (2**20, 2**20), (0, 0))}
  path = tmp_path / "vgg19.pth"
  _torch_zip(path, tensors, {"c": bytes(4)})
  _refused(lambda p: vgg.convert_torchvision_file(p, tmp_path / "out.npz"), path,
           r"classifier\.0\.weight: stride 0")
  assert not (tmp_path / "out.npz").exists()
