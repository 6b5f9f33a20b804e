"""Exporting the fusion networks as files that run without this project.

Two formats, both of the whole fusion function `(ir, vis) -> fused` with the parameters baked
in, for any batch size, height and width:

- StableHLO (`export_stablehlo`): `jax.export` with symbolic batch, height and width,
  serialized. Runs in any process with a compatible `jax`, nothing else:
  `jax.export.deserialize(data).call(ir, vis)`. Lowered for CPU and CUDA both, so one file
  serves either.
- ONNX (`export_onnx`): the network written node by node with the `onnx` package's helper
  API from the parameter tree (reflection `Pad`, `Conv`, `Relu`, `Concat`, cubic `Resize`,
  `Tanh`), with dynamic batch, height and width. Runs with `onnxruntime` or any other ONNX
  runtime. Needs the `export` extra (`pip install 'mmdrfuse-jax[export]'`).

Inputs are `ir` and `vis`, float32 NHWC (batch, height, width, 1) in [0, 1]; the output
`fused` has the same shape. The output stage (`OUTPUT_STAGES`) is part of the file:

- "none": the network's tanh output, exactly what `fusion.fuse` returns;
- "clip": that clipped to [0, 1];
- "minmax": the published stretch, per image: `(y - min) / (max - min)` over the image's own
  pixels (0 for a constant image), in [0, 1]; multiplied by 255 and rounded half up it gives
  the published 8-bit fused image (`fusion.quantize(y, "minmax")`) to within one level (the
  two round differently: the float32 operations come in another order). An image with a NaN
  pixel (`fusion.fuse` of an input with one) has no min or max: every pixel of its stretch
  is NaN, as in `fusion.quantize`'s float stretch, never a finite image that hides it.

Sizes: the student takes images of at least 2x2, the teacher of at least 3x3 (`MIN_SIZE`);
the runners of `load_runner` refuse a smaller image with an ExportError naming the minimum
(read from the file: the StableHLO file's shape constraints, the ONNX file's `min_size`).
The teacher's any-size rule is kept (an odd height or width is reflection-padded by one
row/column at the bottom/right, run, and cropped back). With symbolic sizes `h % 2` is not
known when exporting, so neither file branches on it: StableHLO pads every image by one
reflected row and column and slices it to `2 * ((h + 1) // 2)` rows and `2 * ((w + 1) // 2)`
columns (which drops the padding again where the size is even; jax.export handles these
symbolic sizes); ONNX computes `h % 2` and `w % 2` at run time and pads by that much.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmdrfuse_jax.errors import MMDRFuseError
from mmdrfuse_jax.inference import fusion
from mmdrfuse_jax.io import files, imageio
from mmdrfuse_jax.models import networks
from mmdrfuse_jax.runtime import interrupts

FORMATS = ("stablehlo", "onnx")
OUTPUT_STAGES = ("none", "clip", "minmax")
# Lowered for both, so that one StableHLO file runs on a CPU or an NVIDIA GPU.
PLATFORMS = ("cpu", "cuda")
# The smallest height and width each exported network accepts: reflection padding needs 2
# pixels, and the teacher's stride-2 half of an odd size of 3 (padded to 4) is 2.
MIN_SIZE = {"student": 2, "teacher": 3}
# ONNX opset and IR version: opset 17 has everything used here (reflect `Pad` with the pads
# as an input, cubic `Resize` with `cubic_coeff_a`); IR version 8 is what opset 17 came with,
# so older runtimes read the file too.
ONNX_OPSET = 17
ONNX_IR_VERSION = 8
# The largest differences a check (`check_pairs`) accepts against `fusion.fuse`: float32
# values for "none"/"clip", 8-bit gray levels after the stage for "minmax" (whose division by
# an image's own range amplifies float32 rounding).
MAX_ABS_DIFFERENCE = 1e-5
MAX_LEVEL_DIFFERENCE = 1


class ExportError(MMDRFuseError, ValueError):
  """An export cannot be made or checked (a missing package, a bad option); one-line message."""


def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
  if value not in choices:
    raise ExportError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _resolve_model(params: Mapping[str, Any], model: str | None) -> str:
  """The network of `params`; raises ExportError if `model` names the other one."""
  found = networks.model_of(params)
  if model is not None:
    networks.check_model_name(model)
    if model != found:
      raise ExportError(f"the parameters are the {found}'s, but the {model} was asked for")
  return found


def output_stage(fused: jax.Array, output: str) -> jax.Array:
  """Applies an output stage ("none", "clip" or "minmax") to NHWC fused images.

  "minmax" stretches each image's own min..max to [0, 1] (0 for a constant image); an image
  with a NaN pixel becomes NaN everywhere (its min and max are NaN, as in `fusion.quantize`).
  "clip" and "none" leave NaN pixels NaN.
  """
  _check_choice(output, OUTPUT_STAGES, "output stage")
  if output == "clip":
    return jnp.clip(fused, 0.0, 1.0)
  if output == "minmax":
    low = jnp.min(fused, axis=(1, 2, 3), keepdims=True)
    span = jnp.max(fused, axis=(1, 2, 3), keepdims=True) - low
    # Only a constant image (span exactly 0) becomes 0: a NaN span (a NaN pixel, whose min
    # and max are NaN) must fall through to the division, which makes every pixel NaN.
    flat = span == 0
    return jnp.where(flat, 0.0, (fused - low) / jnp.where(flat, 1.0, span))
  return fused


def _pad_to_even(x: jax.Array) -> jax.Array:
  """Reflection-pads an odd height/width by one at the bottom/right; works on symbolic sizes."""
  height, width = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="reflect")
  return padded[:, :2 * ((height + 1) // 2), :2 * ((width + 1) // 2)]


def fusion_function(params: Mapping[str, Any], output: str = "none"
                    ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`(ir, vis) -> fused` with the parameters fixed: `fusion.fuse` and an output stage.

  The result traces with symbolic heights and widths (for `jax.export`): the teacher's
  any-size rule is applied here in a form that needs no `h % 2` at trace time (see the
  module docstring); it computes the same as `fusion.fuse`.
  """
  _check_choice(output, OUTPUT_STAGES, "output stage")
  model = networks.model_of(params)
  params = jax.tree_util.tree_map(lambda p: np.asarray(p, np.float32), params)

  def fuse(ir: jax.Array, vis: jax.Array) -> jax.Array:
    ir = jnp.asarray(ir, jnp.float32)
    vis = jnp.asarray(vis, jnp.float32)
    if model == "teacher":
      height, width = ir.shape[1:3]
      fused = fusion.fuse(params, _pad_to_even(ir), _pad_to_even(vis))[:, :height, :width]
    else:
      fused = fusion.fuse(params, ir, vis)
    return output_stage(fused, output)

  return fuse


def export_stablehlo(params: Mapping[str, Any], model: str | None = None, output: str = "none",
                     platforms: Sequence[str] = PLATFORMS) -> bytes:
  """Exports the fusion function as serialized StableHLO with symbolic batch, height, width.

  Args:
    params: student or teacher parameters (baked into the file as constants).
    model: "student" or "teacher", checked against `params`; None takes the one they are.
    output: the output stage, "none", "clip" or "minmax" (see the module docstring).
    platforms: what the file is lowered for (by default CPU and CUDA).

  Returns:
    The bytes of `jax.export.Exported.serialize()`: load them with
    `jax.export.deserialize(data)` and run `.call(ir, vis)` on float32 (B, H, W, 1) arrays.
  """
  model = _resolve_model(params, model)
  minimum = MIN_SIZE[model]
  batch, height, width = jax.export.symbolic_shape(
      "b, h, w", constraints=(f"h >= {minimum}", f"w >= {minimum}"))
  spec = jax.ShapeDtypeStruct((batch, height, width, 1), jnp.float32)
  exported = jax.export.export(jax.jit(fusion_function(params, output)),
                               platforms=tuple(platforms))(spec, spec)
  return bytes(exported.serialize())


def _import_onnx():
  try:
    import onnx
  except ImportError:
    raise ExportError("the onnx format needs the onnx package: pip install "
                      "'mmdrfuse-jax[export]' (or pip install onnx)") from None
  return onnx


def _import_onnxruntime():
  try:
    import onnxruntime
  except ImportError:
    raise ExportError("running ONNX files needs the onnxruntime package: pip install "
                      "'mmdrfuse-jax[export]' (or pip install onnxruntime)") from None
  return onnxruntime


def require_onnx(runtime: bool = False) -> None:
  """Raises ExportError (one line, how to install) unless onnx (and onnxruntime) import."""
  _import_onnx()
  if runtime:
    _import_onnxruntime()


class _GraphBuilder:
  """Collects ONNX nodes and initializers, giving every value a fresh name."""

  def __init__(self, onnx):
    self.onnx = onnx
    self.nodes = []
    self.initializers = []
    self._count = 0

  def name(self, hint: str) -> str:
    self._count += 1
    return f"{hint}_{self._count}"

  def const(self, hint: str, value: np.ndarray) -> str:
    name = self.name(hint)
    self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
    return name

  def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, **attrs) -> str:
    out = self.name(hint or op_type.lower())
    self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out], **attrs))
    return out


def _onnx_network(g: _GraphBuilder, params: Mapping[str, Any], model: str, x: str) -> str:
  """Adds the network (NCHW, `x` = [ir, vis] channels) to `g`; returns its tanh output."""
  pad_one = g.const("pad_one", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))

  def conv(layer: str, *inputs: str, strides: int = 1) -> str:
    y = g.op("Concat", inputs, "concat", axis=1) if len(inputs) > 1 else inputs[0]
    y = g.op("Pad", [y, pad_one], "pad", mode="reflect")
    kernel = np.asarray(params[layer]["kernel"], np.float32).transpose(3, 2, 0, 1)  # OIHW
    weight = g.const(f"{layer}_weight", np.ascontiguousarray(kernel))
    bias = g.const(f"{layer}_bias", np.asarray(params[layer]["bias"], np.float32))
    return g.op("Conv", [y, weight, bias], layer, kernel_shape=[3, 3], strides=[strides, strides])

  def conv_relu(layer: str, *inputs: str, strides: int = 1) -> str:
    return g.op("Relu", [conv(layer, *inputs, strides=strides)], f"{layer}_relu")

  if model == "student":
    feat = conv_relu("conv1", x)
    return g.op("Tanh", [conv("conv2", feat)], "out")

  # The any-size rule: pad an odd height/width by one reflected row/column at the bottom/right
  # (h % 2 and w % 2 computed at run time), run, and crop back.
  size = g.op("Slice", [g.op("Shape", [x], "shape"), g.const("two", np.array([2], np.int64)),
                        g.const("four", np.array([4], np.int64))], "height_width")
  odd = g.op("Mod", [size, g.const("two", np.array([2], np.int64))], "odd")
  pads = g.op("Concat", [g.const("zeros", np.zeros(6, np.int64)), odd], "pads_to_even", axis=0)
  x = g.op("Pad", [x, pads], "even", mode="reflect")

  g1 = conv_relu("conv1", x)
  g2 = conv_relu("conv2", g1)
  g3 = conv_relu("conv3", g1, g2, strides=2)
  g4 = conv_relu("conv4", g3)
  g5 = conv_relu("conv5", g3, g4)
  g6 = conv_relu("conv6", g3, g4, g5)
  d6 = conv_relu("conv66", g6)
  d5 = conv_relu("conv55", g5, d6)
  d4 = conv_relu("conv44", g4, d5)
  d3 = conv_relu("conv33", g3, d4)
  # PyTorch's bicubic x2 (align_corners=False: half-pixel centres; coefficient -0.75; samples
  # beyond the border take the border's value), as `networks.upsample2x_bicubic`.
  up = g.op("Resize", [d3, "", g.const("scales", np.array([1, 1, 2, 2], np.float32))],
            "upsample", mode="cubic", cubic_coeff_a=-0.75,
            coordinate_transformation_mode="half_pixel", exclude_outside=0)
  d2 = conv_relu("conv22", g2, up)
  feat = conv_relu("conv11", g1, d2)  # conv11's ReLU is the separate `feat` step in networks.py.
  out = g.op("Tanh", [conv("conv00", feat)], "out_even")
  return g.op("Slice", [out, g.const("zeros", np.zeros(2, np.int64)), size,
                        g.const("axes", np.array([2, 3], np.int64))], "out")


def _onnx_output_stage(g: _GraphBuilder, y: str, output: str) -> str:
  if output == "clip":
    return g.op("Clip", [y, g.const("zero", np.array(0, np.float32)),
                         g.const("one", np.array(1, np.float32))], "clip")
  if output == "minmax":  # as `output_stage`: 0 for a constant image, all NaN after a NaN pixel
    low = g.op("ReduceMin", [y], "low", axes=[1, 2, 3], keepdims=1)
    span = g.op("Sub", [g.op("ReduceMax", [y], "high", axes=[1, 2, 3], keepdims=1), low], "span")
    zero = g.const("zero", np.array(0, np.float32))
    flat = g.op("Equal", [span, zero], "flat")
    safe = g.op("Where", [flat, g.const("one", np.array(1, np.float32)), span], "safe_span")
    stretched = g.op("Div", [g.op("Sub", [y, low], "shifted"), safe], "stretched")
    stretched = g.op("Where", [flat, zero, stretched], "stretched_or_flat")
    # ONNX leaves NaN in ReduceMin/ReduceMax unspecified (onnxruntime skips it or not, by
    # position), so a NaN pixel is looked for explicitly.
    nan_pixels = g.op("Cast", [g.op("IsNaN", [y], "nan_pixels")], "nan_pixels_float",
                      to=g.onnx.TensorProto.FLOAT)
    any_nan = g.op("Greater", [g.op("ReduceMax", [nan_pixels], "nan_seen", axes=[1, 2, 3],
                                    keepdims=1), zero], "any_nan")
    return g.op("Where", [any_nan, g.const("nan", np.array(np.nan, np.float32)), stretched],
                "minmax")
  return y


def export_onnx(params: Mapping[str, Any], model: str | None = None, output: str = "none"):
  """Builds the fusion function as an ONNX model with dynamic batch, height and width.

  Args:
    params: student or teacher parameters (stored as initializers).
    model: "student" or "teacher", checked against `params`; None takes the one they are.
    output: the output stage, "none", "clip" or "minmax" (see the module docstring).

  Returns:
    An `onnx.ModelProto` that passed `onnx.checker.check_model` (with shape inference):
    inputs `ir`, `vis` and output `fused`, float32 (batch, height, width, 1).

  Raises:
    ExportError: the onnx package is missing, or a bad `model`/`output`.
  """
  model = _resolve_model(params, model)
  _check_choice(output, OUTPUT_STAGES, "output stage")
  onnx = _import_onnx()
  helper = onnx.helper
  g = _GraphBuilder(onnx)
  nhwc = g.op("Concat", ["ir", "vis"], "inputs", axis=3)
  x = g.op("Transpose", [nhwc], "nchw", perm=[0, 3, 1, 2])
  y = _onnx_output_stage(g, _onnx_network(g, params, model, x), output)
  g.nodes.append(helper.make_node("Transpose", [y], ["fused"], perm=[0, 2, 3, 1]))

  def image(name: str):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                         ["batch", "height", "width", 1])

  graph = helper.make_graph(g.nodes, f"mmdrfuse_{model}", [image("ir"), image("vis")],
                            [image("fused")], initializer=g.initializers)
  proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                            producer_name="mmdrfuse-jax", ir_version=ONNX_IR_VERSION,
                            doc_string=(f"MMDRFuse {model}: ir, vis float32 NHWC in [0, 1] -> "
                                        f"fused, output stage {output!r}; height and width at "
                                        f"least {MIN_SIZE[model]}"))
  helper.set_model_props(proto, {"model": model, "output": output,
                                 "min_size": str(MIN_SIZE[model])})
  onnx.checker.check_model(proto, full_check=True)
  return proto


def export_bytes(params: Mapping[str, Any], fmt: str, model: str | None = None,
                 output: str = "none") -> bytes:
  """The exported file's bytes in format `fmt` ("stablehlo" or "onnx")."""
  _check_choice(fmt, FORMATS, "format")
  if fmt == "stablehlo":
    return export_stablehlo(params, model, output)
  return export_onnx(params, model, output).SerializeToString()


def write_file(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (a temporary file in its folder, then renamed)."""
  with files.atomic_write(path) as f:
    f.write(data)


def load_runner(fmt: str, data: bytes) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
  """A function `(ir, vis) -> fused` (NumPy arrays) that runs an exported file's bytes.

  StableHLO runs through `jax.export.deserialize` (compiled once per shape); ONNX through an
  `onnxruntime` session on the CPU. An image smaller than the file's minimum (`MIN_SIZE`,
  read from the file itself) is refused before it reaches the runtime.

  Raises:
    ExportError: `fmt` is unknown, or onnxruntime is missing for ONNX; from the function, an
      image smaller than the file's minimum height or width (one line naming the minimum).
  """
  _check_choice(fmt, FORMATS, "format")
  if fmt == "stablehlo":
    exported = jax.export.deserialize(bytearray(data))
    call = jax.jit(exported.call)
    return _refusing_small_images(
        lambda ir, vis: np.asarray(call(ir, vis)), _stablehlo_min_size(exported))
  session = _import_onnxruntime().InferenceSession(data, providers=["CPUExecutionProvider"])
  min_size = session.get_modelmeta().custom_metadata_map.get("min_size", "")
  return _refusing_small_images(lambda ir, vis: session.run(["fused"], {"ir": ir, "vis": vis})[0],
                                int(min_size) if min_size.isdigit() else None)


def _stablehlo_min_size(exported) -> int | None:
  """The smallest height and width a deserialized StableHLO file accepts (None: unknown).

  jax.export keeps the `h >= N` constraints of `export_stablehlo` only as shape assertions in
  the module, after a shape refinement that fails first on a too small image ("Error refining
  shapes", naming nothing), so they are read from the assertions' messages.
  """
  found = re.findall(r"symbolic shape constraint [hw] >= (\d+)", exported.mlir_module())
  return max(int(n) for n in found) if found else None


def _refusing_small_images(run: Callable[[np.ndarray, np.ndarray], np.ndarray],
                           min_size: int | None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
  """`run` on float32 arrays, refusing images under `min_size` with a one-line ExportError."""

  def checked(ir: np.ndarray, vis: np.ndarray) -> np.ndarray:
    ir, vis = np.asarray(ir, np.float32), np.asarray(vis, np.float32)
    if min_size is not None:
      for x in (ir, vis):
        if x.ndim == 4 and min(x.shape[1:3]) < min_size:
          raise ExportError(f"image of {x.shape[2]}x{x.shape[1]} pixels is too small for this "
                            f"file (at least {min_size}x{min_size})")
    return run(ir, vis)

  return checked


def levels(images: np.ndarray, output: str) -> np.ndarray:
  """8-bit gray levels of output-stage images as they would be written.

  "minmax" images are already stretched to [0, 1]: scaled by 255 and rounded half up;
  "none"/"clip": clipped to [0, 1] first (`fusion.quantize(..., "clip")`).
  """
  images = np.asarray(images, np.float32)
  if output == "minmax":
    return imageio.to_levels(images * np.float32(255), 255)
  return imageio.to_levels(np.clip(images, 0, 1) * np.float32(255), 255)


def compare(got: np.ndarray, fused: np.ndarray, output: str) -> tuple[float, int]:
  """How far an exported file's output is from the project's fusion.

  Args:
    got: the exported file's output, (B, H, W, 1).
    fused: `fusion.fuse` on the same inputs (the tanh output, no output stage).
    output: the file's output stage.

  Returns:
    The largest |got - output_stage(fused)| and the largest difference in 8-bit gray levels
    (`levels`); for "minmax" against the published pipeline, `fusion.quantize(fused,
    "minmax")` per image.
  """
  got = np.asarray(got, np.float32)
  fused = np.asarray(fused, np.float32)
  if got.shape != fused.shape:
    raise ValueError(f"exported output has shape {got.shape}, expected {fused.shape}")
  expected = np.asarray(output_stage(jnp.asarray(fused), output))
  max_abs = float(np.max(np.abs(got.astype(np.float64) - expected)))
  if output == "minmax":
    want = np.stack([fusion.quantize(f[..., 0], "minmax") for f in fused])[..., None]
  else:
    want = levels(expected, output)
  max_levels = int(np.max(np.abs(levels(got, output).astype(int) - want.astype(int))))
  return max_abs, max_levels


@dataclasses.dataclass
class CheckResult:
  """What `check_pairs` found for one exported file.

  Attributes:
    pairs: number of pairs compared.
    max_abs: largest |exported - reference| over all pixels (after the output stage).
    max_levels: largest difference in 8-bit gray levels (see `compare`).
    worst: the stem of the pair with the largest `max_abs`.
  """

  output: str
  pairs: int = 0
  max_abs: float = 0.0
  max_levels: int = 0
  worst: str = ""

  def passed(self) -> bool:
    """Whether every pair is within the tolerances (`MAX_ABS_DIFFERENCE`, ...)."""
    if self.output == "minmax":
      return self.max_levels <= MAX_LEVEL_DIFFERENCE
    return self.max_abs <= MAX_ABS_DIFFERENCE


Runner = Callable[[np.ndarray, np.ndarray], np.ndarray]


def check_pairs(runners: Mapping[str, tuple[Runner, str]], params: Mapping[str, Any],
                pairs: Sequence[tuple[str, tuple[pathlib.Path, ...]]],
                progress: Callable[[str], None] | None = None,
                stop: interrupts.StopRequest | None = None
                ) -> tuple[dict[str, CheckResult], list[str]]:
  """Runs exported files on image pairs and compares them with `fusion.fuse`.

  Images are read as `bin/fuse.py` reads them without `--color` (gray as published, in
  [0, 1]) and fused one pair at a time, at their own size; `fusion.fuse` runs once per pair
  for all the files.

  Args:
    runners: {name: (runner from `load_runner`, the file's output stage)}, files exported
      from `params`.
    params: the parameters the files were exported from.
    pairs: (stem, (ir_path, vis_path)), as from `imageio.pair_inputs`.
    progress: called with each stem after it is compared.
    stop: checked before each pair and between the compiled calls of a pair (never inside
      one: XLA and onnxruntime must not be interrupted); once its `signum` is set,
      `interrupts.Interrupted` is raised.

  Returns:
    {name: CheckResult}, and one-line messages of the pairs that could not be compared.

  Raises:
    interrupts.Interrupted: `stop` was set.
  """

  def check_stop() -> None:
    if stop is not None and stop.signum is not None:
      raise interrupts.Interrupted(stop.signum)

  params = jax.tree_util.tree_map(jnp.asarray, params)
  minimum = MIN_SIZE[networks.model_of(params)]
  results = {name: CheckResult(output) for name, (_, output) in runners.items()}
  problems = []
  for stem, (ir_path, vis_path) in pairs:
    check_stop()
    try:
      ir_image, vis_image = imageio.read_image(ir_path), imageio.read_image(vis_path)
      imageio.check_same_size((ir_path, vis_path), (ir_image, vis_image))
    except imageio.ImageError as e:
      problems.append(str(e))
      continue
    ir, vis = (imageio.to_unit_float(imageio.to_gray_published(i))[None, ..., None]
               for i in (ir_image, vis_image))
    if min(ir.shape[1:3]) < minimum:
      problems.append(f"{ir_path}: image of {ir.shape[2]}x{ir.shape[1]} pixels is too small "
                      f"(at least {minimum}x{minimum})")
      continue
    fused = np.asarray(fusion.fuse(params, ir, vis))
    for name, (runner, output) in runners.items():
      check_stop()
      max_abs, max_levels = compare(runner(ir, vis), fused, output)
      result = results[name]
      result.pairs += 1
      if max_abs >= result.max_abs:
        result.max_abs, result.worst = max_abs, stem
      result.max_levels = max(result.max_levels, max_levels)
    if progress is not None:
      progress(stem)
  return results, problems
