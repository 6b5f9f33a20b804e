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
from typing import IO, Iterator


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
