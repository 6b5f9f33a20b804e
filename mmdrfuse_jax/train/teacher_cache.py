"""The frozen teacher's targets kept per patch, so that later epochs need not run the teacher.

On a CPU the teacher's forward pass is most of a student step (about 5 s of a 5.5 s step, batch
25, on the development VM; docs/benchmarks.md). The teacher is frozen, so its targets for a
patch depend on the patch's inputs alone: `TeacherCache` computes them the first time a patch
is seen and reads them back after that, from host RAM and, where `config.teacher_cache_dir`
names a folder, from a file in it that outlives the run. A resumed run, or another run on the
same patches and teacher (the rows of an ablation grid), then reads what an earlier one
computed instead of spending its first epochs running the teacher again.

Every entry is kept with a digest of the inputs it was computed from, and is read only for a
patch whose inputs have that digest: whatever changes a patch (augmentation drawn anew, other
data, a rebuilt dataset, a half-written entry) computes its targets again instead of reading
another patch's.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmdrfuse_jax.train import distill, distributed

DIGEST_BYTES = 16
_FORMAT = b"mmdrfuse teacher targets v1"


def entry_dtype(patch_size: int) -> np.dtype:
  """One patch's entry: the digest of its inputs (all zero: none yet), then its targets."""
  return np.dtype([("digest", np.uint8, (DIGEST_BYTES,)),
                   ("targets", "<f4", (patch_size, patch_size, 2))])


def input_digests(ir: np.ndarray, vis: np.ndarray) -> np.ndarray:
  """(B, DIGEST_BYTES) uint8: a BLAKE2b digest of each row's infrared and visible patch."""
  out = np.empty((ir.shape[0], DIGEST_BYTES), np.uint8)
  for row, (a, b) in enumerate(zip(ir, vis)):
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    h.update(np.ascontiguousarray(a, np.float32).data)
    h.update(np.ascontiguousarray(b, np.float32).data)
    out[row] = np.frombuffer(h.digest(), np.uint8)
  return out


def store_key(teacher_params: Any, *, precision: str, patch_size: int, num_patches: int,
              data_label: str) -> str:
  """The name of the folder holding one teacher's targets for one run's patches.

  Runs with the same teacher (its every weight), precision and patches share it. `data_label`
  says which patches (the data settings and seed); it only keeps runs on other patches from
  overwriting each other's entries, since every entry is checked against its inputs anyway.
  """
  h = hashlib.sha256(_FORMAT)
  h.update(f"{precision}|{patch_size}|{num_patches}|{data_label}".encode())
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(teacher_params)[0],
                           key=lambda item: jax.tree_util.keystr(item[0])):
    array = np.ascontiguousarray(_process_copy(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
    h.update(array.data)
  return h.hexdigest()[:20]


class TeacherCache:
  """`distill.teacher_targets` per patch id, computed the first time a patch's inputs are seen.

  Costs 2 x H x W float32 (131 kB at 128 x 128) per patch of host RAM, or of disk where
  `directory` is given (the file is mapped, so RAM holds only what the OS keeps of it). In a
  run of several processes, each one keeps the targets of the patches of its own batch rows
  (in its own file).

  Args:
    teacher_params: the frozen teacher.
    num_patches: patch ids run from 0 to this.
    patch_size: the patches' side.
    mesh: the run's mesh (the targets join the batch split over its "data" axis).
    precision: the teacher's (`precision.py`).
    directory: a folder to keep the targets in across runs (`config.teacher_cache_dir`);
      None keeps them in RAM for this run only.
    data_label: which patches these are (see `store_key`).
    log: where the line saying what the folder already holds goes.
  """

  def __init__(self, teacher_params: Any, num_patches: int, patch_size: int, mesh: Mesh,
               precision: str = "exact", *, directory: str | os.PathLike | None = None,
               data_label: str = "", log: Callable[[str], None] = print):
    dtype = entry_dtype(patch_size)
    self.path: pathlib.Path | None = None
    if directory is None:
      self._entries = np.zeros(num_patches, dtype)
    else:
      key = store_key(teacher_params, precision=precision, patch_size=patch_size,
                      num_patches=num_patches, data_label=data_label)
      name = f"targets-p{jax.process_index()}of{jax.process_count()}.npy"
      self.path = pathlib.Path(directory).expanduser() / key / name
      self._entries = _open_store(self.path, dtype, num_patches, log)
      log(f"teacher targets: {int(self.known.sum())} of {num_patches} patches already in "
          f"{self.path}")
    self._sharding = NamedSharding(mesh, P("data"))
    # With several processes, each one keeps and computes the targets of its own rows only, on
    # its own devices: which patches a process has seen differs between processes, so a
    # computation over the whole mesh would need them all to agree on when to run it.
    local = Mesh(np.array([d for d in mesh.devices.flat if d.process_index == jax.process_index()]),
                 ("data",))
    # Placed once: the teacher is frozen, and a miss (every step of a first epoch) would
    # otherwise copy it to the devices again.
    self._teacher = jax.device_put(jax.tree_util.tree_map(_process_copy, teacher_params),
                                   NamedSharding(local, P()))
    self._compute = distill.jitted_teacher_targets(local, precision)

  @property
  def known(self) -> np.ndarray:
    """(num_patches,) bool: the patches with targets kept (of the inputs they last had)."""
    return np.asarray(self._entries["digest"].any(axis=1))

  def add_to(self, batch: Mapping[str, jax.Array | np.ndarray]
             ) -> dict[str, jax.Array | np.ndarray]:
    """`batch` with its `teacher` targets (computed now for inputs not seen before)."""
    ids = distributed.local_rows(batch["patch_id"])
    ir = distributed.local_rows(batch["ir"])
    vis = distributed.local_rows(batch["vis"])
    digests = input_digests(ir, vis)
    kept = self._entries["digest"][ids]
    if not (kept == digests).all():
      targets = np.asarray(self._compute(self._teacher, np.concatenate([ir, vis], axis=-1)))
      # Targets first, digests after: an entry cut short between the two (a crash, a full
      # disk) has the digest of nothing and is computed again.
      self._entries["targets"][ids] = targets
      self._flush()
      self._entries["digest"][ids] = digests
      self._flush()
    else:
      targets = self._entries["targets"][ids]
    shape = (batch["patch_id"].shape[0], *targets.shape[1:])
    return {**batch, "teacher": jax.make_array_from_process_local_data(
        self._sharding, targets, shape)}

  def _flush(self) -> None:
    if isinstance(self._entries, np.memmap):
      self._entries.flush()


def _open_store(path: pathlib.Path, dtype: np.dtype, num_patches: int,
                log: Callable[[str], None]) -> np.memmap:
  """The entries in `path`, mapped for reading and writing; a new store if it holds none.

  The file's header is checked against the entries expected before anything is mapped: a
  file that is not such a store (another version's, cut short, damaged) is replaced by an empty
  one, since everything in it can be computed again.
  """
  if path.is_file():
    try:
      return _map_store(path, dtype, num_patches)
    except _NotAStore as problem:
      log(f"{path}: {problem}; starting it again (the teacher's targets are computed anew)")
  path.parent.mkdir(parents=True, exist_ok=True)
  # Created under a temporary name, then renamed: a run reading the folder at the same time
  # sees either no store or a whole one. The file is sparse: its zeros take no disk.
  temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
  created = np.lib.format.open_memmap(temporary, "w+", dtype, (num_patches,))
  del created
  os.replace(temporary, path)
  return _map_store(path, dtype, num_patches)


class _NotAStore(Exception):
  """A file that is not a store of the entries expected (the message says why)."""


def _read_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(f)
  raise ValueError(f"an .npy format version {version[0]}.{version[1]} not written here")


def _map_store(path: pathlib.Path, dtype: np.dtype, num_patches: int) -> np.memmap:
  """`path`'s `num_patches` entries of `dtype`, mapped once its header and size say so.

  Raises:
    _NotAStore: the file is not such a store.
  """
  try:
    with open(path, "rb") as f:
      shape, fortran, found = _read_header(f)
      offset = f.tell()
  except (OSError, ValueError) as e:
    raise _NotAStore(f"not a teacher-target store ({e})") from None
  if found != dtype or shape != (num_patches,) or fortran:
    raise _NotAStore(
        f"holds {shape} entries of {found}, not the {num_patches} of {dtype} of this run")
  expected = offset + num_patches * dtype.itemsize
  size = path.stat().st_size
  if size != expected:
    raise _NotAStore(f"is {size:,} bytes where its header says {expected:,}")
  return np.memmap(path, dtype, "r+", offset=offset, shape=(num_patches,))


def _process_copy(x: Any) -> Any:
  """`x` as this process holds it: a replicated array spanning several processes as one copy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x.addressable_data(0)
  return x
