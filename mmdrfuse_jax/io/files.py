"""Atomic file writes: a reader never sees a half-written file.

Every file the project writes (fused images, CSV tables, weights) goes through
`atomic_write`: the data is written to a temporary file in the destination's folder, flushed
to disk, and only then renamed over the destination. An error or interruption midway leaves
the old file (if any) untouched and no temporary file behind.

Before a command writes anything, `prepare_folder` makes sure its output folder is usable
(created if missing, writable) and `refuse_overwrites` that no output would replace one of
its inputs; both fail with a one-line `OutputError`. `remove_created_folders` takes away
again the folders `prepare_folder` created when nothing was written in them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import tempfile
from typing import IO, Iterable, Iterator, Mapping, Sequence

import numpy as np

from mmdrfuse_jax.errors import MMDRFuseError

# What an OSError means to a user, by errno (the rest use the system's own wording).
_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "not a folder",
    errno.EISDIR: "is a folder",
}


def os_error_cause(error: OSError) -> str:
  """The cause of an OSError in a few lower-case words ("no space left on device")."""
  if error.errno in _CAUSES:
    return _CAUSES[error.errno]
  text = error.strerror or str(error) or type(error).__name__
  return text[:1].lower() + text[1:]


def os_error_message(error: OSError, path: str | os.PathLike | None = None) -> str:
  """One line `PATH: cause` for an OSError; `path` defaults to the error's own file name."""
  where = path if path is not None else error.filename
  return f"{where}: {os_error_cause(error)}" if where else os_error_cause(error)


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


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> None:
  """Removes what `atomic_write` left in `folder` for `names` when its process was killed.

  A process killed inside `atomic_write` (SIGKILL, power loss) leaves its temporary file
  (`.NAME.XXXX.tmp`) beside the untouched destination. Call this only where no other process
  writes the same files, for example when a training run takes over its workdir.
  """
  for name in names:
    for tmp in pathlib.Path(folder).glob(f".{name}.*.tmp"):
      tmp.unlink(missing_ok=True)


class OutputError(MMDRFuseError, ValueError):
  """An output location cannot be used (or would replace an input); the message says why."""


def prepare_folder(folder: str | os.PathLike, what: str = "output folder") -> list[pathlib.Path]:
  """Makes sure `folder` is a folder this process can write in, creating it if missing.

  Writability is tested for real (a temporary file is created and removed), so that a
  read-only folder or file system is found before any work is done.

  Args:
    folder: the output folder.
    what: how messages name it (for example "--out").

  Returns:
    The folders this call created, outermost first (for `remove_created_folders`).

  Raises:
    OutputError: `folder` is a file, cannot be created, or is not writable.
  """
  folder = pathlib.Path(folder)
  created: list[pathlib.Path] = []
  if folder.exists() and not folder.is_dir():
    raise OutputError(f"{what} {folder}: is a file, not a folder")
  missing = [p for p in [folder, *folder.parents] if not p.exists()]
  try:
    for path in reversed(missing):
      path.mkdir()
      created.append(path)
  except FileExistsError:  # Another process made it meanwhile: fine when it is a folder.
    if not folder.is_dir():
      remove_created_folders(created)
      raise OutputError(f"{what} {folder}: cannot create the folder (a file is in the way)")
  except OSError as e:
    remove_created_folders(created)
    raise OutputError(
        f"{what} {folder}: cannot create the folder ({os_error_cause(e)})") from None
  try:
    fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    remove_created_folders(created)
    raise OutputError(
        f"{what} {folder}: cannot write in this folder ({os_error_cause(e)})") from None
  return created


def remove_created_folders(created: Sequence[pathlib.Path]) -> None:
  """Removes the folders `prepare_folder` created, innermost first, where they are empty."""
  for path in reversed(created):
    try:
      path.rmdir()
    except OSError:  # Not empty (something was written), or already gone.
      return


def _same_path(a: pathlib.Path, b: pathlib.Path) -> bool:
  if a.resolve() == b.resolve():
    return True
  try:  # Also catches two spellings of one file (case-insensitive file systems, bind mounts).
    return os.path.samefile(a, b)
  except OSError:
    return False


def refuse_overwrites(outputs: Iterable[str | os.PathLike],
                      inputs: Iterable[tuple[str, str | os.PathLike]], what: str) -> None:
  """Raises OutputError if an output path is one of the inputs (a file or a folder).

  Paths are compared after resolving links (and with `os.path.samefile` where both exist),
  so `out/../ir` or a link to an input folder is recognised too.

  Args:
    outputs: the output folder and/or the files that will be written.
    inputs: (description, path) of every input file and input folder, for example
      ("infrared input folder (--ir)", "ir").
    what: how messages name the output option (for example "--out").
  """
  input_paths = [(label, pathlib.Path(path)) for label, path in inputs]
  for output in outputs:
    output = pathlib.Path(output)
    for label, path in input_paths:
      if _same_path(output, path):
        if path.is_dir():
          raise OutputError(f"{what} {output}: is the {label}; outputs would be mixed with "
                            "(and could replace) the inputs; choose another folder")
        other = f" {path}" if str(path) != str(output) else ""
        raise OutputError(f"{what}: {output} would replace the {label}{other}; "
                          "choose another location")


def check_output_file(out: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike]],
                      what: str = "--out") -> list[pathlib.Path]:
  """The one check every tool makes, before any work, of a file it will write.

  Refuses an `out` that would replace one of `inputs` (`refuse_overwrites`) or that is a
  folder, then makes sure its folder exists and is writable (creating it if needed).

  Returns:
    The folders created (remove them with `remove_created_folders` if nothing is written).

  Raises:
    OutputError: one line naming the path and the problem.
  """
  out = pathlib.Path(out)
  refuse_overwrites([out], inputs, what)
  if out.is_dir():
    raise OutputError(f"{what} {out}: is a folder, not a file")
  return prepare_folder(out.parent, f"{what} folder")


def check_output_folder(out_dir: str | os.PathLike, outputs: Iterable[str | os.PathLike],
                        inputs: Iterable[tuple[str, str | os.PathLike]],
                        what: str = "--out") -> list[pathlib.Path]:
  """The same check for a folder of outputs: `out_dir` and each of `outputs` (its files)
  replace no input; the folder is a folder, exists (created if needed) and is writable.

  Returns:
    The folders created (for `remove_created_folders`).

  Raises:
    OutputError: one line naming the path and the problem.
  """
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and not out_dir.is_dir():
    raise OutputError(f"{what} {out_dir}: is a file, not a folder")
  refuse_overwrites([out_dir, *outputs], inputs, what)
  return prepare_folder(out_dir, what)


def write_npz_tree(path: str | os.PathLike, tree: Mapping[str, Mapping[str, np.ndarray]]) -> None:
  """Writes a two-level tree {layer: {name: array}} as one `.npz` (`layer/name` keys), atomically.

  This is the project's single-file weights format (the student, the converted VGG-19).
  """
  arrays = {f"{layer}/{name}": np.asarray(value) for layer, entries in tree.items()
            for name, value in entries.items()}
  with atomic_write(path) as f:
    # mypy matches the dict against savez's `allow_pickle` keyword too; every key here has a
    # "/", so none is taken for it.
    np.savez(f, **arrays)  # type: ignore[arg-type]


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
