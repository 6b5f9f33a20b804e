"""The MMDRFuse networks as Flax Linen modules (NHWC).

Both networks take the two gray sources stacked as channels, `[ir, visible]`, each in
[0, 1], shape (B, H, W, 2), and return a dict of the fused image and the intermediates the
losses need. Every 3x3 convolution is preceded by reflection padding of 1, as published.
Parameter trees are named after the published layers (`conv1`, ..., `conv00`) so that the
published PyTorch weights map one to one (see `weight_files.py`).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmdrfuse_jax.models import precision as precision_lib

STUDENT_LAYERS = ("conv1", "conv2")
TEACHER_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "conv66", "conv55",
                  "conv44", "conv33", "conv22", "conv11", "conv00")


CONV_IMPLS = ("auto", "planar", "xla")


def resolve_conv_impl(conv_impl: str) -> str:
  """How the narrow convolutions (the student's, the teacher's 64->4 `conv11`) are computed.

  "planar": as sums of shifted planes / one wide matrix product of the taps, which XLA's CPU
  backend runs about 20x / 15x faster than its convolution of so few channels (docs/benchmarks.md).
  "xla": XLA's own convolution (cuDNN on NVIDIA GPUs). Both compute the same thing (tests
  compare values and gradients). "auto" is "planar" on a CPU and "xla" elsewhere: on
  accelerators the library convolution is the natural default, to be confirmed by
  `bench.py infer --conv_impl` there.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {', '.join(CONV_IMPLS)}; got {conv_impl!r}")
  if conv_impl == "auto":
    return "planar" if jax.default_backend() == "cpu" else "xla"
  return conv_impl


def reflect_pad(x: jax.Array, pad: int = 1) -> jax.Array:
  """Reflection padding of the spatial axes (PyTorch `ReflectionPad2d`)."""
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def reflect_pad_within(x: jax.Array, sizes: jax.Array) -> jax.Array:
  """Reflection padding of 1 around the top-left `sizes[b]` region of each image.

  For images placed on a larger canvas (to share one compiled shape), this pads each image
  as if the canvas ended at its true height and width: rows/columns of the result up to
  the true size + 2 equal `reflect_pad` of the cropped image; the rest is don't-care.

  Args:
    x: (B, H, W, ...) canvas.
    sizes: (B, 2) int32 true (height, width) of each image, each at least 2.
  """

  def pad_axis(image, size, axis):
    padded = jnp.pad(image, [(1, 1) if a == axis else (0, 0) for a in range(image.ndim)],
                     mode="reflect")  # The leading side is already right: index -1 -> 1.
    mirror = jax.lax.dynamic_slice_in_dim(image, size - 2, 1, axis=axis)
    return jax.lax.dynamic_update_slice_in_dim(padded, mirror, size + 1, axis=axis)

  def pad_one(image, size):
    return pad_axis(pad_axis(image, size[0], 0), size[1], 1)

  return jax.vmap(pad_one)(x, sizes)


def _clamp_within(x: jax.Array, sizes: jax.Array) -> jax.Array:
  """Each image's rows and columns past its true `sizes[b]` replaced by its last true ones.

  Resampling reads a few pixels beyond an image's border, where PyTorch's bicubic
  interpolation (and `upsample2x_bicubic`) repeats the edge; on a canvas this puts that edge
  where the resampling will look.
  """

  def clamp_one(image, size):
    rows = jnp.minimum(jnp.arange(image.shape[0]), size[0] - 1)
    cols = jnp.minimum(jnp.arange(image.shape[1]), size[1] - 1)
    return image[rows][:, cols]

  return jax.vmap(clamp_one)(x, sizes)


def _even_within(x: jax.Array, sizes: jax.Array) -> jax.Array:
  """The teacher's odd-size rule on a canvas: row h (column w) := row h-2 (column w-2) where
  the true height h (width w) is odd, i.e. one reflected row/column at the bottom/right."""

  def fix_axis(image, size, axis):
    mirror = jax.lax.dynamic_slice_in_dim(image, size - 2, 1, axis=axis)
    fixed = jax.lax.dynamic_update_slice_in_dim(image, mirror, size, axis=axis)
    return jnp.where(size % 2 == 1, fixed, image)

  def fix_one(image, size):
    return fix_axis(fix_axis(image, size[0], 0), size[1], 1)

  return jax.vmap(fix_one)(x, sizes)


class TapMatmulConv(nn.Module):
  """A 3x3 'valid' convolution with bias for layers with few output channels.

  XLA's CPU convolution is slow when the output has only a few channels (the teacher's
  64->4 `conv11`). This computes the same thing as one wide matrix product of the input
  with all nine taps' kernels side by side, then adds the nine shifted products, which is
  much faster there, forward and backward (figures: docs/benchmarks.md). Parameters are those of
  `nn.Conv` (HWIO `kernel`, `bias`).
  """

  features: int
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST
  dtype: Any = jnp.float32  # Of the computation; parameters stay float32.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, channels, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,)).astype(self.dtype)
    taps = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(channels, 9 * self.features)
    products = jnp.dot(x.astype(self.dtype), taps.astype(self.dtype), precision=self.precision)
    products = products.reshape(x.shape[:3] + (9, self.features))
    height, width = x.shape[1] - 2, x.shape[2] - 2
    out = bias
    for dy in range(3):
      for dx in range(3):
        out = out + products[:, dy:dy + height, dx:dx + width, 3 * dy + dx]
    return out


def _conv(features: int, name: str, strides: int = 1, mode: str = "exact") -> nn.Conv:
  # Parameters sit directly under the layer's published name ({"conv1": {"kernel", "bias"}}).
  return nn.Conv(features, (3, 3), strides=(strides, strides), padding="VALID",
                 precision=precision_lib.lax_precision(mode),
                 dtype=precision_lib.compute_dtype(mode), name=name)


class Conv3x3Params(nn.Module):
  """A 3x3 convolution's parameters, named and initialised as `nn.Conv`'s (HWIO `kernel`,
  `bias`), so that the published weights map one to one; the computation is left to the
  caller (`conv3x3_planes`)."""

  features: int
  in_features: int

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, self.in_features, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    return kernel, bias


def conv3x3_planes(planes: Sequence[jax.Array], kernel: jax.Array,
                   bias: jax.Array) -> list[jax.Array]:
  """A 'valid' 3x3 convolution with bias of channel planes (B, H, W): (B, H-2, W-2) planes.

  For the student's handful of channels, XLA's CPU convolution is slow; a sum of shifted,
  scaled planes compiles to one fused, vectorised loop per output channel and is much
  faster there (figures: docs/benchmarks.md).
  """
  height, width = planes[0].shape[1] - 2, planes[0].shape[2] - 2
  outputs = []
  for o in range(kernel.shape[-1]):
    acc = bias[o]
    for i, plane in enumerate(planes):
      for dy in range(3):
        for dx in range(3):
          acc = acc + kernel[dy, dx, i, o] * plane[:, dy:dy + height, dx:dx + width]
    outputs.append(acc)
  return outputs


def _padded_conv3x3(planes: Sequence[jax.Array], kernel: jax.Array, bias: jax.Array,
                    pad) -> list[jax.Array]:
  """The published layer: `pad` each plane by 1 (reflection), then `conv3x3_planes`."""
  # The barrier makes XLA materialise the padded planes: fusing the reflection into the
  # shifted reads would turn every read into a gather and lose vectorisation.
  padded = jax.lax.optimization_barrier([pad(p) for p in planes])
  return conv3x3_planes(padded, kernel, bias)


def _written_out(planes: list[jax.Array], key: jax.Array) -> list[jax.Array]:
  """`planes`, which XLA must write to memory instead of fusing them into their readers.

  XLA's CPU backend fuses a convolution loop into the next one's nine shifted reads (nine
  times the work: 30 ms instead of 4.5 at 1280x1024), and `optimization_barrier` does not
  stop it. Fusion never crosses a `cond`'s boundary; both branches return the same values,
  so the result never depends on `key` (any value that XLA cannot know when compiling).
  """
  return jax.lax.cond(key == key, lambda v: v, lambda v: [p + 0 for p in v], planes)


BANDED_MIN_SIZE = 5


def _student_out_banded(planes: Sequence[jax.Array], k1: jax.Array, b1: jax.Array,
                        k2: jax.Array, b2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The student's (out_pre, out) planes without writing a padded copy of anything.

  Away from the border, the output needs no padding: the first layer's 'valid' output is
  exactly its features one pixel in, and the second layer's 'valid' output of those is the
  fused image two pixels in. The two rows and columns along each border come from the
  published, padded computation on bands five pixels wide, and are joined to the interior
  in one copy. Equal to the padded computation up to float rounding (tests); 4.0 against
  6.6 ms at 1280x1024 on a 2-core CPU (docs/benchmarks.md). Planes of at least
  `BANDED_MIN_SIZE` in each side.
  """
  height, width = planes[0].shape[1:3]

  def padded_student(bands: Sequence[jax.Array]) -> jax.Array:
    feat = [nn.relu(f) for f in _padded_conv3x3(bands, k1, b1, _reflect_pad_plane)]
    return _padded_conv3x3(feat, k2, b2, _reflect_pad_plane)[0]

  # Two conds, each keyed by a value XLA cannot know when compiling: a weight and a pixel.
  # Weights closed over are constants (XLA removes that cond), and under a vmap over images
  # the pixel is batched (the cond becomes a select, which fuses); one cond always remains.
  feat = [nn.relu(f) for f in conv3x3_planes(planes, k1, b1)]
  feat = _written_out(_written_out(feat, b1[0]), planes[0][0, 0, 0])
  (inner,) = conv3x3_planes(feat, k2, b2)
  # The top and bottom bands in one call, the left and right ones in another (stacked on
  # the batch axis): half the program to compile.
  batch = planes[0].shape[0]
  rows = padded_student([jnp.concatenate([p[:, :5], p[:, height - 5:]]) for p in planes])
  top, bottom = rows[:batch, :2], rows[batch:, 3:]
  cols = padded_student([jnp.concatenate([p[:, :, :5], p[:, :, width - 5:]]) for p in planes])
  left, right = cols[:batch, 2:height - 2, :2], cols[batch:, 2:height - 2, 3:]

  def joined(f):
    middle = jnp.concatenate([f(left), f(inner), f(right)], axis=2)
    return jnp.concatenate([f(top), middle, f(bottom)], axis=1)

  return joined(lambda y: y), joined(jnp.tanh)


def _reflect_pad_plane(x: jax.Array) -> jax.Array:
  return jnp.pad(x, ((0, 0), (1, 1), (1, 1)), mode="reflect")


class Student(nn.Module):
  """The 113-parameter student: conv1 (2->4) + ReLU, conv2 (4->1) + tanh.

  `conv_impl`: see `resolve_conv_impl` (the parameters are the same either way).

  `banded`: the form for fusing rather than training. With the planar convolutions, no
  canvas and images of at least `BANDED_MIN_SIZE` a side, `out` and `out_pre` come from
  `_student_out_banded`: the same values up to float rounding, 40% less time on a CPU, but
  about twice the compile time and three times under differentiation, so training keeps
  the padded form. `fusion.fuse` sets it (`get_model(..., inference=True)`).

  Returns:
    A dict with `feat_pre` (conv1 output), `feat` (its ReLU), `out_pre` (conv2 output) and
    `out` (tanh(out_pre), the fused image in [-1, 1]; in practice in [0, 1]), all NHWC.
  """

  conv_impl: str = "auto"
  banded: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, sizes: jax.Array | None = None) -> dict[str, jax.Array]:
    """Runs the student.

    Args:
      x: (B, H, W, 2) stacked [ir, visible].
      sizes: optional (B, 2) true (height, width) of images placed top-left on the canvas
        `x`; the outputs inside each true region then equal those of the cropped image
        (used to share one compilation among images of different sizes).
    """
    pad = (_reflect_pad_plane if sizes is None
           else functools.partial(reflect_pad_within, sizes=sizes))
    if resolve_conv_impl(self.conv_impl) == "xla":
      def conv(features, name, y):  # Planes padded as in the planar path, then one conv.
        padded = jnp.stack([pad(y[..., c]) for c in range(y.shape[-1])], axis=-1)
        return _conv(features, name)(padded)

      feat_pre = conv(4, "conv1", x)
      feat = nn.relu(feat_pre)
      out_pre = conv(1, "conv2", feat)
      return {"feat_pre": feat_pre, "feat": feat, "out_pre": out_pre, "out": jnp.tanh(out_pre)}

    planes = [x[..., c] for c in range(x.shape[-1])]
    k1, b1 = Conv3x3Params(4, len(planes), name="conv1")()
    k2, b2 = Conv3x3Params(1, 4, name="conv2")()
    feat_pre_planes = _padded_conv3x3(planes, k1, b1, pad)
    feat_planes = [nn.relu(f) for f in feat_pre_planes]
    height, width = x.shape[1:3]
    if (self.banded and sizes is None and isinstance(height, int) and isinstance(width, int)
        and min(height, width) >= BANDED_MIN_SIZE and x.shape[0] > 0):
      # `feat_pre` and `feat` above are computed only when a caller uses them (jit drops
      # what no output needs).
      out_pre, out = _student_out_banded(planes, k1, b1, k2, b2)
    else:
      (out_pre,) = _padded_conv3x3(feat_planes, k2, b2, pad)
      out = jnp.tanh(out_pre)
    return {"feat_pre": jnp.stack(feat_pre_planes, axis=-1),
            "feat": jnp.stack(feat_planes, axis=-1), "out_pre": out_pre[..., None],
            "out": out[..., None]}


def upsample2x_bicubic(x: jax.Array, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """PyTorch's `interpolate(scale_factor=2, mode="bicubic", align_corners=False)`.

  PyTorch uses the cubic coefficient -0.75 and no antialiasing; plain
  `jax.image.resize(method="bicubic")` uses -0.5 and differs.
  """
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), method="bicubic-pytorch", antialias=False,
                          precision=precision)


class Teacher(nn.Module):
  """The 556,489-parameter teacher (dense encoder, stride-2 middle, bicubic x2 decoder).

  The published teacher only works on even heights and widths: its stride-2 `conv3` and
  the x2 upsampling must give back the input size. With `any_size=True` (the default) an
  odd height or width is first reflection-padded by one row/column at the bottom/right,
  the network runs on the even size, and every full-resolution output is cropped back to
  the input size (half-resolution encoder taps keep the padded size's half). With
  `any_size=False` an odd size raises, as the published code would fail.

  `precision` ("exact", "default" or "bfloat16", see `precision.py`) sets how its
  convolutions compute; the outputs are float32 in every mode. `conv_impl`: see
  `resolve_conv_impl`.

  With `sizes`, images of different sizes share one canvas shape (and so one compilation):
  each image sits top-left on the canvas, every reflection padding is taken at its true
  border (at half resolution too), its odd side gets the reflected row/column above, and the
  bicubic upsampling sees its edge repeated past that border, as at a real border. Inside
  each true region the outputs then equal those of the cropped image up to float rounding
  (the convolutions sum in another order on a bigger array: about 1e-6). The canvas's
  height and width must be even; outputs are returned on the canvas (not cropped).

  Returns:
    A dict with `encoder` (G1..G6), `feat_pre` (conv11 output), `feat` (its ReLU),
    `out_pre` (conv00 output) and `out` (tanh(out_pre)).
  """

  any_size: bool = True
  precision: str = "exact"
  conv_impl: str = "auto"  # Of the 64->4 `conv11`, see `resolve_conv_impl`.

  @nn.compact
  def __call__(self, x: jax.Array, sizes: jax.Array | None = None) -> dict[str, Any]:
    """Runs the teacher on (B, H, W, 2) stacked [ir, visible]; `sizes`: see the class."""
    height, width = x.shape[1:3]
    pad_h, pad_w = height % 2, width % 2
    if sizes is None:
      if pad_h or pad_w:
        if not self.any_size:
          raise ValueError(f"the published teacher needs even sizes, got {height}x{width}")
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
      pad_full = pad_half = reflect_pad
    else:
      if pad_h or pad_w:
        raise ValueError(f"the teacher's canvas must have even sides, got {height}x{width}")
      x = _even_within(x, sizes)
      full = jnp.asarray(sizes) + jnp.asarray(sizes) % 2  # The even size each image runs at.
      pad_full = functools.partial(reflect_pad_within, sizes=full)
      pad_half = functools.partial(reflect_pad_within, sizes=full // 2)

    mode = self.precision
    dtype = precision_lib.compute_dtype(mode)
    x = x.astype(dtype)

    def conv_relu(features, name, *inputs, strides=1, pad=pad_full):
      y = jnp.concatenate(inputs, axis=-1) if len(inputs) > 1 else inputs[0]
      return nn.relu(_conv(features, name, strides, mode)(pad(y)))

    g1 = conv_relu(32, "conv1", x)
    g2 = conv_relu(32, "conv2", g1)
    g3 = conv_relu(64, "conv3", g1, g2, strides=2)
    g4 = conv_relu(64, "conv4", g3, pad=pad_half)
    g5 = conv_relu(64, "conv5", g3, g4, pad=pad_half)
    g6 = conv_relu(64, "conv6", g3, g4, g5, pad=pad_half)
    d6 = conv_relu(64, "conv66", g6, pad=pad_half)
    d5 = conv_relu(64, "conv55", g5, d6, pad=pad_half)
    d4 = conv_relu(64, "conv44", g4, d5, pad=pad_half)
    d3 = conv_relu(64, "conv33", g3, d4, pad=pad_half)
    if sizes is not None:
      d3 = _clamp_within(d3, full // 2)
    d2 = conv_relu(32, "conv22", g2, upsample2x_bicubic(d3, precision_lib.lax_precision(mode)))
    conv11: TapMatmulConv | nn.Conv
    if resolve_conv_impl(self.conv_impl) == "planar":
      conv11 = TapMatmulConv(4, precision_lib.lax_precision(mode), dtype, name="conv11")
    else:
      conv11 = _conv(4, "conv11", mode=mode)
    feat_pre = conv11(pad_full(jnp.concatenate([g1, d2], axis=-1)))
    feat = nn.relu(feat_pre)
    out_pre = _conv(1, "conv00", mode=mode)(pad_full(feat)).astype(jnp.float32)
    outputs = {"feat_pre": feat_pre, "feat": feat, "out_pre": out_pre, "out": jnp.tanh(out_pre)}

    def crop(v):  # Full resolution back to the input size; on a canvas the caller crops.
      return v if sizes is not None else v[:, :height, :width]

    outputs = {k: crop(v).astype(jnp.float32) for k, v in outputs.items()}
    outputs["encoder"] = tuple(g.astype(jnp.float32) for g in (
        crop(g1), crop(g2), g3, g4, g5, g6))
    return outputs


MODELS = {"student": Student, "teacher": Teacher}
# The top-level entries of each network's parameter tree: what tells the two apart.
MODEL_LAYERS = {"student": STUDENT_LAYERS, "teacher": TEACHER_LAYERS}


def check_model_name(name: str) -> None:
  """Raises ValueError, listing the choices, when `name` is not a network of this module."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")


def get_model(name: str, precision: str = "exact", *, inference: bool = False) -> nn.Module:
  """The network called `name` ("student" or "teacher").

  `precision` (see `precision.py`) applies to the teacher; the student is float32 always.
  `inference`: the form for fusing rather than training (the student's `banded`).
  """
  check_model_name(name)
  precision_lib.check(precision)
  if name == "teacher":
    return Teacher(precision=precision)
  return Student(banded=inference)


def layer_names(name: str) -> tuple[str, ...]:
  """The published layer names of the network called `name` (its parameter tree's keys)."""
  check_model_name(name)
  return MODEL_LAYERS[name]


def find_model(params_or_layer_names: Iterable[str]) -> str | None:
  """The network whose layers are exactly these ("student" or "teacher"), else None.

  Args:
    params_or_layer_names: a parameter tree (its keys are the layers) or layer names.
  """
  layers = set(params_or_layer_names)
  for name, names in MODEL_LAYERS.items():
    if layers == set(names):
      return name
  return None


def model_of(params_or_layer_names: Iterable[str]) -> str:
  """Which network ("student" or "teacher") a parameter tree belongs to, from its layers.

  The tree's structure is static under jit, so this costs nothing inside a traced function.

  Raises:
    ValueError: the layers are neither network's.
  """
  layers = set(params_or_layer_names)
  found = find_model(layers)
  if found is None:
    raise ValueError(f"parameters with layers {sorted(layers)} are neither the student's nor the "
                     "teacher's")
  return found


def init_params(name: str, rng: jax.Array, shape: Sequence[int] = (1, 16, 16, 2)) -> Any:
  """Freshly initialised parameters of the network called `name`."""
  return get_model(name).init(rng, jnp.zeros(shape, jnp.float32))["params"]


def count_params(params: Any) -> int:
  """Total number of scalars in a parameter tree."""
  return sum(p.size for p in jax.tree_util.tree_leaves(params))
