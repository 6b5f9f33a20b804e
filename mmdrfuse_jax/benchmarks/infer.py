"""`bench.py infer`: time the jitted `fuse` on random images of a given size.

Beside it, the memory bound: the time of the cheapest jitted function that moves the same
bytes (reads both inputs, writes one output of the same size: their element-wise maximum).
No fusion can run faster than that on the same device; the ratio says how far from it the
network is.

`--levels 8` times the 8-bit path instead (`fusion.fuse_levels`: uint8 images in, the
published min-max stretch to uint8 on the device, uint8 images out), beside what the float
path costs a caller who wants the same 8-bit images (`fuse`, then `quantize` of each image
on the host); its bound moves the 8-bit bytes.

`--engine stablehlo|onnxruntime` times the exported file instead (`mmdrfuse_jax.inference.export`):
the StableHLO file through `jax.export.deserialize(...).call` (jitted), the ONNX file through
an onnxruntime CPU session; the result then also gives the file's size.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from mmdrfuse_jax.benchmarks import common
from mmdrfuse_jax.inference import fusion
from mmdrfuse_jax.models import networks

ENGINES = ("jax", "stablehlo", "onnxruntime")


@jax.jit
def _same_bytes(ir: jax.Array, vis: jax.Array) -> jax.Array:
  """Reads both images and writes one of their size: the traffic of a fusion, no network."""
  return jax.numpy.maximum(ir, vis)


def _float_then_host_quantize(params, ir: jax.Array, vis: jax.Array) -> list[np.ndarray]:
  """The 8-bit images as a caller of the float path gets them: `fuse` on unit floats, then
  `quantize` of each image on the host (the conversions outside the compiled call)."""
  unit = lambda x: np.asarray(x, np.float32) / np.float32(255)  # noqa: E731
  fused = np.asarray(fusion.fuse(params, unit(ir), unit(vis)))
  return [fusion.quantize(image[..., 0]) for image in fused]


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser("infer", help="fusion time per image")
  parser.add_argument("--height", type=int, default=480)
  parser.add_argument("--width", type=int, default=640)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--model", choices=sorted(networks.MODELS), default="student")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--levels", type=int, choices=(8,), default=None,
                      help="time the 8-bit path (fuse_levels, uint8 in and out) instead")
  parser.add_argument("--engine", choices=ENGINES, default="jax",
                      help="jax: fusion.fuse; stablehlo/onnxruntime: the exported file")
  parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
  """Median time of `fuse` or an exported file (work finished) per image, after warm-up.

  Random weights and images: the cost does not depend on their values.
  """
  params = jax.device_put(networks.init_params(args.model, jax.random.key(0)))
  rng = np.random.default_rng(0)
  shape = (args.batch, args.height, args.width, 1)
  ir = jax.device_put(rng.random(shape, dtype=np.float32))
  vis = jax.device_put(rng.random(shape, dtype=np.float32))
  engine = getattr(args, "engine", "jax")
  levels = getattr(args, "levels", None)
  extra: dict[str, int | float | str] = {}
  if levels and engine != "jax":
    raise SystemExit("error: --levels 8 times the JAX path; drop --engine")
  if levels:
    ir = jax.device_put(np.asarray(ir * 255, np.uint8))
    vis = jax.device_put(np.asarray(vis * 255, np.uint8))
    fn = lambda: fusion.fuse_levels(params, ir, vis)  # noqa: E731
    host = common.time_call(lambda: _float_then_host_quantize(params, ir, vis),
                            repeats=args.repeats)
    extra["float_then_host_quantize_ms_per_image"] = 1e3 * host["median_s"] / args.batch
  elif engine == "jax":
    fn = lambda: fusion.fuse(params, ir, vis)  # noqa: E731
  else:
    from mmdrfuse_jax.inference import export  # pylint: disable=g-import-not-at-top

    fmt = "stablehlo" if engine == "stablehlo" else "onnx"
    data = export.export_bytes(params, fmt)
    extra["file_bytes"] = len(data)
    if engine == "stablehlo":
      call = jax.jit(jax.export.deserialize(bytearray(data)).call)
      fn = lambda: call(ir, vis)  # noqa: E731
    else:
      import onnxruntime  # pylint: disable=g-import-not-at-top

      runner = export.load_runner(fmt, data)
      ir_host, vis_host = np.asarray(ir), np.asarray(vis)
      fn = lambda: runner(ir_host, vis_host)  # noqa: E731
      extra["device"] = (f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider, "
                         f"{common.device_description()}")
  timing = common.time_call(fn, repeats=args.repeats)
  if engine == "jax":
    # What the compiled fusion holds on the device: inputs, output and XLA's scratch.
    compiled = fusion.fuse_levels if levels else fusion.fuse
    memory = compiled.lower(params, ir, vis).compile().memory_analysis()
    if memory is not None:
      held = (memory.argument_size_in_bytes + memory.output_size_in_bytes
              + memory.temp_size_in_bytes)
      extra["device_bytes_per_image"] = held // args.batch
      extra["temp_bytes_per_image"] = memory.temp_size_in_bytes // args.batch
    bound = common.time_call(lambda: _same_bytes(ir, vis), repeats=args.repeats)
    extra["bound_ms_per_image"] = 1e3 * bound["median_s"] / args.batch
    extra["bound_bytes_per_image"] = 3 * args.height * args.width * ir.dtype.itemsize
    extra["times_the_bound"] = timing["median_s"] / bound["median_s"]
  return {
      "benchmark": "infer",
      "engine": engine,
      "levels": levels or "float32",
      "model": args.model,
      "height": args.height,
      "width": args.width,
      "batch": args.batch,
      "ms_per_image": 1e3 * timing["median_s"] / args.batch,
      "ms_per_image_min": 1e3 * timing["min_s"] / args.batch,
      "images_per_second": args.batch / timing["median_s"],
      "runs": timing["runs"],
      **extra,
  }
