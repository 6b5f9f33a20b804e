"""The user's dataset folder: finding the image pairs in it, checking them, recording them.

`find_layout` maps a folder onto a config's layout (`catalog`), split by split; the pairs are
then checked from their file headers (`check_pairs`) and, for the problems only a decode finds,
by decoding them (`decode_problems`, `read_pair`); `format_report` lists every problem in one
report, and `DataError` carries it.

Each build records what it was built from in `source.json` in its version folder: the
source folder, the build options and every image file read (relative name, size,
modification time, SHA-256 of the contents). `prepare.prepare` reuses a build only while
these match, and `prepare.source_changes` tells the training pipeline when the folder has
changed since. A file whose modification time alone differs (a copy, a restore from backup)
is unchanged if its contents hash the same.

Imports no TFDS (the configs are only read here), so that `DataError` is cheap to import.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import pathlib
import stat
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from mmdrfuse_jax.errors import MMDRFuseError
from mmdrfuse_jax.io import imageio

if TYPE_CHECKING:  # For the annotations only: catalog imports TFDS.
  from mmdrfuse_jax.data import catalog

SPLIT_NAMES = ("train", "test", "validation")
# Folder names tried for each split, lower case.
_SPLIT_ALIASES = {"train": ("train", "training"), "test": ("test", "testing"),
                  "validation": ("validation", "val")}
# The record of what a build was made from, in its version folder.
SOURCE_RECORD = "source.json"
RECORD_FORMAT = 1


class DataError(MMDRFuseError, ValueError):
  """The user's dataset folder cannot be used; the message says why (one report)."""


# ---------------------------------------------------------------------------------------
# Finding the pairs in the user's folder.


def _child_dirs(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """Sub-folders by lower-case name (the first in sorted order wins on case clashes)."""
  found: dict[str, pathlib.Path] = {}
  for p in sorted(folder.iterdir()):
    if p.is_dir() and not p.name.startswith("."):
      found.setdefault(p.name.lower(), p)
  return found


def _find_modalities(folder: pathlib.Path,
                     config: catalog.FusionPairsConfig) -> tuple[pathlib.Path, pathlib.Path] | None:
  children = _child_dirs(folder)
  ir = next((children[n.lower()] for n in config.ir_candidates() if n.lower() in children), None)
  vis = next((children[n.lower()] for n in config.vis_candidates() if n.lower() in children), None)
  if ir is None or vis is None or ir == vis:
    return None
  return ir, vis


def _find_splits(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  children = _child_dirs(folder)
  splits = {}
  for split in SPLIT_NAMES:
    match = next((children[a] for a in _SPLIT_ALIASES[split] if a in children), None)
    if match is not None:
      splits[split] = match
  return splits


def find_layout(manual_dir: str | os.PathLike,
                config: catalog.FusionPairsConfig) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
  """Maps split name -> (infrared folder, visible folder) inside the user's folder.

  Raises:
    DataError: the folder is missing or holds no recognised layout.
  """
  root = pathlib.Path(manual_dir)
  if not root.is_dir():
    raise DataError(f"{root}: no such folder")
  pair = _find_modalities(root, config)
  if pair is not None:
    ir_splits, vis_splits = _find_splits(pair[0]), _find_splits(pair[1])
    common = [s for s in SPLIT_NAMES if s in ir_splits and s in vis_splits]
    if common:  # LLVIP-style: modality/split/.
      return {s: (ir_splits[s], vis_splits[s]) for s in common}
    return {"train": pair}
  layout = {}
  for split, split_dir in _find_splits(root).items():
    pair = _find_modalities(split_dir, config)
    if pair is not None:
      layout[split] = pair
  if not layout:
    ir_names = "/".join(config.ir_candidates())
    vis_names = "/".join(config.vis_candidates())
    raise DataError(
        f"{root}: no infrared and visible folders found for '{config.name}' "
        f"(expected {ir_names} and {vis_names}, directly or inside train/ and test/)")
  return layout


# ---------------------------------------------------------------------------------------
# Checking and reading the pairs.


def check_pairs(pairs: Sequence[tuple[str, tuple[pathlib.Path, ...]]], *,
                resize_visible: bool = False) -> tuple[list, list[str]]:
  """Cheap checks from file headers: readable and same size. Returns (good pairs, problems).

  `pairs`: (stem, (infrared path, visible path)), as `imageio.pair_folders` gives for two
  folders.
  """
  good, problems = [], []
  for stem, (ir_path, vis_path) in pairs:
    try:
      ir_size, vis_size = imageio.read_size(ir_path), imageio.read_size(vis_path)
    except imageio.ImageError as e:
      problems.append(str(e))
      continue
    if ir_size != vis_size and not resize_visible:
      problems.append(
          f"{ir_path}: pair of different sizes "
          f"({ir_path.parent.name}/{ir_path.name} is {ir_size[1]}x{ir_size[0]}, "
          f"{vis_path.parent.name}/{vis_path.name} is {vis_size[1]}x{vis_size[0]})")
      continue
    good.append((stem, (ir_path, vis_path)))
  return good, problems


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """PIL bicubic resize (antialiased when shrinking) of a uint8 gray or RGB image."""
  return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def read_pair(ir_path: pathlib.Path, vis_path: pathlib.Path, *,
              resize_visible: bool = False) -> dict:
  """Decodes a pair: gray uint8 `ir`/`vis` (H, W) and RGB `ir_color`/`vis_color` or None.

  With `resize_visible`, a visible image of another size is first resized (as 8-bit RGB
  or gray, `resize_image`) to the infrared size, then converted to gray; `resized` says so.

  Raises:
    ImageError: a file is unreadable or the two sizes differ (without resize_visible).
  """
  ir_raw, vis_raw = (imageio.to_8bit(imageio.read_image(p)) for p in (ir_path, vis_path))
  resized = ir_raw.shape[:2] != vis_raw.shape[:2]
  if resized and resize_visible:
    vis_raw = resize_image(vis_raw, *ir_raw.shape[:2])
  else:
    imageio.check_same_size([ir_path, vis_path], [ir_raw, vis_raw])
  out: dict[str, np.ndarray | bool | None] = {"resized": resized}
  for key, raw in (("ir", ir_raw), ("vis", vis_raw)):
    out[key] = imageio.to_gray_published(raw)
    out[f"{key}_color"] = raw if raw.ndim == 3 else None
  return out


def format_report(problems: Sequence[str], *, skipped: bool) -> str:
  head = (f"skipped {len(problems)} problem(s) in the dataset folder:" if skipped else
          f"{len(problems)} problem(s) in the dataset folder "
          "(fix them, or pass --skip_bad / skip_bad=True to leave those files out):")
  lines = [head, *(f"  - {p}" for p in problems)]
  if not skipped and any("pair of different sizes" in p for p in problems):
    lines.append("  (if the visible images are the same views at another resolution, "
                 "--resize_visible / resize_visible=True resizes them to the infrared size)")
  return "\n".join(lines)


def decode_problems(pairs, resize_visible: bool) -> list[str]:
  """The problems only a full decode finds (truncated or corrupt files), in pair order."""

  def check(item):
    _, (ir_path, vis_path) = item
    try:
      read_pair(ir_path, vis_path, resize_visible=resize_visible)
    except imageio.ImageError as e:
      return str(e)
    return None

  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    return [p for p in pool.map(check, pairs) if p is not None]


# ---------------------------------------------------------------------------------------
# What a build was made from.


def scan_sources(manual_dir: str | os.PathLike, folders: Sequence[str | os.PathLike], *,
                 with_hash: bool = False) -> dict[str, list]:
  """The image files a build reads: relative name -> [size, modification time in ns].

  With `with_hash`, each entry also has the SHA-256 of the file's contents (hex): the build
  records it, so that a later check can tell a copied file from a changed one.

  Only the files `imageio.pair_folders` considers (visible image files, symlinks followed)
  directly inside `folders`; a folder that no longer exists contributes nothing.

  Raises:
    OSError: a folder or file cannot be listed or inspected.
  """
  root = pathlib.Path(manual_dir)
  found: dict[str, list[int | str]] = {}
  for folder in dict.fromkeys(pathlib.Path(f) for f in folders):
    folder = folder if folder.is_absolute() else root / folder
    if not folder.is_dir():
      continue
    for path in folder.iterdir():
      if path.name.startswith(".") or path.suffix.lower() not in imageio.IMAGE_EXTENSIONS:
        continue
      try:
        st = path.stat()
      except FileNotFoundError:  # A dangling symlink: not an image the build can read.
        continue
      if stat.S_ISREG(st.st_mode):
        entry: list[int | str] = [st.st_size, st.st_mtime_ns]
        if with_hash:
          entry.append(file_sha256(path))
        found[path.relative_to(root).as_posix()] = entry
  return found


def file_sha256(path: str | os.PathLike) -> str:
  """The SHA-256 of a file's contents, hex."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def describe_changes(recorded: dict[str, list], current: dict[str, list],
                     manual_dir: str | os.PathLike | None = None) -> str | None:
  """`3 files added, 1 removed, 2 modified` between two `scan_sources`, or None when equal.

  A file of the recorded size whose modification time differs counts as modified unless
  the record has its SHA-256 and `manual_dir` is given, and its contents still hash the same.
  """
  def modified(name: str) -> bool:
    before, now = list(recorded[name]), list(current[name])
    if before[:2] == now[:2]:
      return False
    if before[0] != now[0] or len(before) < 3 or manual_dir is None:
      return True
    try:
      return file_sha256(pathlib.Path(manual_dir) / name) != before[2]
    except OSError:
      return True

  counts = [(len(current.keys() - recorded.keys()), "added"),
            (len(recorded.keys() - current.keys()), "removed"),
            (sum(modified(k) for k in current.keys() & recorded.keys()), "modified")]
  parts = [(n, what) for n, what in counts if n]
  if not parts:
    return None
  n, what = parts[0]
  return ", ".join([f"{n} file{'s' if n != 1 else ''} {what}", *(f"{n} {w}" for n, w in parts[1:])])


def layout_folders(manual_dir: pathlib.Path, layout) -> dict[str, list[str]]:
  """A `find_layout` as the record stores it: split -> [infrared, visible] relative folders."""
  return {s: [a.relative_to(manual_dir).as_posix(), b.relative_to(manual_dir).as_posix()]
          for s, (a, b) in layout.items()}


def read_source_record(version_dir: str | os.PathLike) -> dict | None:
  """The `source.json` of a build, or None (built before builds recorded it, or unreadable)."""
  try:
    record = json.loads((pathlib.Path(version_dir) / SOURCE_RECORD).read_text())
  except (OSError, ValueError):
    return None
  if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
    return None
  return record
