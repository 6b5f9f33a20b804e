"""Patch pipeline: the published training patches, shuffled per epoch, resumable.

Images are uint8 gray, held decoded in memory (`PatchDataset`) or read from a built
dataset's ArrayRecord files as batches need them (`StreamingPatchDataset`: the same batches,
in host RAM only the patch index); a patch is a slice of one. Patches are
`patch_size` x `patch_size`, taken every `patch_stride` pixels from the top-left corner
(SPEC section 5: 128/128, no overlap; an image contributes floor((H-P)/S+1) x
floor((W-P)/S+1) patches). Patch ids are dense, 0..N-1, in (image_id, row, column) order,
so they depend only on the images' sizes and order and can index per-patch memories.

An epoch is a permutation of all patch ids drawn from (seed, epoch) alone, cut into
batches with the last incomplete one dropped. The iteration state is
`{"epoch": e, "step": s}`: the next batch to deliver is batch s of epoch e. Saving it with
the model and passing it back as `start_state` resumes the exact batch sequence.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import threading
from typing import Any, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np
from PIL import Image

from mmdrfuse_jax.data import augment
from mmdrfuse_jax.io import imageio

DEFAULT_PATCH_SIZE = 128
DEFAULT_PATCH_STRIDE = 128
# `config.data.streaming`: "auto" streams a split whose decoded gray images (infrared and
# visible) would take more than this much host RAM (LLVIP's train split: 31.5 GB; MSRS's:
# 0.67 GB).
STREAMING_CHOICES = ("auto", "on", "off")
AUTO_STREAMING_BYTES = 2 << 30
# Decoded images a `StreamingPatchDataset` keeps across batches: a fixed amount, whatever
# the dataset's size (64 pairs of 512x512, 12 of LLVIP's 1280x1024).
DEFAULT_CACHE_BYTES = 32 << 20

Batch = dict[str, Any]
State = dict[str, int]


def patch_grid(height: int, width: int, patch_size: int, patch_stride: int) -> tuple[int, int]:
  """(rows, cols) of patches an image of this size gives (0 when it is smaller than a patch)."""
  if height < patch_size or width < patch_size:
    return 0, 0
  return (height - patch_size) // patch_stride + 1, (width - patch_size) // patch_stride + 1


def count_patches(sizes: Sequence[tuple[int, int]], patch_size: int = DEFAULT_PATCH_SIZE,
                  patch_stride: int = DEFAULT_PATCH_STRIDE) -> int:
  """Number of patches of images of the given (height, width), without decoding anything."""
  return sum(r * c for r, c in (patch_grid(h, w, patch_size, patch_stride) for h, w in sizes))


def initial_state() -> State:
  """The state of an iterator that has delivered nothing."""
  return {"epoch": 0, "step": 0}


@dataclasses.dataclass(frozen=True)
class _Placement:
  """How a global batch is laid out: this process's rows and the sharding to build with."""

  sharding: jax.sharding.Sharding | None
  rows: np.ndarray  # global batch rows this process assembles, sorted


def _placement(sharding, batch_size: int) -> _Placement:
  if sharding is None:
    return _Placement(None, np.arange(batch_size))
  if isinstance(sharding, jax.sharding.Mesh):
    sharding = jax.sharding.NamedSharding(sharding, jax.sharding.PartitionSpec(sharding.axis_names))
  try:
    indices = sharding.addressable_devices_indices_map((batch_size,)).values()
  except ValueError as e:  # The batch does not divide over the devices.
    raise ValueError(f"batch size {batch_size} cannot be sharded with {sharding}: {e}") from None
  rows: set[int] = set()
  for index in indices:
    rows.update(range(*index[0].indices(batch_size)))
  return _Placement(sharding, np.array(sorted(rows)))


class _Patches:
  """What both datasets share: the patch index, the epoch orders and the resumable iteration.

  A subclass sets `stems`, calls `_index` with its images' sizes, and implements `image`.
  """

  stems: list[str]  # the images' names, set by the subclass
  # Photometric augmentation of the batches `iterate` yields (data/augment.py); None: off.
  augmentation: augment.Photometric | None = None

  # Grain threads assembling host batches when `iterate` is not told: slicing images held in
  # memory is cheap, so one.
  default_threads = 1

  def _index(self, sizes: Sequence[tuple[int, int]], patch_size: int, patch_stride: int) -> None:
    if patch_size < 1 or patch_stride < 1:
      raise ValueError(
          f"patch_size and patch_stride must be positive, got {patch_size}, {patch_stride}")
    self.patch_size, self.patch_stride = int(patch_size), int(patch_stride)
    image_index, ys, xs = [], [], []
    for i, (height, width) in enumerate(sizes):
      rows, cols = patch_grid(height, width, self.patch_size, self.patch_stride)
      r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
      image_index.append(np.full(rows * cols, i, np.int32))
      ys.append((r.ravel() * self.patch_stride).astype(np.int32))
      xs.append((c.ravel() * self.patch_stride).astype(np.int32))
    # Patch id p is patch_image[p] at (patch_y[p], patch_x[p]); ids run image by image,
    # row-major inside an image.
    self.patch_image = np.concatenate(image_index) if image_index else np.zeros(0, np.int32)
    self.patch_y = np.concatenate(ys) if ys else np.zeros(0, np.int32)
    self.patch_x = np.concatenate(xs) if xs else np.zeros(0, np.int32)

  def image(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Image `image_id`'s gray uint8 infrared and visible pixels, (H, W) each."""
    raise NotImplementedError

  def exclude_images(self, image_ids: Sequence[int]) -> None:
    """Drops every patch of these images (held out for validation, say); call it before
    iterating. The other patches keep their order and are numbered 0..num_patches-1 again,
    so epochs, batches and refresh memory slots cover the kept images alone."""
    keep = ~np.isin(self.patch_image, np.asarray(list(image_ids), np.int32))
    self.patch_image, self.patch_y, self.patch_x = (
        self.patch_image[keep], self.patch_y[keep], self.patch_x[keep])

  def _gather(self, patch_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The infrared and visible pixels of these patches, uint8 (B, P, P) each."""
    p = self.patch_size
    ir = np.empty((len(patch_ids), p, p), np.uint8)
    vis = np.empty((len(patch_ids), p, p), np.uint8)
    images = self.patch_image[patch_ids]
    # One `image` call per image of the batch, in image order: a streamed image is read and
    # decoded once per batch and let go before the next, so a thread holds one decoded pair
    # at a time (plus the cache).
    for image_id in np.unique(images):
      a, b = self.image(int(image_id))
      for k in np.flatnonzero(images == image_id):
        y, x = self.patch_y[patch_ids[k]], self.patch_x[patch_ids[k]]
        ir[k] = a[y:y + p, x:x + p]
        vis[k] = b[y:y + p, x:x + p]
    return ir, vis

  # -------------------------------------------------------------------------------------
  # Sizes.

  @property
  def num_images(self) -> int:
    return len(self.stems)

  @property
  def num_patches(self) -> int:
    return int(self.patch_image.shape[0])

  def steps_per_epoch(self, batch_size: int) -> int:
    """Full batches per epoch (the last incomplete batch is dropped)."""
    return self.num_patches // int(batch_size)

  # -------------------------------------------------------------------------------------
  # Patches.

  def patches(self, patch_ids: np.ndarray) -> Batch:
    """The patches with these ids.

    Returns `ir`, `vis` float32 (B, P, P, 1) in [0, 1] and `patch_id` int32 (B,).
    """
    patch_ids = np.asarray(patch_ids, np.int64)
    ir, vis = self._gather(patch_ids)
    scale = np.float32(1 / 255)
    return {
        "ir": (ir.astype(np.float32) * scale)[..., None],
        "vis": (vis.astype(np.float32) * scale)[..., None],
        "patch_id": patch_ids.astype(np.int32),
    }

  def epoch_order(self, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The patch ids of one epoch in delivery order: a function of (seed, epoch, N) only."""
    if not shuffle:
      return np.arange(self.num_patches)
    rng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)])))
    return rng.permutation(self.num_patches)

  # -------------------------------------------------------------------------------------
  # Iteration.

  def iterate(self, batch_size: int, seed: int, start_state: Mapping[str, Any] | None = None, *,
              num_epochs: int | None = None,
              sharding: jax.sharding.Sharding | jax.sharding.Mesh | None = None,
              shuffle: bool = True, prefetch: int = 2,
              num_threads: int | None = None) -> Iterator[tuple[Batch, State]]:
    """Yields (batch, state_after) from `start_state` on, for `num_epochs` epochs (None: forever).

    Args:
      batch_size: global batch size (over all processes and devices).
      seed: shuffling seed; epoch e's order is `epoch_order(seed, e)`.
      start_state: `{"epoch", "step"}` as returned with an earlier batch (None: the start).
        Values may be Python ints or NumPy/JAX scalars (as restored from a checkpoint).
      num_epochs: stop when this epoch number is reached (counting from 0, not from the
        start state).
      sharding: None yields NumPy arrays; a `jax.sharding.Sharding` (its leading axis is
        the batch) or a `Mesh` (batch split over all its axes) yields global `jax.Array`s,
        each process assembling only the rows its devices hold.
      shuffle: False delivers patches in id order every epoch.
      prefetch: batches prepared ahead (on the host, and on the devices when sharded).
      num_threads: grain threads assembling host batches, each working on its own batch
        (None: the dataset's `default_threads`: 1 in memory, where slicing is cheap; the
        decoding threads of a `StreamingPatchDataset`). At least this many batches are
        prepared ahead on the host, so that every thread has one.

    Yields:
      (batch, state_after): batch has `ir`, `vis` (B, P, P, 1) float32 in [0, 1] and
      `patch_id` (B,) int32; state_after is the state to save to resume after this batch.

    Raises:
      ValueError: fewer patches than one batch, or a bad start state.
    """
    batch_size = int(batch_size)
    num_threads = self.default_threads if num_threads is None else int(num_threads)
    steps = self.steps_per_epoch(batch_size)
    if batch_size < 1 or steps == 0:
      raise ValueError(f"{self.num_patches} patches do not make one batch of {batch_size}")
    state = dict(initial_state() if start_state is None else start_state)
    epoch, step = int(state["epoch"]), int(state["step"])
    if epoch < 0 or not 0 <= step <= steps:
      raise ValueError(f"bad iteration state {state} ({steps} steps per epoch)")
    if step == steps:  # Saved after the last batch of an epoch, before normalising.
      epoch, step = epoch + 1, 0
    place = _placement(sharding, batch_size)
    ahead: collections.deque = collections.deque()
    while num_epochs is None or epoch < num_epochs:
      order = self.epoch_order(seed, epoch, shuffle)[:steps * batch_size].reshape(steps, batch_size)
      local_ids = order[:, place.rows]

      def host_batch(s, local_ids=local_ids, epoch=epoch, rows=place.rows):
        nxt = {"epoch": epoch, "step": s + 1} if s + 1 < steps else {"epoch": epoch + 1, "step": 0}
        batch = self.patches(local_ids[s])
        if self.augmentation is not None:  # Drawn per (seed, epoch, step) or patch: resumable.
          batch = augment.augment_batch(batch, self.augmentation, seed=seed, epoch=epoch, step=s,
                                        rows=rows)
        return batch, nxt

      # Grain keeps the batches in step order whatever the number of threads.
      host = grain.MapDataset.range(step, steps).map(host_batch).to_iter_dataset(
          grain.ReadOptions(num_threads=num_threads,
                            prefetch_buffer_size=max(prefetch, num_threads, 1)))
      for batch, nxt in host:
        ahead.append((self._to_device(batch, place, batch_size), nxt))
        if len(ahead) > max(prefetch - 1, 0):
          yield ahead.popleft()
      epoch, step = epoch + 1, 0
    while ahead:
      yield ahead.popleft()

  @staticmethod
  def _to_device(batch: Batch, place: _Placement, batch_size: int) -> Batch:
    if place.sharding is None:
      return batch
    # The process's rows, in their global order, are the block it holds: with several
    # processes each one passes only its own rows, and the global array spans them all.
    return {key: jax.make_array_from_process_local_data(place.sharding, local,
                                                        (batch_size, *local.shape[1:]))
            for key, local in batch.items()}


class PatchDataset(_Patches):
  """All patches of a set of image pairs held in memory, with stable ids, batched per epoch.

  Build one with `from_tfds` (a dataset built by `bin/prepare_data.py`; with `streaming` it
  gives a `StreamingPatchDataset` instead), `from_arrays` (images in memory) or
  `from_synthetic` (the package's procedural pairs).
  """

  def __init__(self, ir_images: Sequence[np.ndarray], vis_images: Sequence[np.ndarray], *,
               patch_size: int = DEFAULT_PATCH_SIZE, patch_stride: int = DEFAULT_PATCH_STRIDE,
               stems: Sequence[str] | None = None):
    """Holds uint8 gray images and indexes their patches.

    Args:
      ir_images: infrared-slot images, uint8 (H, W) (RGB (H, W, 3) is converted with
        PIL's convert("L"); 16-bit is scaled to 8 bits); image_id = position in the list.
      vis_images: the visible-slot partners, same sizes.
      patch_size: patch height and width.
      patch_stride: distance between patch corners.
      stems: names of the images (default: their ids).

    Raises:
      ValueError: the lists differ in length, a pair differs in size, or bad patch settings.
    """
    if len(ir_images) != len(vis_images):
      raise ValueError(f"{len(ir_images)} infrared images but {len(vis_images)} visible images")
    self.ir_images = [_gray_uint8(x) for x in ir_images]
    self.vis_images = [_gray_uint8(x) for x in vis_images]
    self.stems = list(stems) if stems is not None else [str(i) for i in range(len(self.ir_images))]
    for i, (a, b) in enumerate(zip(self.ir_images, self.vis_images)):
      if a.shape != b.shape:
        raise ValueError(
            f"image {self.stems[i]}: infrared {a.shape} and visible {b.shape} differ in size")
    self._index([img.shape for img in self.ir_images], patch_size, patch_stride)

  # -------------------------------------------------------------------------------------
  # Constructors.

  @classmethod
  def from_arrays(cls, ir_images, vis_images, **kwargs) -> "PatchDataset":
    """Same as the constructor: in-memory images (a list, or an (N, H, W) array)."""
    return cls(list(ir_images), list(vis_images), **kwargs)

  @classmethod
  def from_synthetic(cls, num_pairs: int, height: int = 256, width: int = 256, seed: int = 0,
                     **kwargs) -> "PatchDataset":
    """The package's procedural infrared/visible pairs (`mmdrfuse_jax.data.synthetic`)."""
    from mmdrfuse_jax.data import synthetic  # pylint: disable=g-import-not-at-top

    ir, vis = synthetic.make_pairs(num_pairs, height, width, seed)
    return cls(list(ir), list(vis), stems=[f"synthetic_{seed}_{i:04d}" for i in range(num_pairs)],
               **kwargs)

  @classmethod
  def from_tfds(cls, data_dir: str | os.PathLike, dataset: str, split: str = "train", *,
                streaming: bool | str = False, num_threads: int | None = None,
                check_source: bool = True, **kwargs) -> "PatchDataset | StreamingPatchDataset":
    """Loads a split built by `bin/prepare_data.py` (`prepare.prepare`) into memory.

    Records are read with `tfds.data_source` and decoded in `num_threads` grain threads
    (None: 4); the colour copies are not decoded.

    With `streaming` (True or "on"; "auto": when the split's decoded images would take more
    than `AUTO_STREAMING_BYTES`), nothing is decoded here: a `StreamingPatchDataset` reads
    the patches of each batch from the records as it is assembled, `num_threads` being its
    decoding threads. Both give the same batches.

    With `check_source`, a build whose source folder still exists but whose image files
    have changed since (added, removed, or other sizes or modification times) is refused:
    it would train on stale data, and patch ids would shift at the rebuild. This costs a
    `stat` per source file. A build whose folder is gone (moved, or deleted after the
    build) is used as it is.

    Raises:
      sources.DataError: the dataset or split is not built in `data_dir`, or (with
        `check_source`) its source folder has changed since the build.
      ValueError: `streaming` is none of True, False, "auto", "on", "off".
    """
    built, images = _open_split(data_dir, dataset, split, check_source)
    if use_streaming(streaming, [(h, w) for _, h, w in images]):
      return StreamingPatchDataset.from_tfds(data_dir, dataset, split, num_threads=num_threads,
                                             built=(built, images), **kwargs)
    from mmdrfuse_jax.data import sources  # pylint: disable=g-import-not-at-top

    source = _data_source(data_dir, dataset, split, ("ir_color", "vis_color"))
    num_threads = 4 if num_threads is None else num_threads

    def take(record):
      return (int(record["image_id"]), record["stem"].decode(), record["ir"][..., 0],
              record["vis"][..., 0])

    ds = grain.MapDataset.source(source).map(take).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * max(num_threads, 1)))
    records = sorted(ds, key=lambda r: r[0])
    if [r[0] for r in records] != list(range(len(records))):
      raise sources.DataError(
          f"{built.data_dir}: image ids of split {split!r} are not 0..{len(records) - 1}")
    return cls([r[2] for r in records], [r[3] for r in records], stems=[r[1] for r in records],
               **kwargs)

  def image(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
    return self.ir_images[image_id], self.vis_images[image_id]


class StreamingPatchDataset(_Patches):
  """The patches of a built dataset, read from its records as the batches need them.

  The same patch ids, epoch orders, batches (bit for bit) and iteration states as
  `PatchDataset` on the same split, but opening decodes nothing (the index comes from the
  image sizes the build recorded) and host RAM holds the patch index (12 bytes a patch), a
  small cache of decoded images and the batches in flight, not the images: it does not
  grow with the dataset beyond the index.

  A shuffled batch draws its patches from about as many images as it has patches, so a
  batch's patches are grouped by image: each image is read and decoded once per batch, and
  let go (or kept in the `cache_bytes` LRU cache) before the next one. Batches are
  assembled in `num_threads` grain threads (PIL decodes with the GIL released), prefetched.
  The cost: every epoch decodes again about two images per patch (a patch's infrared and
  visible images), where `PatchDataset` decodes each image once, up front.
  """

  def __init__(self, source: Sequence[Mapping[str, Any]], sizes: Sequence[tuple[int, int]], *,
               patch_size: int = DEFAULT_PATCH_SIZE, patch_stride: int = DEFAULT_PATCH_STRIDE,
               stems: Sequence[str] | None = None, num_threads: int | None = None,
               cache_bytes: int = DEFAULT_CACHE_BYTES, where: str = "the dataset"):
    """Indexes the patches of the images in `source` from their sizes, reading nothing.

    Args:
      source: random access to the records: `source[i]` has `image_id` (= i) and `ir`,
        `vis`, image i's gray images as encoded (PNG) bytes, as `tfds.data_source` gives
        them with `SkipDecoding`.
      sizes: (height, width) of image i, as recorded by the build.
      patch_size: patch height and width.
      patch_stride: distance between patch corners.
      stems: names of the images (default: their ids).
      num_threads: default grain threads of `iterate` (None: the CPU count, at most 16).
      cache_bytes: decoded images kept across batches (least recently used dropped).
      where: the dataset's name in error messages.

    Raises:
      ValueError: `source` and `sizes` differ in length, or bad patch settings.
    """
    if len(source) != len(sizes):
      raise ValueError(f"{where}: {len(source)} records but {len(sizes)} image sizes")
    self.stems = list(stems) if stems is not None else [str(i) for i in range(len(sizes))]
    self.sizes = [(int(h), int(w)) for h, w in sizes]
    self._index(self.sizes, patch_size, patch_stride)
    self.default_threads = (min(16, os.cpu_count() or 1) if num_threads is None
                            else max(int(num_threads), 1))
    self._source, self._where = source, where
    self._cache = _ImageCache(int(cache_bytes))

  @classmethod
  def from_tfds(cls, data_dir: str | os.PathLike, dataset: str, split: str = "train", *,
                check_source: bool = True, built=None, **kwargs) -> "StreamingPatchDataset":
    """Opens a split built by `bin/prepare_data.py`; see `PatchDataset.from_tfds`.

    Args:
      data_dir: the TFDS data_dir the dataset was built in.
      dataset: the builder config name.
      split: the split.
      check_source: refuse a build whose source folder has changed since.
      built: (`prepare.BuiltDataset`, its rows of `split`) already looked up.
      **kwargs: for the constructor (patch_size, patch_stride, num_threads, cache_bytes).

    Raises:
      sources.DataError: as `PatchDataset.from_tfds`, or the records do not match the
        build's description (a build damaged since).
    """
    from mmdrfuse_jax.data import sources  # pylint: disable=g-import-not-at-top

    built, images = built or _open_split(data_dir, dataset, split, check_source)
    source = _data_source(data_dir, dataset, split, ("ir", "vis", "ir_color", "vis_color"))
    if len(source) != len(images):
      raise sources.DataError(
          f"{built.data_dir}: split {split!r} has {len(source)} records but its description "
          f"lists {len(images)} images; rebuild it with bin/prepare_data.py")
    return cls(source, [(h, w) for _, h, w in images], stems=[s for s, _, _ in images],
               where=f"{built.data_dir} ({split})", **kwargs)

  def image(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Image `image_id`'s gray uint8 infrared and visible pixels, from the cache or the records.

    Raises:
      sources.DataError: the record does not match the build's description.
    """
    pair = self._cache.get(image_id)
    if pair is not None:
      return pair
    record = self._source[image_id]
    pair = (_gray_uint8(_decode(record["ir"])), _gray_uint8(_decode(record["vis"])))
    if int(record["image_id"]) != image_id or any(x.shape != self.sizes[image_id] for x in pair):
      from mmdrfuse_jax.data import sources  # pylint: disable=g-import-not-at-top

      raise sources.DataError(
          f"{self._where}: record {image_id} holds image {int(record['image_id'])} of sizes "
          f"{pair[0].shape} and {pair[1].shape}, where the build's description has image "
          f"{image_id} of {self.sizes[image_id]}; rebuild it with bin/prepare_data.py")
    self._cache.put(image_id, pair)
    return pair


def mixture_spec(datasets: str, weights: str = "") -> tuple[list[str], list[float] | None]:
  """Dataset names and their epoch shares from the config's text fields.

  Args:
    datasets: builder config names, comma-separated ("roadscene,llvip").
    weights: their shares, comma-separated ("1,1"); empty: in proportion to their patches.

  Raises:
    ValueError: an empty name, a repeated name, or weights that do not match the names.
  """
  names = [n.strip() for n in str(datasets).split(",")]
  if not all(names):
    raise ValueError(f"dataset names must be comma-separated and non-empty, got {datasets!r}")
  if len(set(names)) != len(names):
    raise ValueError(f"a dataset is named twice in {datasets!r}")
  if not str(weights).strip():
    return names, None
  try:
    shares = [float(w) for w in str(weights).split(",")]
  except ValueError:
    raise ValueError(f"weights must be numbers, comma-separated, got {weights!r}") from None
  if len(shares) != len(names):
    raise ValueError(f"{len(names)} dataset(s) ({datasets}) but {len(shares)} weight(s) "
                     f"({weights})")
  return names, shares


def mixture_stem(dataset: str, stem: str) -> str:
  """A pair's name in a mixture: its dataset's and its own (a file name: no "/")."""
  return f"{dataset}-{stem}"


class PatchMixture(_Patches):
  """Several datasets' patches as one, each contributing a fixed share of every epoch.

  Patch ids run over the sources in order (source 0's patches first), so per-patch refresh
  memories cover every source. Without `weights` an epoch is a permutation of all patches,
  as for one dataset. With them, an epoch still delivers as many patches as the sources hold
  together, of which source d gives `round(share_d * total)` (largest remainders): a small
  source's patches then come several times an epoch, a large one's a different subset each
  epoch (whole permutations first, so every patch comes before any comes twice). The draw
  depends on (seed, epoch) and the sources' patch counts alone, so runs resume exactly.

  Args:
    sources: the datasets (all with the same patch size and stride).
    weights: each source's share of an epoch (normalised; None: in proportion to its
      patches, i.e. plain concatenation).
    names: the sources' names; a stem becomes "name-stem" (default: "0", "1", ...).

  Raises:
    ValueError: no sources, differing patch settings, or bad weights.
  """

  def __init__(self, sources: Sequence[_Patches], weights: Sequence[float] | None = None,
               names: Sequence[str] | None = None):
    if not sources:
      raise ValueError("a mixture needs at least one dataset")
    names = [str(i) for i in range(len(sources))] if names is None else list(names)
    if len(names) != len(sources):
      raise ValueError(f"{len(sources)} datasets but {len(names)} names")
    settings = {(src.patch_size, src.patch_stride) for src in sources}
    if len(settings) != 1:
      raise ValueError(f"the mixture's datasets differ in patch size and stride: {settings}")
    if weights is not None:
      weights = [float(w) for w in weights]
      if len(weights) != len(sources):
        raise ValueError(f"{len(sources)} datasets but {len(weights)} weights")
      if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"mixture weights must be finite, non-negative and not all 0, got "
                         f"{weights}")
    self.sources, self.names, self.weights = list(sources), names, weights
    self.patch_size, self.patch_stride = sources[0].patch_size, sources[0].patch_stride
    self.stems = [mixture_stem(name, stem) for name, src in zip(names, sources)
                  for stem in src.stems]
    counts = [src.num_images for src in sources]
    self._image_offsets = np.cumsum([0] + counts)
    self.patch_image = np.concatenate(
        [src.patch_image + off for src, off in zip(sources, self._image_offsets)]).astype(np.int32)
    self.patch_y = np.concatenate([src.patch_y for src in sources])
    self.patch_x = np.concatenate([src.patch_x for src in sources])
    self.default_threads = max(src.default_threads for src in sources)

  def image(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
    d = int(np.searchsorted(self._image_offsets, image_id, side="right")) - 1
    return self.sources[d].image(int(image_id - self._image_offsets[d]))

  def source_of_patches(self) -> np.ndarray:
    """The source index of every patch id, (N,)."""
    return (np.searchsorted(self._image_offsets, self.patch_image, side="right") - 1)

  def epoch_quotas(self) -> np.ndarray:
    """How many patches each source gives an epoch: the shares of `num_patches`."""
    return self._quotas(self.source_of_patches())

  def _quotas(self, source: np.ndarray) -> np.ndarray:
    available = np.bincount(source, minlength=len(self.sources))
    if self.weights is None:
      return available
    share = np.asarray(self.weights) / sum(self.weights)
    exact = share * self.num_patches
    quotas = np.floor(exact).astype(np.int64)
    # Largest remainders: the quotas add up to the total; ties go to the earlier source.
    extra = np.argsort(-(exact - quotas), kind="stable")[:self.num_patches - quotas.sum()]
    quotas[extra] += 1
    quotas[available == 0] = 0  # A source with every image held out gives nothing.
    return quotas

  def epoch_order(self, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if self.weights is None:
      return super().epoch_order(seed, epoch, shuffle)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [int(seed) & 0xFFFFFFFF, int(epoch), len(self.sources)])))
    source = self.source_of_patches()
    picks = []
    for d, quota in enumerate(self._quotas(source)):
      ids = np.flatnonzero(source == d)
      if quota == 0:
        continue
      full, part = divmod(int(quota), len(ids))
      orders = [rng.permutation(len(ids)) if shuffle else np.arange(len(ids))
                for _ in range(full + (part > 0))]
      picks.append(ids[np.concatenate(orders)[:quota]])
    order = np.concatenate(picks)
    return rng.permutation(order) if shuffle else order


class _ImageCache:
  """Decoded image pairs by image id, the least recently used dropped beyond `max_bytes`.

  Shared by the threads that assemble batches. Also counts what it was asked for
  (`hits`, `misses`), for the benchmark.
  """

  def __init__(self, max_bytes: int):
    self.max_bytes = max(int(max_bytes), 0)
    self.hits = self.misses = 0
    self._pairs: collections.OrderedDict = collections.OrderedDict()
    self._bytes = 0
    self._lock = threading.Lock()

  def get(self, key: int):
    with self._lock:
      pair = self._pairs.get(key)
      if pair is None:
        self.misses += 1
        return None
      self.hits += 1
      self._pairs.move_to_end(key)
      return pair

  def put(self, key: int, pair: tuple[np.ndarray, np.ndarray]) -> None:
    size = sum(x.nbytes for x in pair)
    with self._lock:
      if key in self._pairs or size > self.max_bytes:
        return
      self._pairs[key] = pair
      self._bytes += size
      while self._bytes > self.max_bytes:
        _, old = self._pairs.popitem(last=False)
        self._bytes -= sum(x.nbytes for x in old)


def use_streaming(setting: bool | str, sizes: Sequence[tuple[int, int]]) -> bool:
  """Whether a split of images of these (height, width) is streamed (`config.data.streaming`).

  Args:
    setting: True or "on", False or "off", or "auto": stream when the decoded gray
      images (infrared and visible) would take more than `AUTO_STREAMING_BYTES`.
    sizes: the images' sizes.

  Raises:
    ValueError: an unknown setting.
  """
  if isinstance(setting, (bool, np.bool_)):
    return bool(setting)
  if setting not in STREAMING_CHOICES:
    raise ValueError(f"streaming must be one of {', '.join(STREAMING_CHOICES)}, got {setting!r}")
  if setting == "auto":
    return sum(2 * h * w for h, w in sizes) > AUTO_STREAMING_BYTES
  return setting == "on"


def _open_split(data_dir, dataset: str, split: str, check_source: bool):
  """The build of `dataset` in `data_dir` and the rows (stem, height, width) of `split`."""
  from mmdrfuse_jax.data import prepare, sources  # pylint: disable=g-import-not-at-top

  built = prepare.load_built(dataset, data_dir)
  stale = prepare.source_changes(built) if check_source else None
  if stale:
    raise sources.DataError(
        f"{built.data_dir}: its source {built.source} changed since the build ({stale}); "
        "rebuild it with bin/prepare_data.py (or pass check_source=False to use it as built)")
  if split not in built.images:
    raise sources.DataError(
        f"{built.data_dir}: no split {split!r} (built: {', '.join(sorted(built.images))})")
  return built, built.images[split]


def _data_source(data_dir, dataset: str, split: str, undecoded: Sequence[str]):
  """`tfds.data_source` of a built split, the image features in `undecoded` left as bytes."""
  # Imported here, not at the top: TFDS is heavy, and in-memory or procedural data
  # needs none of it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from mmdrfuse_jax.data import builders  # pylint: disable=g-import-not-at-top

  return tfds.data_source(
      f"{builders.BUILDER_NAME}/{dataset}", split=split, data_dir=os.fspath(data_dir),
      download=False, decoders={key: tfds.decode.SkipDecoding() for key in undecoded})


def _decode(png: bytes) -> np.ndarray:
  """The pixels of an encoded image (the streaming path's only decoder)."""
  with Image.open(io.BytesIO(png)) as image:
    return np.asarray(image)


def _gray_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
    raise ValueError(f"expected a (H, W) or (H, W, 3) image, got shape {image.shape}")
  if image.dtype not in (np.uint8, np.uint16):
    raise ValueError(f"expected uint8 or uint16 pixels, got {image.dtype}")
  return np.ascontiguousarray(imageio.to_8bit(imageio.to_gray_published(image)))
