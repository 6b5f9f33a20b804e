"""The TFDS builder of the paired infrared/visible (and medical) fusion datasets.

One `FusionPairs` builder reads a folder of image pairs as users download it and stores
whole images in ArrayRecord files, so it runs without TensorFlow: images go to the
`Image` features as encoded PNG bytes (never NumPy arrays, whose encoding calls
TensorFlow) and are read back with `tfds.data_source`.

Its configs are the datasets of `catalog`; the pairs are found, checked and recorded by
`sources`; `make_builder` gives the builder of a dataset name, and `prepare.prepare` builds
with it.

Stored per pair: `ir` (gray), `vis` (gray), `ir_color`/`vis_color` (the original RGB when
that image has colour, else a 1x1 placeholder, with `ir_has_color`/`vis_has_color`),
`stem`, `ir_file`, `vis_file`, `height`, `width` and `image_id`: the pair's position in
sorted-stem order within its split (dense 0..n-1). Gray is PIL's `convert("L")`, as the
published code reads its training images; 16-bit files are scaled to 8 bits.

Each build records what it was built from in `source.json` (`sources.SOURCE_RECORD`) in its
version folder, written with the rest of the build.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import json
import os
import pathlib
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from mmdrfuse_jax.data import catalog, sources
from mmdrfuse_jax.io import files, imageio

BUILDER_NAME = "fusion_pairs"


# ---------------------------------------------------------------------------------------
# One pair as the builder's features.


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  # Fast compression: these files are read once per training run, and build time matters
  # more than disk for the datasets of the field.
  Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


_NO_COLOR = np.zeros((1, 1, 3), np.uint8)


def encode_pair(ir_path: pathlib.Path, vis_path: pathlib.Path,
                resize_visible: bool) -> dict | imageio.ImageError:
  """`sources.read_pair`, then PNG-encoded as the builder's features (or the ImageError)."""
  try:
    pair = sources.read_pair(ir_path, vis_path, resize_visible=resize_visible)
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
  BUILDER_CONFIGS = list(catalog.CONFIGS)

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
  def layout_config(self) -> catalog.FusionPairsConfig:
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
    layout = sources.find_layout(manual_dir, self.layout_config)
    # Taken before any file is read: a file changed during the build shows as changed later.
    folders = sources.layout_folders(manual_dir, layout)
    self._source_record = {
        "format": sources.RECORD_FORMAT, "manual_dir": str(manual_dir.resolve()),
        "options": self.build_options, "folders": folders,
        "files": sources.scan_sources(manual_dir,
                                      [f for pair in folders.values() for f in pair],
                                      with_hash=True)}
    problems: list[str] = []
    split_pairs = {}
    for split, (ir_dir, vis_dir) in layout.items():
      try:
        pairing = imageio.pair_folders([ir_dir, vis_dir])
      except imageio.ImageError as e:
        raise sources.DataError(str(e)) from None
      good, bad = sources.check_pairs(pairing.pairs, resize_visible=self.resize_visible)
      problems += pairing.problems + bad
      split_pairs[split] = good
    if problems and not self._skip_bad:
      # Decode the rest too, so that the one report lists every bad file.
      for split, pairs in split_pairs.items():
        problems += sources.decode_problems(pairs, self.resize_visible)
      raise sources.DataError(sources.format_report(problems, skipped=False))
    split_pairs = {s: pairs for s, pairs in split_pairs.items() if pairs}
    if not split_pairs:
      raise sources.DataError(f"{manual_dir}: no usable pair left\n"
                              f"{sources.format_report(problems, skipped=True)}")
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
      with files.atomic_write(pathlib.Path(self.data_dir) / sources.SOURCE_RECORD, "w") as f:
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
        raise sources.DataError(sources.format_report(problems, skipped=False))
      self.info.metadata["skipped"].extend(problems)


def make_builder(dataset: str, data_dir: str | os.PathLike, *, skip_bad: bool = False,
                 resize_visible: bool | None = None, ir_folder: str | None = None,
                 vis_folder: str | None = None) -> FusionPairs:
  """A `FusionPairs` builder for a named config writing to / reading from `data_dir`."""
  if dataset not in catalog.CONFIG_NAMES:
    raise sources.DataError(f"unknown dataset {dataset!r}; choose one of "
                            f"{', '.join(catalog.CONFIG_NAMES)}")
  if (ir_folder or vis_folder) and dataset != "paired_folders":
    raise sources.DataError("--ir_folder/--vis_folder are only for --dataset paired_folders")
  return FusionPairs(config=dataset, data_dir=os.fspath(data_dir), file_format="array_record",
                     skip_bad=skip_bad, resize_visible=resize_visible,
                     ir_folder=ir_folder or None, vis_folder=vis_folder or None)
