"""Atomic file writes: a reader never sees a half-written file.

Every file the project writes (fused images, CSV tables, weights) goes through
`atomic_write`: the data is written to a temporary file in the destination's folder, flushed
to disk, and only then renamed over the destination. An error or interruption midway leaves
the old file (if any) untouched and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from typing import IO, Iterator, Mapping

import numpy as np


def _current_umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


# mkstemp creates files readable by their owner only; finished files get the permissions a
# plain open() would have given them.
_FILE_MODE = 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
  """Opens a temporary file that replaces `path` when the `with` block completes.

  Args:
    path: the destination; its folder is created if missing.
    mode: "wb" or "w" (text; `open_kwargs` such as `newline=""` are passed on).
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_npz_tree(path: str | os.PathLike, tree: Mapping[str, Mapping[str, np.ndarray]]) -> None:
  """Writes a two-level tree {layer: {name: array}} as one `.npz` (`layer/name` keys), atomically.

  This is the project's single-file weights format (the student, the converted VGG-19).
  """
  arrays = {f"{layer}/{name}": np.asarray(value) for layer, entries in tree.items()
            for name, value in entries.items()}
  with atomic_write(path) as f:
    np.savez(f, **arrays)


def read_npz_tree(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
  """Reads a file written by `write_npz_tree`, without unpickling anything.

  Raises:
    ValueError: the file holds object arrays (refused by `allow_pickle=False`).
    OSError, zipfile.BadZipFile, EOFError: the file is unreadable, corrupt or truncated.
  """
  tree: dict[str, dict[str, np.ndarray]] = {}
  with np.load(path, allow_pickle=False) as data:
    for key in data.files:
      layer, _, name = key.partition("/")
      tree.setdefault(layer, {})[name] = data[key]
  return tree
