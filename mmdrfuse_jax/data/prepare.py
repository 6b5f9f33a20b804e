"""Building a dataset once: `prepare` builds it, reuses an unchanged build, and describes it.

`prepare` (behind `bin/prepare_data.py`) builds a dataset of `catalog` from the user's folder
with the `builders.FusionPairs` builder into a TFDS data_dir, and reuses a build while the
folder's image files and the build options are those it recorded (`sources.read_source_record`).
`load_built` describes a build (`BuiltDataset`: per split the images, and what was skipped or
resized) and `source_changes` says how its folder has changed since. A build that fails midway
keeps nothing half-written (`BuildError`), and two builds of one dataset never run at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import pathlib
import secrets
import shutil
from typing import Any, Callable, Iterator

import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants

from mmdrfuse_jax.data import builders, sources
from mmdrfuse_jax.errors import MMDRFuseError
from mmdrfuse_jax.io import files

try:
  import fcntl
except ImportError:  # Not POSIX: builds are not locked against each other.
  fcntl = None  # type: ignore[assignment]  # the optional-module idiom; None is checked at use

# Write failures that arrive as other exceptions (ArrayRecord raises RuntimeError with the
# system's message) are recognised by the system's wording of these errors.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


class BuildError(MMDRFuseError, RuntimeError):
  """Writing a build failed midway (disk full, permissions); nothing half-written is kept."""


@dataclasses.dataclass(frozen=True)
class BuiltDataset:
  """What was built: where, and per split the images' (stem, height, width) in image-id order.

  Attributes:
    data_dir: the dataset's version folder.
    images: split -> list of (stem, height, width), index = image_id.
    skipped: problems left out with skip_bad.
    resized: split -> stems whose visible image was resized to the infrared size.
    source: the folder it was built from.
    status: what `prepare` did: "built", "rebuilt" or "already built" (reused).
  """

  data_dir: pathlib.Path
  images: dict[str, list[tuple[str, int, int]]]
  skipped: list[str]
  resized: dict[str, list[str]]
  source: str
  status: str = "built"


def _built_info(builder: builders.FusionPairs, status: str = "built") -> BuiltDataset:
  meta = builder.info.metadata or {}
  images = {s: [(str(a), int(b), int(c)) for a, b, c in rows]
            for s, rows in dict(meta.get("images", {})).items()}
  return BuiltDataset(
      data_dir=pathlib.Path(builder.data_dir), images=images, skipped=list(meta.get("skipped", [])),
      resized={s: list(v) for s, v in dict(meta.get("resized", {})).items()},
      source=str(dict(meta.get("source", {})).get("manual_dir", "")), status=status)


def _check_folder_path(path: pathlib.Path) -> None:
  """`sources.DataError` when `path`, or the nearest part of it that exists, is not a folder."""
  existing = path
  while not existing.exists() and existing.parent != existing:
    existing = existing.parent
  if not existing.is_dir():
    raise sources.DataError(f"{path}: is a file, not a folder" if existing == path else
                            f"{path}: {existing} is a file, not a folder")


def _check_readable(manual_dir: pathlib.Path, built: BuiltDataset | None) -> None:
  if not manual_dir.exists():
    kept = ""
    if built is not None and built.source == str(manual_dir.resolve()):
      kept = f" (the dataset built from it in {built.data_dir} is still usable)"
    raise sources.DataError(f"{manual_dir}: no such folder{kept}")
  if not manual_dir.is_dir():
    raise sources.DataError(f"{manual_dir}: is a file, not a folder")
  try:
    with os.scandir(manual_dir) as entries:
      next(entries, None)
  except OSError as e:
    raise sources.DataError(files.os_error_message(e, manual_dir)) from None


def _check_writable(*folders: pathlib.Path) -> None:
  """`sources.DataError` naming the first folder that cannot be created or written into."""
  for folder in folders:
    try:
      files.prepare_folder(folder, "data_dir")
    except files.OutputError as e:
      raise sources.DataError(str(e)) from None


@contextlib.contextmanager
def _build_lock(folder: pathlib.Path) -> Iterator[None]:
  """Holds `folder/.prepare.lock` so that two builds of one dataset never run at once."""
  if fcntl is None:
    yield
    return
  with open(folder / ".prepare.lock", "a") as f:
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise sources.DataError(f"{folder}: another build of this dataset is running now; "
                              "wait for it to finish") from None
    yield  # The lock goes with the file's closing, also when the process dies.


def _as_os_error(error: BaseException | None) -> OSError | None:
  """The OSError behind a failed write, also when a library reported it as another error."""
  seen, bare = set(), None
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno is not None:
      return error
    bare = bare or (error if isinstance(error, OSError) else None)
    text = str(error)
    for code in _WRITE_ERRNOS:
      if os.strerror(code) in text:
        return OSError(code, os.strerror(code))
    # TFDS re-raises an OSError as a new one without its errno, caused by the original.
    error = error.__cause__ or error.__context__
  return bare


def _rebuild_reason(record: dict | None, current: dict[str, list[int]], options: dict,
                    built: BuiltDataset, manual_dir: pathlib.Path) -> str | None:
  """Why a build no longer matches its folder and options (None: reuse it)."""
  if record is None:
    return "no record of the files it was built from (built by an earlier version)"
  changes = sources.describe_changes(record.get("files", {}), current, manual_dir)
  if changes:
    return f"source changed since the build ({changes})"
  old = record.get("options", {})
  # skip_bad changes nothing when nothing had to be skipped.
  differ = [k for k in options
            if old.get(k) != options[k] and (k != "skip_bad" or built.skipped)]
  if differ:
    return "built with other options (" + ", ".join(
        f"{k} was {old.get(k)}, now {options[k]}" for k in differ) + ")"
  return None


def prepare(dataset: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike, *,
            skip_bad: bool = False, resize_visible: bool | None = None,
            ir_folder: str | None = None, vis_folder: str | None = None,
            report: Callable[[str], None] | None = None) -> BuiltDataset:
  """Builds `dataset` from `manual_dir` into `data_dir` (idempotent) and describes it.

  A dataset already built in `data_dir` from the same folder is reused ("already built")
  while the folder's image files (names, sizes, modification times, or else contents) and the
  build options are those recorded with it; otherwise it is rebuilt, `report` being told why
  in one line. The earlier build stays in place until the new one is complete, and is kept if the
  rebuild fails. A build that fails or is killed midway leaves nothing that a later call
  takes as built (TFDS writes into an `incomplete.*` folder and renames it when done; such
  leftovers are removed by the next build).

  Args:
    dataset: a config name (`catalog.CONFIG_NAMES`).
    manual_dir: the folder holding the downloaded pairs.
    data_dir: the TFDS data_dir the build goes to.
    skip_bad: leave out bad pairs instead of failing.
    resize_visible: see `builders.FusionPairs`; None: the config's default.
    ir_folder: paired_folders: the sub-folder of infrared-slot images.
    vis_folder: paired_folders: the sub-folder of visible-slot images.
    report: called with one-line notes (why a rebuild, leftovers removed).

  Raises:
    sources.DataError: a path is unusable (missing, not a folder, unreadable, not writable), the
      folder's pairs have problems (unless skip_bad), `data_dir` holds this dataset built
      from another folder, or another build of it is running.
    BuildError: writing failed midway (disk full, permissions).
  """
  report = report or (lambda line: None)
  manual_dir, data_dir = pathlib.Path(manual_dir), pathlib.Path(data_dir)
  _check_folder_path(data_dir)
  options: dict[str, Any] = dict(skip_bad=skip_bad, resize_visible=resize_visible,
                                 ir_folder=ir_folder, vis_folder=vis_folder)
  builder = builders.make_builder(dataset, data_dir, **options)
  version_dir = pathlib.Path(builder.data_path)
  built = _built_info(builder, "already built") if builder.is_prepared() else None
  _check_readable(manual_dir, built)
  # One-line error before TFDS starts.
  layout = sources.find_layout(manual_dir, builder.layout_config)
  try:
    current = sources.scan_sources(manual_dir, [f for pair in layout.values() for f in pair])
  except OSError as e:
    raise sources.DataError(files.os_error_message(e)) from None
  reason = None
  if built is not None:
    if built.source and pathlib.Path(built.source) != manual_dir.resolve():
      raise sources.DataError(
          f"{built.data_dir}: already built from {built.source}, not {manual_dir.resolve()}; "
          "use another --data_dir or delete that folder")
    reason = _rebuild_reason(sources.read_source_record(version_dir), current,
                             builder.build_options, built, manual_dir)
    if reason is None:
      return built
  elif version_dir.exists():
    raise sources.DataError(f"{version_dir}: holds no complete build (no dataset_info.json); "
                            "delete that folder and run again")
  _check_writable(data_dir, version_dir.parent)
  with _build_lock(version_dir.parent):
    for leftover in sorted(version_dir.parent.glob(
        f"{tfds_constants.INCOMPLETE_PREFIX}*_{version_dir.name}")):
      shutil.rmtree(leftover, ignore_errors=True)
      report(f"removed an unfinished build left by an interrupted run: {leftover}")
    aside = None
    try:
      if reason is not None:
        report(f"{reason}: rebuilding")
        # Renamed, not deleted: it comes back if the rebuild fails. Its name marks it as
        # a leftover for the next build, should this process die before the end.
        aside = version_dir.with_name(f"{tfds_constants.INCOMPLETE_PREFIX}earlier"
                                      f"{secrets.token_hex(3).upper()}_{version_dir.name}")
        version_dir.rename(aside)
      # A fresh builder: one that read the earlier build carries its metadata.
      builders.make_builder(dataset, data_dir, **options).download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir.resolve())))
    except BaseException as e:
      kept = aside is not None and aside.exists() and not version_dir.exists()
      if kept and aside is not None:  # (kept implies it; said again for the type checker)
        aside.rename(version_dir)
      note = ("the earlier build is kept" if kept else
              "nothing half-written was kept" if aside is None else "")
      if isinstance(e, sources.DataError):
        if kept:
          raise sources.DataError(f"{e}\n({note}: {version_dir})") from None
        raise
      os_error = _as_os_error(e)
      if os_error is None:
        raise
      where = os_error.filename
      if not where or tfds_constants.INCOMPLETE_PREFIX in os.fspath(where):
        where = data_dir
      raise BuildError(f"{files.os_error_message(os_error, where)} while building "
                       f"'{dataset}'" + (f"; {note}" if note else "")) from None
    if aside is not None:
      shutil.rmtree(aside, ignore_errors=True)
  return _built_info(
      builders.make_builder(dataset, data_dir, ir_folder=ir_folder, vis_folder=vis_folder),
      "rebuilt" if reason else "built")


def source_changes(built: BuiltDataset) -> str | None:
  """How the source folder of a build has changed since (`1 file added, 2 modified`).

  None when unchanged, when the build has no record of its files, or when the folder no
  longer exists (a build is self-contained: the folder may have been deleted or left on
  another machine).

  Costs one directory listing per source folder and one `stat` per file, plus reading the
  files whose modification time changed (to compare their contents).
  """
  record = sources.read_source_record(built.data_dir)
  if record is None or not pathlib.Path(record.get("manual_dir", "")).is_dir():
    return None
  folders = [f for pair in dict(record.get("folders", {})).values() for f in pair]
  try:
    current = sources.scan_sources(record["manual_dir"], folders)
  except OSError as e:
    return f"unreadable now: {files.os_error_message(e)}"
  return sources.describe_changes(record.get("files", {}), current, record["manual_dir"])


def load_built(dataset: str, data_dir: str | os.PathLike) -> BuiltDataset:
  """Describes an already built dataset (raises `sources.DataError` when it is not built)."""
  builder = builders.make_builder(dataset, data_dir)
  if not builder.is_prepared():
    raise sources.DataError(f"{pathlib.Path(data_dir)}: no built '{dataset}' dataset "
                            "(run bin/prepare_data.py first)")
  return _built_info(builder)
