"""Patch pipeline: the published training patches, shuffled per epoch, resumable.

Images are held decoded in memory as uint8 gray; a patch is a slice of one. Patches are
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
import os
from typing import Any, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np

from mmdrfuse_jax import imageio

DEFAULT_PATCH_SIZE = 128
DEFAULT_PATCH_STRIDE = 128

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
  local_pos: dict[int, int]  # global start row of a shard -> its position in the local block


def _placement(sharding, batch_size: int) -> _Placement:
  if sharding is None:
    return _Placement(None, np.arange(batch_size), {0: 0})
  if isinstance(sharding, jax.sharding.Mesh):
    sharding = jax.sharding.NamedSharding(sharding, jax.sharding.PartitionSpec(sharding.axis_names))
  try:
    indices = sharding.addressable_devices_indices_map((batch_size,)).values()
  except ValueError as e:  # The batch does not divide over the devices.
    raise ValueError(f"batch size {batch_size} cannot be sharded with {sharding}: {e}") from None
  starts, rows = set(), set()
  for index in indices:
    start, stop, _ = index[0].indices(batch_size)
    rows.update(range(start, stop))
    starts.add(start)
  rows = np.array(sorted(rows))
  pos = {int(r): i for i, r in enumerate(rows)}
  return _Placement(sharding, rows, {s: pos[s] for s in starts})


class PatchDataset:
  """All patches of a set of image pairs, with stable ids, batched per epoch.

  Build one with `from_tfds` (a dataset built by `bin/prepare_data.py`), `from_arrays`
  (images in memory) or `from_synthetic` (the package's procedural pairs).
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
    if patch_size < 1 or patch_stride < 1:
      raise ValueError(
          f"patch_size and patch_stride must be positive, got {patch_size}, {patch_stride}")
    self.patch_size, self.patch_stride = int(patch_size), int(patch_stride)
    self.ir_images = [_gray_uint8(x) for x in ir_images]
    self.vis_images = [_gray_uint8(x) for x in vis_images]
    self.stems = list(stems) if stems is not None else [str(i) for i in range(len(self.ir_images))]
    for i, (a, b) in enumerate(zip(self.ir_images, self.vis_images)):
      if a.shape != b.shape:
        raise ValueError(
            f"image {self.stems[i]}: infrared {a.shape} and visible {b.shape} differ in size")
    image_index, ys, xs = [], [], []
    for i, img in enumerate(self.ir_images):
      rows, cols = patch_grid(*img.shape, self.patch_size, self.patch_stride)
      r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
      image_index.append(np.full(rows * cols, i, np.int32))
      ys.append((r.ravel() * self.patch_stride).astype(np.int32))
      xs.append((c.ravel() * self.patch_stride).astype(np.int32))
    # Patch id p is patch_image[p] at (patch_y[p], patch_x[p]); ids run image by image,
    # row-major inside an image.
    self.patch_image = np.concatenate(image_index) if image_index else np.zeros(0, np.int32)
    self.patch_y = np.concatenate(ys) if ys else np.zeros(0, np.int32)
    self.patch_x = np.concatenate(xs) if xs else np.zeros(0, np.int32)

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
                num_threads: int = 4, check_source: bool = True, **kwargs) -> "PatchDataset":
    """Loads a split built by `bin/prepare_data.py` (`builders.prepare`) into memory.

    Records are read with `tfds.data_source` and decoded in `num_threads` grain threads;
    the colour copies are not decoded.

    With `check_source`, a build whose source folder still exists but whose image files
    have changed since (added, removed, or other sizes or modification times) is refused:
    it would train on stale data, and patch ids would shift at the rebuild. This costs a
    `stat` per source file. A build whose folder is gone (moved, or deleted after the
    build) is used as it is.

    Raises:
      builders.DataError: the dataset or split is not built in `data_dir`, or (with
        `check_source`) its source folder has changed since the build.
    """
    # Imported here, not at the top: TFDS is heavy, and in-memory or procedural data
    # needs none of it.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    from mmdrfuse_jax.data import builders  # pylint: disable=g-import-not-at-top

    built = builders.load_built(dataset, data_dir)
    stale = builders.source_changes(built) if check_source else None
    if stale:
      raise builders.DataError(
          f"{built.data_dir}: its source {built.source} changed since the build ({stale}); "
          "rebuild it with bin/prepare_data.py (or pass check_source=False to use it as built)")
    if split not in built.images:
      raise builders.DataError(
          f"{built.data_dir}: no split {split!r} (built: {', '.join(sorted(built.images))})")
    source = tfds.data_source(
        f"{builders.BUILDER_NAME}/{dataset}", split=split, data_dir=os.fspath(data_dir),
        download=False,
        decoders={"ir_color": tfds.decode.SkipDecoding(),
                  "vis_color": tfds.decode.SkipDecoding()})

    def take(record):
      return (int(record["image_id"]), record["stem"].decode(), record["ir"][..., 0],
              record["vis"][..., 0])

    ds = grain.MapDataset.source(source).map(take).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * max(num_threads, 1)))
    records = sorted(ds, key=lambda r: r[0])
    if [r[0] for r in records] != list(range(len(records))):
      raise builders.DataError(
          f"{built.data_dir}: image ids of split {split!r} are not 0..{len(records) - 1}")
    return cls([r[2] for r in records], [r[3] for r in records], stems=[r[1] for r in records],
               **kwargs)

  # -------------------------------------------------------------------------------------
  # Sizes.

  @property
  def num_images(self) -> int:
    return len(self.ir_images)

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
    p = self.patch_size
    ir = np.empty((len(patch_ids), p, p), np.uint8)
    vis = np.empty((len(patch_ids), p, p), np.uint8)
    for k, pid in enumerate(patch_ids):
      i, y, x = self.patch_image[pid], self.patch_y[pid], self.patch_x[pid]
      ir[k] = self.ir_images[i][y:y + p, x:x + p]
      vis[k] = self.vis_images[i][y:y + p, x:x + p]
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
              num_threads: int = 1) -> Iterator[tuple[Batch, State]]:
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
      num_threads: grain threads assembling host batches (slicing is cheap; 1 is plenty).

    Yields:
      (batch, state_after): batch has `ir`, `vis` (B, P, P, 1) float32 in [0, 1] and
      `patch_id` (B,) int32; state_after is the state to save to resume after this batch.

    Raises:
      ValueError: fewer patches than one batch, or a bad start state.
    """
    batch_size = int(batch_size)
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

      def host_batch(s, local_ids=local_ids, epoch=epoch):
        nxt = {"epoch": epoch, "step": s + 1} if s + 1 < steps else {"epoch": epoch + 1, "step": 0}
        return self.patches(local_ids[s]), nxt

      host = grain.MapDataset.range(step, steps).map(host_batch).to_iter_dataset(
          grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(prefetch, 1)))
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
    out = {}
    for key, local in batch.items():
      shape = (batch_size, *local.shape[1:])

      def shard(index, local=local):
        start, stop, _ = index[0].indices(batch_size)
        pos = place.local_pos[start]
        return local[pos:pos + stop - start]

      out[key] = jax.make_array_from_callback(shape, place.sharding, shard)
    return out


def _gray_uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
    raise ValueError(f"expected a (H, W) or (H, W, 3) image, got shape {image.shape}")
  if image.dtype not in (np.uint8, np.uint16):
    raise ValueError(f"expected uint8 or uint16 pixels, got {image.dtype}")
  return np.ascontiguousarray(imageio.to_8bit(imageio.to_gray_published(image)))
