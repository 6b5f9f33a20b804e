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
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import os
import pathlib
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from mmdrfuse_jax import imageio

BUILDER_NAME = "fusion_pairs"
SPLIT_NAMES = ("train", "test", "validation")
# Folder names tried for each split, lower case.
_SPLIT_ALIASES = {"train": ("train", "training"), "test": ("test", "testing"),
                  "validation": ("validation", "val")}
_COMMON_LAYOUT = ("  <manual_dir>/ir/  and  <manual_dir>/vi/   "
                  "(files paired by name: ir/00001.png <-> vi/00001.jpg)")


class DataError(ValueError):
  """The user's dataset folder cannot be used; the message says why (one report)."""


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
  """The generic config for two user-named sub-folders (`ir/` and `vi/` are also accepted)."""
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


def check_pairs(pairs: Sequence[tuple[str, tuple[pathlib.Path, pathlib.Path]]], *,
                resize_visible: bool = False) -> tuple[list, list[str]]:
  """Cheap checks from file headers: readable and same size. Returns (good pairs, problems)."""
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
  out = {"resized": resized}
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
# The builder.


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

  def __init__(self, *, skip_bad: bool = False, resize_visible: bool | None = None, **kwargs):
    """As `tfds.core.GeneratorBasedBuilder`, plus build options.

    Args:
      skip_bad: leave out bad pairs (the metadata's `skipped` lists them) instead of failing.
      resize_visible: resize visible images to their infrared partner's size instead of
        reporting the pair; None: the config's default (on for `roadscene` only).
      **kwargs: for `tfds.core.GeneratorBasedBuilder` (data_dir, config, file_format...).
    """
    self._skip_bad = skip_bad
    self._resize_visible = resize_visible
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
  def MANUAL_DOWNLOAD_INSTRUCTIONS(self) -> str:  # pylint: disable=invalid-name
    return self.builder_config.instructions()

  def _info(self) -> tfds.core.DatasetInfo:
    def gray():
      return tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png")

    def color():
      return tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="png")

    return tfds.core.DatasetInfo(
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
    layout = find_layout(manual_dir, self.builder_config)
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
    meta["source"] = {
        "manual_dir": str(manual_dir.resolve()),
        "folders": {s: [str(a.relative_to(manual_dir)), str(b.relative_to(manual_dir))]
                    for s, (a, b) in layout.items()},
    }
    meta["skipped"] = list(problems)
    meta["resize_visible"] = self.resize_visible
    meta["resized"] = {}
    meta["images"] = {}
    return {split: self._generate_examples(split, pairs) for split, pairs in split_pairs.items()}

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
  config: str | FusionPairsConfig = dataset
  if dataset == "paired_folders":
    if ir_folder or vis_folder:
      config = paired_folders_config(ir_folder or "ir", vis_folder or "vi")
  elif ir_folder or vis_folder:
    raise DataError("--ir_folder/--vis_folder are only for --dataset paired_folders")
  return FusionPairs(config=config, data_dir=os.fspath(data_dir), file_format="array_record",
                     skip_bad=skip_bad, resize_visible=resize_visible)


@dataclasses.dataclass(frozen=True)
class BuiltDataset:
  """What was built: where, and per split the images' (stem, height, width) in image-id order.

  Attributes:
    data_dir: the dataset's version folder.
    images: split -> list of (stem, height, width), index = image_id.
    skipped: problems left out with skip_bad.
    resized: split -> stems whose visible image was resized to the infrared size.
    source: the folder it was built from.
  """

  data_dir: pathlib.Path
  images: dict[str, list[tuple[str, int, int]]]
  skipped: list[str]
  resized: dict[str, list[str]]
  source: str


def _built_info(builder: FusionPairs) -> BuiltDataset:
  meta = builder.info.metadata or {}
  images = {s: [(str(a), int(b), int(c)) for a, b, c in rows]
            for s, rows in dict(meta.get("images", {})).items()}
  return BuiltDataset(
      data_dir=pathlib.Path(builder.data_dir), images=images, skipped=list(meta.get("skipped", [])),
      resized={s: list(v) for s, v in dict(meta.get("resized", {})).items()},
      source=str(dict(meta.get("source", {})).get("manual_dir", "")))


def prepare(dataset: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike, *,
            skip_bad: bool = False, resize_visible: bool | None = None,
            ir_folder: str | None = None, vis_folder: str | None = None) -> BuiltDataset:
  """Builds `dataset` from `manual_dir` into `data_dir` (idempotent) and describes it.

  A dataset already built in `data_dir` is reused when it came from the same folder.

  Raises:
    DataError: the folder is unusable, its pairs have problems (unless skip_bad), or
      `data_dir` already holds this dataset built from another folder.
  """
  builder = make_builder(dataset, data_dir, skip_bad=skip_bad, resize_visible=resize_visible,
                         ir_folder=ir_folder, vis_folder=vis_folder)
  manual_dir = pathlib.Path(manual_dir)
  if builder.is_prepared():
    built = _built_info(builder)
    if built.source and manual_dir.is_dir() and pathlib.Path(built.source) != manual_dir.resolve():
      raise DataError(
          f"{built.data_dir}: already built from {built.source}, not {manual_dir.resolve()}; "
          "use another --data_dir or delete that folder")
    return built
  find_layout(manual_dir, builder.builder_config)  # One-line error before TFDS starts.
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir.resolve())))
  return _built_info(make_builder(dataset, data_dir, ir_folder=ir_folder, vis_folder=vis_folder))


def load_built(dataset: str, data_dir: str | os.PathLike) -> BuiltDataset:
  """Describes an already built dataset (raises DataError when it is not built)."""
  builder = make_builder(dataset, data_dir)
  if not builder.is_prepared():
    raise DataError(f"{pathlib.Path(data_dir)}: no built '{dataset}' dataset "
                    "(run bin/prepare_data.py first)")
  return _built_info(builder)
