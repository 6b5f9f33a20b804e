"""TFDS builders for the paired infrared/visible (and medical) fusion datasets.

One `FusionPairs` builder reads a folder of image pairs as users download it and stores
whole images in ArrayRecord files, so it runs without TensorFlow: images go to the
`Image` features as encoded PNG bytes (never NumPy arrays, whose encoding calls
TensorFlow) and are read back with `tfds.data_source`.

Every config accepts a folder holding just `ir/` and `vi/`; each also knows the layout its
dataset is distributed in (see `MANUAL_DOWNLOAD_INSTRUCTIONS`). A folder without split
sub-folders becomes the `train` split.

Stored per pair: `ir` (gray), `vis` (gray), `ir_color`/`vis_color` (the original RGB when
that image has colour, else a 1x1 placeholder, with `ir_has_color`/`vis_has_color`),
`stem`, `ir_file`, `vis_file`, `height`, `width` and `image_id`: the pair's position in
sorted-stem order within its split (dense 0..n-1). Gray is PIL's `convert("L")`, as the
published code reads its training images; 16-bit files are scaled to 8 bits.

Each build records what it was built from in `source.json` in its version folder: the
source folder, the build options and every image file read (relative name, size,
modification time, SHA-256 of the contents). `prepare` reuses a build only while these match,
and `source_changes` tells the training pipeline when the folder has changed since. A file
whose modification time alone differs (a copy, a restore from backup) is unchanged if its
contents hash the same.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import pathlib
import secrets
import shutil
import stat
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tensorflow_datasets.core import constants as tfds_constants

from mmdrfuse_jax.errors import MMDRFuseError
from mmdrfuse_jax.io import files, imageio

try:
  import fcntl
except ImportError:  # Not POSIX: builds are not locked against each other.
  fcntl = None  # type: ignore[assignment]  # the optional-module idiom; None is checked at use

BUILDER_NAME = "fusion_pairs"
SPLIT_NAMES = ("train", "test", "validation")
# Folder names tried for each split, lower case.
_SPLIT_ALIASES = {"train": ("train", "training"), "test": ("test", "testing"),
                  "validation": ("validation", "val")}
_COMMON_LAYOUT = ("  <manual_dir>/ir/  and  <manual_dir>/vi/   "
                  "(files paired by name: ir/00001.png <-> vi/00001.jpg)")
# The record of what a build was made from, in its version folder.
SOURCE_RECORD = "source.json"
_RECORD_FORMAT = 1
# Write failures that arrive as other exceptions (ArrayRecord raises RuntimeError with the
# system's message) are recognised by the system's wording of these errors.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


class DataError(MMDRFuseError, ValueError):
  """The user's dataset folder cannot be used; the message says why (one report)."""


class BuildError(MMDRFuseError, RuntimeError):
  """Writing a build failed midway (disk full, permissions); nothing half-written is kept."""


@dataclasses.dataclass(eq=False)
class FusionPairsConfig(tfds.core.BuilderConfig):
  """Where a dataset's two modalities live inside the user's folder.

  Attributes:
    ir_folders: names (case-insensitive) of the folder with the infrared-slot images
      (infrared, or PET/SPECT/CT for the medical pairs), tried in order; `ir` is always tried.
    vis_folders: the same for the visible-slot images (visible, or MRI); `vi` is always tried.
    homepage: where users get the data.
    layout: the layouts the dataset is distributed in, for the instructions.
    resize_visible: by default, resize a visible image whose size differs from its
      infrared partner's to that size (RoadScene's `crop_HR_visible` images are about
      2.8 x 3.1 times their infrared partners; its `crop_LR_visible` are them scaled down).
  """

  ir_folders: tuple[str, ...] = ()
  vis_folders: tuple[str, ...] = ()
  homepage: str = ""
  layout: str = ""
  resize_visible: bool = False

  def ir_candidates(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*self.ir_folders, "ir"]))

  def vis_candidates(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*self.vis_folders, "vi"]))

  def instructions(self) -> str:
    return (
        f"{self.description}\nGet it from: {self.homepage}\n"
        f"Point --manual_dir at the folder holding it. Accepted layouts:\n"
        f"{self.layout}\n{_COMMON_LAYOUT}\n"
        "  or train/ and test/ sub-folders each holding one of these pairs of folders.\n"
        "A folder without train/test sub-folders becomes the `train` split."
    )


def _config(name, ir, vis, homepage, layout, description,
            resize_visible=False) -> FusionPairsConfig:
  return FusionPairsConfig(
      name=name, version=tfds.core.Version("1.0.0"), description=description,
      ir_folders=tuple(ir), vis_folders=tuple(vis), homepage=homepage, layout=layout,
      resize_visible=resize_visible)


CONFIGS = (
    _config("msrs", ["ir", "Infrared"], ["vi", "Visible"], "https://github.com/Linfeng-Tang/MSRS",
            "  <manual_dir>/train/{ir,vi}/  and  <manual_dir>/test/{ir,vi}/   "
            "(as in the MSRS repository)",
            "MSRS: 1,083 train and 361 test aligned infrared/visible road scenes (480x640)."),
    _config("llvip", ["infrared", "ir"], ["visible", "vi"], "https://bupt-ai-cz.github.io/LLVIP/",
            "  <manual_dir>/infrared/{train,test}/  and  <manual_dir>/visible/{train,test}/   "
            "(the LLVIP archive)",
            "LLVIP: 15,488 low-light infrared/visible pairs (1280x1024), train/test split."),
    _config("roadscene", ["cropinfrared", "ir", "Infrared"], ["crop_LR_visible", "vi", "Visible"],
            "https://github.com/hanna-xu/RoadScene",
            "  <manual_dir>/cropinfrared/  and  <manual_dir>/crop_LR_visible/   "
            "(the RoadScene repository;\n"
            "  crop_HR_visible/ images may stand in for crop_LR_visible/: "
            "they are resized to the infrared size)",
            "RoadScene: 221 aligned infrared/visible road scenes (various sizes).",
            resize_visible=True),
    _config("tno", ["Infrared", "IR", "ir"], ["Visible", "VIS", "vi"],
            "https://figshare.com/articles/dataset/TNO_Image_Fusion_Dataset/1008029",
            "  <manual_dir>/Infrared/  and  <manual_dir>/Visible/   "
            "(TNO pairs, renamed so the two files share a name)",
            "TNO Image Fusion Dataset: military and surveillance infrared/visible pairs."),
    _config("m3fd", ["Ir", "Infrared"], ["Vis", "Visible"], "https://github.com/JinyuanLiu-CV/TarDAL",
            "  <manual_dir>/Ir/  and  <manual_dir>/Vis/   (M3FD_Fusion or M3FD_Detection)",
            "M3FD: 4,200 infrared/visible pairs (1024x768) from the TarDAL project."),
    _config("harvard_mri_pet", ["PET"], ["MRI"], "http://www.med.harvard.edu/AANLIB/home.html",
            "  <manual_dir>/PET/  and  <manual_dir>/MRI/   "
            "(PET in the infrared slot, MRI in the visible slot)",
            "Harvard Whole Brain Atlas MRI-PET pairs (256x256; PET in colour)."),
    _config("harvard_mri_spect", ["SPECT"], ["MRI"], "http://www.med.harvard.edu/AANLIB/home.html",
            "  <manual_dir>/SPECT/  and  <manual_dir>/MRI/   "
            "(SPECT in the infrared slot, MRI in the visible slot)",
            "Harvard Whole Brain Atlas MRI-SPECT pairs (256x256; SPECT in colour)."),
    _config("harvard_mri_ct", ["CT"], ["MRI"], "http://www.med.harvard.edu/AANLIB/home.html",
            "  <manual_dir>/CT/  and  <manual_dir>/MRI/   "
            "(CT in the infrared slot, MRI in the visible slot)",
            "Harvard Whole Brain Atlas MRI-CT pairs (256x256)."),
    _config("paired_folders", [], [], "your own data",
            "  <manual_dir>/<ir_folder>/  and  <manual_dir>/<vis_folder>/   "
            "(names given with --ir_folder/--vis_folder)",
            "Any two folders of aligned image pairs, matched by file name."),
)
CONFIG_NAMES = tuple(c.name for c in CONFIGS)


def paired_folders_config(ir_folder: str, vis_folder: str) -> FusionPairsConfig:
  """The generic config for two user-named sub-folders (`ir/` and `vi/` are also accepted).

  For finding the folders (`find_layout`) only: a builder is never given it (TFDS refuses a
  config named like one of the builder's own); `FusionPairs` takes the names as options.
  """
  base = next(c for c in CONFIGS if c.name == "paired_folders")
  return dataclasses.replace(base, ir_folders=(ir_folder,), vis_folders=(vis_folder,))


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
                     config: FusionPairsConfig) -> tuple[pathlib.Path, pathlib.Path] | None:
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
                config: FusionPairsConfig) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
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
# Reading one pair.


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  # Fast compression: these files are read once per training run, and build time matters
  # more than disk for the datasets of the field.
  Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


_NO_COLOR = np.zeros((1, 1, 3), np.uint8)


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


def encode_pair(ir_path: pathlib.Path, vis_path: pathlib.Path,
                resize_visible: bool) -> dict | imageio.ImageError:
  """`read_pair`, then PNG-encoded as the builder's features (or the ImageError)."""
  try:
    pair = read_pair(ir_path, vis_path, resize_visible=resize_visible)
  except imageio.ImageError as e:
    return e
  height, width = pair["ir"].shape
  return {
      "ir": _png(pair["ir"]),
      "vis": _png(pair["vis"]),
      "ir_color": _png(pair["ir_color"] if pair["ir_color"] is not None else _NO_COLOR),
      "vis_color": _png(pair["vis_color"] if pair["vis_color"] is not None else _NO_COLOR),
      "ir_has_color": pair["ir_color"] is not None,
      "vis_has_color": pair["vis_color"] is not None,
      "height": height,
      "width": width,
      "resized": pair["resized"],
  }


def _encode_in_threads(pairs, resize_visible: bool, num_threads: int | None = None):
  """Yields (stem, ir_path, vis_path, encode_pair(...)) in input order, decoding in threads.

  PIL releases the GIL while decoding, resizing and encoding, so threads scale; at most
  2 * num_threads pairs are held at once.
  """
  num_threads = num_threads or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    pending: collections.deque[tuple[str, pathlib.Path, pathlib.Path,
                                     concurrent.futures.Future[dict | imageio.ImageError]]]
    pending = collections.deque()
    for stem, (ir_path, vis_path) in pairs:
      pending.append((stem, ir_path, vis_path,
                      pool.submit(encode_pair, ir_path, vis_path, resize_visible)))
      if len(pending) >= 2 * num_threads:
        stem_, a, b, fut = pending.popleft()
        yield stem_, a, b, fut.result()
    while pending:
      stem_, a, b, fut = pending.popleft()
      yield stem_, a, b, fut.result()


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


def _layout_folders(manual_dir: pathlib.Path, layout) -> dict[str, list[str]]:
  return {s: [a.relative_to(manual_dir).as_posix(), b.relative_to(manual_dir).as_posix()]
          for s, (a, b) in layout.items()}


def read_source_record(version_dir: str | os.PathLike) -> dict | None:
  """The `source.json` of a build, or None (built before builds recorded it, or unreadable)."""
  try:
    record = json.loads((pathlib.Path(version_dir) / SOURCE_RECORD).read_text())
  except (OSError, ValueError):
    return None
  if not isinstance(record, dict) or record.get("format") != _RECORD_FORMAT:
    return None
  return record


# ---------------------------------------------------------------------------------------
# The builder.


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """A DatasetInfo that never looks for itself on TFDS's public bucket.

  TFDS asks gs://tfds-data for the precomputed info of every dataset it has not built yet and
  leaves an empty temporary folder in /tmp each time; ours are built from local files only.
  """

  def initialize_from_bucket(self) -> None:
    pass


class FusionPairs(tfds.core.GeneratorBasedBuilder):
  """Aligned image pairs for fusion, read from a manually downloaded folder."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = list(CONFIGS)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS's own lookup needs the `importlib_resources` backport for packages that are not
    # zipapps; this file's path is all it wants (for an optional checksums file).
    return epath.Path(__file__)

  def __init__(self, *, skip_bad: bool = False, resize_visible: bool | None = None,
               ir_folder: str | None = None, vis_folder: str | None = None, **kwargs):
    """As `tfds.core.GeneratorBasedBuilder`, plus build options.

    Args:
      skip_bad: leave out bad pairs (the metadata's `skipped` lists them) instead of failing.
      resize_visible: resize visible images to their infrared partner's size instead of
        reporting the pair; None: the config's default (on for `roadscene` only).
      ir_folder: the sub-folder of infrared-slot images, tried before `ir/` (instead of the
        config's names); None: the config's.
      vis_folder: the same for the visible-slot images (`vi/` is tried after it).
      **kwargs: for `tfds.core.GeneratorBasedBuilder` (data_dir, config, file_format...).
    """
    self._skip_bad = skip_bad
    self._resize_visible = resize_visible
    # Options, not a config of their own: the build stays `<config>/<version>` where training
    # finds it by the config's name, and TFDS refuses a custom config named like a class one.
    self._ir_folder = ir_folder
    self._vis_folder = vis_folder
    super().__init__(**kwargs)

  # TFDS prints download sizes (none here) to stdout; bin/prepare_data.py says what it built.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  @property
  def resize_visible(self) -> bool:
    if self._resize_visible is None:
      return self.builder_config.resize_visible
    return self._resize_visible

  @property
  def layout_config(self) -> FusionPairsConfig:
    """The builder config with the folder names given as options (`ir_folder`, `vis_folder`)."""
    if self._ir_folder is None and self._vis_folder is None:
      return self.builder_config
    return dataclasses.replace(self.builder_config, ir_folders=(self._ir_folder or "ir",),
                               vis_folders=(self._vis_folder or "vi",))

  @property
  def build_options(self) -> dict:
    """The options that decide what a build holds, as recorded in `source.json`."""
    config = self.layout_config
    return {"config": config.name, "ir_folders": list(config.ir_candidates()),
            "vis_folders": list(config.vis_candidates()), "resize_visible": self.resize_visible,
            "skip_bad": self._skip_bad}

  @property
  def MANUAL_DOWNLOAD_INSTRUCTIONS(self) -> str:  # pylint: disable=invalid-name
    return self.builder_config.instructions()

  def _info(self) -> tfds.core.DatasetInfo:
    def gray():
      return tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png")

    def color():
      return tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="png")

    return _LocalDatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=tfds.features.FeaturesDict({
            "ir": gray(),
            "vis": gray(),
            "ir_color": color(),
            "vis_color": color(),
            "ir_has_color": np.bool_,
            "vis_has_color": np.bool_,
            "stem": tfds.features.Text(),
            "ir_file": tfds.features.Text(),
            "vis_file": tfds.features.Text(),
            "height": np.int32,
            "width": np.int32,
            "image_id": np.int64,
        }),
        homepage=self.builder_config.homepage,
        # Records keep generation order, so record i is image_id i.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    layout = find_layout(manual_dir, self.layout_config)
    # Taken before any file is read: a file changed during the build shows as changed later.
    folders = _layout_folders(manual_dir, layout)
    self._source_record = {
        "format": _RECORD_FORMAT, "manual_dir": str(manual_dir.resolve()),
        "options": self.build_options, "folders": folders,
        "files": scan_sources(manual_dir, [f for pair in folders.values() for f in pair],
                              with_hash=True)}
    problems: list[str] = []
    split_pairs = {}
    for split, (ir_dir, vis_dir) in layout.items():
      try:
        pairing = imageio.pair_folders([ir_dir, vis_dir])
      except imageio.ImageError as e:
        raise DataError(str(e)) from None
      good, bad = check_pairs(pairing.pairs, resize_visible=self.resize_visible)
      problems += pairing.problems + bad
      split_pairs[split] = good
    if problems and not self._skip_bad:
      # Decode the rest too, so that the one report lists every bad file.
      for split, pairs in split_pairs.items():
        problems += decode_problems(pairs, self.resize_visible)
      raise DataError(format_report(problems, skipped=False))
    split_pairs = {s: pairs for s, pairs in split_pairs.items() if pairs}
    if not split_pairs:
      raise DataError(f"{manual_dir}: no usable pair left\n{format_report(problems, skipped=True)}")
    meta = self.info.metadata
    meta["source"] = {"manual_dir": str(manual_dir.resolve()), "folders": folders}
    meta["skipped"] = list(problems)
    meta["resize_visible"] = self.resize_visible
    meta["resized"] = {}
    meta["images"] = {}
    return {split: self._generate_examples(split, pairs) for split, pairs in split_pairs.items()}

  def _download_and_prepare(self, dl_manager, download_config) -> None:
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    # `data_dir` is TFDS's temporary `incomplete.*` folder here: the record is renamed into
    # place with the rest of the build, or removed with it.
    record = getattr(self, "_source_record", None)
    if record is not None:  # None: no split was generated (max_examples_per_split=0).
      with files.atomic_write(pathlib.Path(self.data_dir) / SOURCE_RECORD, "w") as f:
        json.dump(record, f)

  def _generate_examples(self, split: str, pairs) -> Iterator[tuple[int, dict]]:
    table = self.info.metadata["images"].setdefault(split, [])
    resized = self.info.metadata["resized"].setdefault(split, [])
    problems = []
    for stem, ir_path, vis_path, encoded in _encode_in_threads(pairs, self.resize_visible):
      if isinstance(encoded, imageio.ImageError):
        problems.append(str(encoded))
        continue
      if encoded.pop("resized"):
        resized.append(stem)
      image_id = len(table)
      table.append([stem, encoded["height"], encoded["width"]])
      yield image_id, {**encoded, "stem": stem, "ir_file": ir_path.name, "vis_file": vis_path.name,
                       "image_id": image_id}
    if problems:
      # Found only by decoding (the header checks passed): raise after the loop so the
      # report lists every such file; the failed build leaves nothing behind.
      if not self._skip_bad:
        raise DataError(format_report(problems, skipped=False))
      self.info.metadata["skipped"].extend(problems)


# ---------------------------------------------------------------------------------------
# Library entry points (used by bin/prepare_data.py and the pipeline).


def make_builder(dataset: str, data_dir: str | os.PathLike, *, skip_bad: bool = False,
                 resize_visible: bool | None = None, ir_folder: str | None = None,
                 vis_folder: str | None = None) -> FusionPairs:
  """A `FusionPairs` builder for a named config writing to / reading from `data_dir`."""
  if dataset not in CONFIG_NAMES:
    raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(CONFIG_NAMES)}")
  if (ir_folder or vis_folder) and dataset != "paired_folders":
    raise DataError("--ir_folder/--vis_folder are only for --dataset paired_folders")
  return FusionPairs(config=dataset, data_dir=os.fspath(data_dir), file_format="array_record",
                     skip_bad=skip_bad, resize_visible=resize_visible,
                     ir_folder=ir_folder or None, vis_folder=vis_folder or None)


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


def _built_info(builder: FusionPairs, status: str = "built") -> BuiltDataset:
  meta = builder.info.metadata or {}
  images = {s: [(str(a), int(b), int(c)) for a, b, c in rows]
            for s, rows in dict(meta.get("images", {})).items()}
  return BuiltDataset(
      data_dir=pathlib.Path(builder.data_dir), images=images, skipped=list(meta.get("skipped", [])),
      resized={s: list(v) for s, v in dict(meta.get("resized", {})).items()},
      source=str(dict(meta.get("source", {})).get("manual_dir", "")), status=status)


def _check_folder_path(path: pathlib.Path) -> None:
  """DataError when `path`, or the nearest part of it that exists, is not a folder."""
  existing = path
  while not existing.exists() and existing.parent != existing:
    existing = existing.parent
  if not existing.is_dir():
    raise DataError(f"{path}: is a file, not a folder" if existing == path else
                    f"{path}: {existing} is a file, not a folder")


def _check_readable(manual_dir: pathlib.Path, built: BuiltDataset | None) -> None:
  if not manual_dir.exists():
    kept = ""
    if built is not None and built.source == str(manual_dir.resolve()):
      kept = f" (the dataset built from it in {built.data_dir} is still usable)"
    raise DataError(f"{manual_dir}: no such folder{kept}")
  if not manual_dir.is_dir():
    raise DataError(f"{manual_dir}: is a file, not a folder")
  try:
    with os.scandir(manual_dir) as entries:
      next(entries, None)
  except OSError as e:
    raise DataError(files.os_error_message(e, manual_dir)) from None


def _check_writable(*folders: pathlib.Path) -> None:
  """DataError naming the first folder that cannot be created or written into."""
  for folder in folders:
    try:
      files.prepare_folder(folder, "data_dir")
    except files.OutputError as e:
      raise DataError(str(e)) from None


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
      raise DataError(f"{folder}: another build of this dataset is running now; "
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
  changes = describe_changes(record.get("files", {}), current, manual_dir)
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
    dataset: a config name (`CONFIG_NAMES`).
    manual_dir: the folder holding the downloaded pairs.
    data_dir: the TFDS data_dir the build goes to.
    skip_bad: leave out bad pairs instead of failing.
    resize_visible: see `FusionPairs`; None: the config's default.
    ir_folder: paired_folders: the sub-folder of infrared-slot images.
    vis_folder: paired_folders: the sub-folder of visible-slot images.
    report: called with one-line notes (why a rebuild, leftovers removed).

  Raises:
    DataError: a path is unusable (missing, not a folder, unreadable, not writable), the
      folder's pairs have problems (unless skip_bad), `data_dir` holds this dataset built
      from another folder, or another build of it is running.
    BuildError: writing failed midway (disk full, permissions).
  """
  report = report or (lambda line: None)
  manual_dir, data_dir = pathlib.Path(manual_dir), pathlib.Path(data_dir)
  _check_folder_path(data_dir)
  options: dict[str, Any] = dict(skip_bad=skip_bad, resize_visible=resize_visible,
                                 ir_folder=ir_folder, vis_folder=vis_folder)
  builder = make_builder(dataset, data_dir, **options)
  version_dir = pathlib.Path(builder.data_path)
  built = _built_info(builder, "already built") if builder.is_prepared() else None
  _check_readable(manual_dir, built)
  layout = find_layout(manual_dir, builder.layout_config)  # One-line error before TFDS starts.
  try:
    current = scan_sources(manual_dir, [f for pair in layout.values() for f in pair])
  except OSError as e:
    raise DataError(files.os_error_message(e)) from None
  reason = None
  if built is not None:
    if built.source and pathlib.Path(built.source) != manual_dir.resolve():
      raise DataError(
          f"{built.data_dir}: already built from {built.source}, not {manual_dir.resolve()}; "
          "use another --data_dir or delete that folder")
    reason = _rebuild_reason(read_source_record(version_dir), current, builder.build_options,
                             built, manual_dir)
    if reason is None:
      return built
  elif version_dir.exists():
    raise DataError(f"{version_dir}: holds no complete build (no dataset_info.json); "
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
      make_builder(dataset, data_dir, **options).download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir.resolve())))
    except BaseException as e:
      kept = aside is not None and aside.exists() and not version_dir.exists()
      if kept and aside is not None:  # (kept implies it; said again for the type checker)
        aside.rename(version_dir)
      note = ("the earlier build is kept" if kept else
              "nothing half-written was kept" if aside is None else "")
      if isinstance(e, DataError):
        if kept:
          raise DataError(f"{e}\n({note}: {version_dir})") from None
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
  return _built_info(make_builder(dataset, data_dir, ir_folder=ir_folder, vis_folder=vis_folder),
                     "rebuilt" if reason else "built")


def source_changes(built: BuiltDataset) -> str | None:
  """How the source folder of a build has changed since (`1 file added, 2 modified`).

  None when unchanged, when the build has no record of its files, or when the folder no
  longer exists (a build is self-contained: the folder may have been deleted or left on
  another machine).

  Costs one directory listing per source folder and one `stat` per file, plus reading the
  files whose modification time changed (to compare their contents).
  """
  record = read_source_record(built.data_dir)
  if record is None or not pathlib.Path(record.get("manual_dir", "")).is_dir():
    return None
  folders = [f for pair in dict(record.get("folders", {})).values() for f in pair]
  try:
    current = scan_sources(record["manual_dir"], folders)
  except OSError as e:
    return f"unreadable now: {files.os_error_message(e)}"
  return describe_changes(record.get("files", {}), current, record["manual_dir"])
def load_built(dataset: str, data_dir: str | os.PathLike) -> BuiltDataset:
  """Describes an already built dataset (raises DataError when it is not built)."""
  builder = make_builder(dataset, data_dir)
  if not builder.is_prepared():
    raise DataError(f"{pathlib.Path(data_dir)}: no built '{dataset}' dataset "
                    "(run bin/prepare_data.py first)")
  return _built_info(builder)
