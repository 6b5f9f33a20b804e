"""Image fusion: the pure JAX `fuse` and a convenience layer for image arrays and files.

`fuse(params, ir, vis)` is what a JAX pipeline calls: batched NHWC float arrays in [0, 1]
in, the network's fused image (its tanh output) out. `Fuser` wraps it for images as they
come from files: 8- or 16-bit, gray or RGB, the published "minmax" output stretch or plain
clipping, and colour fusion (fuse the luma, put the colour image's chroma back).

Compilation: `fuse` is jit-compiled once per distinct (batch, height, width). `Fuser` places
images on canvases of a few bucketed shapes (`fuse_within`), so a folder of mixed sizes
compiles once per bucket, not once per size.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Mapping, Sequence, cast

import jax
import jax.numpy as jnp
import numpy as np

from mmdrfuse_jax.errors import MMDRFuseError
from mmdrfuse_jax.io import imageio
from mmdrfuse_jax.models import networks

OUTPUT_MODES = ("minmax", "clip")


class FusionInputError(MMDRFuseError, TypeError):
  """Arrays that `fuse` cannot take (dtype, rank, channels or shapes); raised when traced."""


def unwrap_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
  """The parameter tree itself, also from Flax's variables dict `{"params": tree}`."""
  if set(params) == {"params"}:
    return params["params"]
  return params


def check_pair(ir: Any, vis: Any) -> None:
  """Raises FusionInputError, in one line with the fix, unless `ir` and `vis` are (B, H, W, 1)
  float arrays of one shape. Reads only shapes and dtypes: free under jit."""
  for name, x in (("ir", ir), ("vis", vis)):
    shape, dtype = tuple(np.shape(x)), jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise FusionInputError(
          f"{name} has dtype {dtype}; fuse takes floats in [0, 1] (divide 8-bit images by 255, "
          "or use Fuser, which reads image arrays as they come from files)")
    if len(shape) != 4:
      hint = {2: f"{name}[None, :, :, None]", 3: f"{name}[None]"}.get(len(shape))
      raise FusionInputError(
          f"{name} has shape {shape}; fuse takes batches of gray images, (B, H, W, 1) NHWC"
          + (f": try {hint}" if hint else ""))
    if shape[-1] != 1:
      hint = (" (this looks like NCHW: transpose to NHWC, x.transpose(0, 2, 3, 1))"
              if shape[1] == 1 else " (convert colour images to gray first, or use Fuser)")
      raise FusionInputError(
          f"{name} has {shape[-1]} channels in shape {shape}; fuse takes one (gray){hint}")
  if np.shape(ir) != np.shape(vis):
    raise FusionInputError(f"ir and vis differ in shape: {tuple(np.shape(ir))} and "
                           f"{tuple(np.shape(vis))}")


@jax.jit
def fuse(params: Mapping[str, Any], ir: jax.Array, vis: jax.Array) -> jax.Array:
  """Fuses batches of gray image pairs with the network the parameters belong to.

  A pure function of arrays: jit it, vmap it, differentiate it, shard its batch. Its inputs
  are checked when it is traced (dtype, rank, channels, shapes), so a wrong array fails with
  one line that says what to change instead of a shape error from inside the network.

  Args:
    params: student or teacher parameters, or Flax's `{"params": ...}` around them (the
      tree's layer names say which network; the tree structure is static under jit, so
      this costs nothing at run time).
    ir: infrared (or PET/SPECT/CT) images, (B, H, W, 1) floats in [0, 1].
    vis: visible (or MRI) images, (B, H, W, 1) floats in [0, 1], the shape of `ir`.

  Returns:
    The fused images, (B, H, W, 1) float32: the network's raw tanh output, in [-1, 1]. For
    an 8-bit image use `quantize` (the published "minmax" stretch, or "clip").

  Raises:
    FusionInputError: integer images, a missing batch or channel axis, NCHW, colour, or
      `ir` and `vis` of different shapes.

  Example (`jit`, `vmap`, `grad`, a batch sharded over devices):

  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  >>> from mmdrfuse_jax import fuse, init_params, quantize
  >>> params = init_params("student", jax.random.key(0))
  >>> ir = vis = jnp.full((8, 32, 32, 1), 0.5)
  >>> fuse(params, ir, vis).shape
  (8, 32, 32, 1)
  >>> fuse(params, ir.astype(jnp.uint8), vis)
  Traceback (most recent call last):
  ...
  mmdrfuse_jax.inference.fusion.FusionInputError: ir has dtype uint8; ...
  >>> per_pair = jax.vmap(fuse, in_axes=(None, 0, 0))(params, ir[:, None], vis[:, None])
  >>> per_pair.shape  # a leading axis of pairs, each its own batch of one
  (8, 1, 32, 32, 1)
  >>> grads = jax.grad(lambda p: jnp.mean(fuse(p, ir, vis) ** 2))(params)
  >>> sorted(grads)
  ['conv1', 'conv2']
  >>> mesh = Mesh(np.array(jax.devices()), ("data",))  # 1, 2, 4 or 8 devices
  >>> batch = jax.device_put(ir, NamedSharding(mesh, P("data")))
  >>> out = fuse(params, batch, batch)  # each device fuses its share of the batch
  >>> out.sharding.is_equivalent_to(batch.sharding, out.ndim)
  True
  >>> quantize(np.asarray(fuse(params, ir, vis)[0, ..., 0])).dtype
  dtype('uint8')
  """
  params = unwrap_params(params)
  check_pair(ir, vis)
  network = networks.get_model(networks.model_of(params), inference=True)
  x = jnp.concatenate([ir, vis], axis=-1).astype(jnp.float32)
  # Without `mutable`, apply returns the network's output dict (Flax's annotation also allows
  # the (output, variables) pair of the mutable case).
  return cast(Mapping[str, Any], network.apply({"params": params}, x))["out"]


@jax.jit
def fuse_within(params: Mapping[str, Any], ir: jax.Array, vis: jax.Array,
                sizes: jax.Array) -> jax.Array:
  """`fuse` for images placed top-left on a larger canvas of one shared shape.

  Inside each image's true region (`sizes[b]` = (height, width)) the result equals `fuse`
  on the cropped image: the reflection padding is taken at the true border (see
  `networks.reflect_pad_within`). For the student exactly; for the teacher up to float
  rounding (about 1e-6; its canvas sides must be even, see `networks.Teacher`). One
  compilation then serves every size up to the canvas.
  """
  params = unwrap_params(params)
  check_pair(ir, vis)
  network = networks.get_model(networks.model_of(params))
  x = jnp.concatenate([ir, vis], axis=-1).astype(jnp.float32)
  return cast(Mapping[str, Any], network.apply({"params": params}, x, sizes=sizes))["out"]


LEVEL_DTYPES = (jnp.uint8, jnp.uint16)


@functools.partial(jax.jit, static_argnames=("output",))
def fuse_levels(params: Mapping[str, Any], ir: jax.Array, vis: jax.Array, *,
                output: str = "minmax") -> jax.Array:
  """`fuse` from integer images to integer images, the conversions inside the compiled call.

  The 8-bit (or 16-bit) path: the inputs are scaled to [0, 1] by their type's full scale as
  `imageio.to_unit_float` does, fused, and each image of the batch quantized as `quantize`
  does, all on the device, so that only integer images cross to and from it (a quarter of
  the bytes of float32 for 8-bit) and no per-image work is left to the host. Equal to
  `quantize(fuse(...)[b, ..., 0], output, max_value)` for every image `b` of the batch, up to
  float rounding: compiled together, the network's output may round a few ulps apart, which
  moves a pixel by one level only where its value sits on a half level (tests).

  Args:
    params: student or teacher parameters (as for `fuse`).
    ir, vis: (B, H, W, 1) uint8 or uint16 images of one shape and dtype.
    output: "minmax" (the published stretch of each image's own min..max) or "clip".

  Returns:
    The fused images, (B, H, W, 1), of the inputs' dtype.

  Raises:
    FusionInputError: float inputs, inputs of different integer types, or any shape `fuse`
      refuses.
    ValueError: an unknown `output`.
  """
  if output not in OUTPUT_MODES:
    raise ValueError(f"unknown output mode {output!r}; choose one of {OUTPUT_MODES}")
  dtype = jnp.result_type(ir)
  if dtype not in LEVEL_DTYPES or jnp.result_type(vis) != dtype:
    raise FusionInputError(
        f"fuse_levels takes uint8 or uint16 images of one dtype; got ir {dtype} and vis "
        f"{jnp.result_type(vis)} (for floats in [0, 1] use fuse)")
  full_scale = jnp.iinfo(dtype).max
  # Converted in one pass and written out: read through the network's shifted loads, the
  # integer inputs would be converted nine times a pixel and those loads do not vectorise.
  both = jax.lax.optimization_barrier(
      jnp.stack([ir, vis]).astype(jnp.float32) / jnp.float32(full_scale))
  fused = fuse(params, both[0], both[1])
  if output == "minmax":
    low = jnp.min(fused, axis=(1, 2, 3), keepdims=True)
    high = jnp.max(fused, axis=(1, 2, 3), keepdims=True)
    scale = jnp.where(high > low, jnp.float32(full_scale) / (high - low), jnp.float32(0))
    values = (fused - low) * scale
  else:
    values = jnp.clip(fused, 0, 1) * jnp.float32(full_scale)
  # Half up, then clipped, as `imageio.to_levels`.
  return jnp.clip(jnp.floor(values + jnp.float32(0.5)), 0, full_scale).astype(dtype)


def bucket_shape(height: int, width: int, multiple: int) -> tuple[int, int]:
  """The canvas shape an image is placed on: each side rounded up to `multiple`."""
  return (-(-height // multiple) * multiple, -(-width // multiple) * multiple)


def check_bucket(bucket: int) -> None:
  """Raises ValueError unless `bucket` is 0 (exact sizes) or a positive number of pixels."""
  if isinstance(bucket, bool) or not isinstance(bucket, (int, np.integer)) or bucket < 0:
    raise ValueError(f"bucket must be 0 (exact sizes) or a positive number of pixels, "
                     f"got {bucket!r}")


def quantize(fused: np.ndarray, output: str = "minmax", max_value: int = 255) -> np.ndarray:
  """Turns one fused float image (H, W) into integers on 0..max_value.

  "minmax" (the published behaviour): stretch the image's own min..max to 0..max_value
  and round half up. "clip": clip to [0, 1], scale, round half up (`imageio.to_levels`).
  """
  y = np.asarray(fused, np.float32)
  if output == "minmax":
    low, high = y.min(), y.max()
    scale = np.float32(max_value) / (high - low) if high > low else np.float32(0)
    y = (y - low) * scale
  elif output == "clip":
    y = np.clip(y, 0, 1) * np.float32(max_value)
  else:
    raise ValueError(f"unknown output mode {output!r}; choose one of {OUTPUT_MODES}")
  return imageio.to_levels(y, max_value)


@dataclasses.dataclass
class Fuser:
  """Fuses image arrays as read from files (see `imageio.read_image`).

  Attributes:
    params: student or teacher parameters.
    output: "minmax" (published) or "clip".
    color: fuse the luma and restore the chroma of the input that has colour
      (`chroma_source`): the visible image's when both have, the infrared slot's when only
      it has (PET/SPECT beside an MRI, also an MRI stored as RGB with equal channels, which
      is gray); when neither has, the result is gray. Without it, colour inputs are made
      gray with PIL's `convert("L")`, as published.
    bucket: the networks run on canvases whose sides are multiples of this (rounded up to
      even for the teacher; see `fuse_within`), so a folder of many sizes compiles once per
      bucket; 0 compiles once per exact size.
    chroma_sources: in colour mode, how many fused images took their chroma from each input
      ("ir", "vis"; None: neither had colour, the result is gray), for a tool to report.
  """

  params: Mapping[str, Any]
  output: str = "minmax"
  color: bool = False
  bucket: int = 128
  chroma_sources: collections.Counter = dataclasses.field(
      default_factory=collections.Counter, init=False, repr=False, compare=False)

  def __post_init__(self):
    if self.output not in OUTPUT_MODES:
      raise ValueError(f"unknown output mode {self.output!r}; choose one of {OUTPUT_MODES}")
    check_bucket(self.bucket)
    self.model = networks.model_of(self.params)
    self.params = jax.device_put(jax.tree_util.tree_map(jnp.asarray, self.params))

  def chroma_source(self, ir: np.ndarray, vis: np.ndarray) -> str | None:
    """Which input's chroma colour mode puts back: "vis", "ir" or None (a gray result).

    The visible image's when it has colour (`imageio.has_color`: RGB whose channels differ
    somewhere), else the infrared slot's when it has, else None. An RGB file with equal
    channels is gray: taking its chroma would give R = G = B and lose the other's colour.
    """
    if imageio.has_color(vis):
      return "vis"
    return "ir" if imageio.has_color(ir) else None

  def fuse_images(self, ir: np.ndarray, vis: np.ndarray) -> np.ndarray:
    """Fuses one pair of integer images of the same height and width.

    Returns:
      The image to write: gray (H, W), or RGB (H, W, 3) in colour mode when an input has
      colour (`chroma_source`); 16-bit when either input is 16-bit, else 8-bit.

    Raises:
      ValueError: the two images differ in height or width, or are too small.
    """
    return self.fuse_batch([ir], [vis])[0]

  def fuse_batch(self, irs: Sequence[np.ndarray], viss: Sequence[np.ndarray], *,
                 batch_size: int = 0) -> list[np.ndarray]:
    """`fuse_images` for several pairs of one shared height and width, in one network call.

    Args:
      irs, viss: the pairs' images, as for `fuse_images`.
      batch_size: run the network on this many images, repeating the last pair (the extra
        results are dropped), so that a short last batch reuses the program compiled for the
        full ones; 0 runs exactly the pairs given.

    Returns:
      One image per pair, each exactly what `fuse_images` gives for it.

    Raises:
      ValueError: a pair's images differ in size, are too small, or pairs differ in size.
    """
    prepared = [self._network_inputs(ir, vis) for ir, vis in zip(irs, viss, strict=True)]
    if not prepared:
      return []
    if len({gray_ir.shape for gray_ir, *_ in prepared}) > 1:
      raise ValueError("a batch holds pairs of different sizes")
    fill = [prepared[-1]] * max(0, batch_size - len(prepared))
    fused = self._fuse_gray(np.stack([p[0] for p in prepared + fill]),
                            np.stack([p[1] for p in prepared + fill]))
    if self.color:
      self.chroma_sources.update(chroma_source for _, _, chroma_source, _ in prepared)
    return [self._output_image(f, ir, vis, chroma_source, out_max) for f, ir, vis,
            (_, _, chroma_source, out_max) in zip(fused, irs, viss, prepared)]

  def _network_inputs(self, ir: np.ndarray, vis: np.ndarray) -> tuple:
    """(gray ir, gray vis as float (H, W) in [0, 1], chroma source or None, output full scale)."""
    if ir.shape[:2] != vis.shape[:2]:
      raise ValueError(f"pair of different sizes (infrared {ir.shape[1]}x{ir.shape[0]}, "
                       f"visible {vis.shape[1]}x{vis.shape[0]})")
    if min(ir.shape[:2]) < 4:
      raise ValueError(f"image of {ir.shape[1]}x{ir.shape[0]} pixels is too small (at least 4x4)")
    out_max = max(imageio.max_value(ir), imageio.max_value(vis))
    chroma_source = None
    if self.color:
      chroma_source = self.chroma_source(ir, vis)
    gray = {}
    for slot, image in (("ir", ir), ("vis", vis)):
      if slot == chroma_source:
        ycbcr = imageio.rgb_to_ycbcr(image, imageio.max_value(image))
        gray[slot] = (ycbcr[..., 0] / imageio.max_value(image)).astype(np.float32)
      else:
        gray[slot] = imageio.to_unit_float(imageio.to_gray_published(image))
    return gray["ir"], gray["vis"], chroma_source, out_max

  def _output_image(self, fused: np.ndarray, ir: np.ndarray, vis: np.ndarray,
                    chroma_source: str | None, out_max: int) -> np.ndarray:
    """The fused float (H, W) as the integer image to write (with the chroma put back)."""
    luma = quantize(fused, self.output, out_max)
    if chroma_source is None:
      return luma
    source = vis if chroma_source == "vis" else ir
    # Rescale the chroma source when the other input has more bits (8-bit RGB with 16-bit IR).
    ycbcr = imageio.rgb_to_ycbcr(source.astype(np.float64) * (out_max / imageio.max_value(source)),
                                 out_max)
    ycbcr[..., 0] = luma
    return imageio.ycbcr_to_rgb(ycbcr, out_max)

  def _fuse_gray(self, ir: np.ndarray, vis: np.ndarray) -> np.ndarray:
    """Fuses two (B, H, W) float image stacks, on a bucketed canvas unless bucket is 0."""
    batch, height, width = ir.shape
    canvas_h, canvas_w = height, width
    if self.bucket:
      canvas_h, canvas_w = bucket_shape(height, width, self.bucket)
      if self.model == "teacher":  # Its stride-2 middle needs even canvas sides.
        canvas_h, canvas_w = canvas_h + canvas_h % 2, canvas_w + canvas_w % 2
    if (canvas_h, canvas_w) == (height, width):
      # Exact sizes, or an image that fills its canvas: `fuse` computes the same, and for the
      # student faster (its banded form, which a canvas's inner borders rule out).
      return np.asarray(fuse(self.params, ir[..., None], vis[..., None]))[..., 0]
    pad = ((0, 0), (0, canvas_h - height), (0, canvas_w - width), (0, 0))
    sizes = np.tile(np.array([[height, width]], np.int32), (batch, 1))
    fused = fuse_within(self.params, np.pad(ir[..., None], pad), np.pad(vis[..., None], pad), sizes)
    return np.asarray(fused)[:, :height, :width, 0]
