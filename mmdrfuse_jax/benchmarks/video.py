"""`bench.py video`: frames per second of video fusion (`bin/fuse_video.py`) at a given size.

Writes a procedural clip pair to a temporary folder (one `data.synthetic` scene, infrared gray
and visible colour, panned by two pixels a frame; H.264, yuv420p, crf 18, as a camera would
store it), then times three runs of the same frames, each after a warm-up run that compiles:

- `decode`: decoding the two videos into frame arrays (`video_codecs.decoded_batches`);
- `fuse`: decoding and fusing, the fused frames dropped (`video.fuse_frames`);
- `encode`: the whole of `video.fuse_videos`: decoding, fusing, encoding (`--codec`, `--crf`,
  `--preset`) and writing the file.

Each figure is frames per second over the whole clip, the median of the runs; the fused frames
are NumPy arrays, so the device's work is finished when a run ends.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import jax
import numpy as np

from mmdrfuse_jax.benchmarks import common
from mmdrfuse_jax.data import synthetic
from mmdrfuse_jax.inference import fusion, video_codecs
from mmdrfuse_jax.inference import video as video_fusion
from mmdrfuse_jax.models import networks

STAGES = ("decode", "fuse", "encode")


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser("video", help="video fusion, frames per second")
  parser.add_argument("--height", type=int, default=480)
  parser.add_argument("--width", type=int, default=640)
  parser.add_argument("--frames", type=int, default=48, help="frames in the clip pair")
  parser.add_argument("--batch", type=int,
                      help="frames per network call (default: as bin/fuse_video.py)")
  parser.add_argument("--model", choices=sorted(networks.MODELS), default="student")
  parser.add_argument("--color", action="store_true", help="colour fusion (as fuse_video.py)")
  parser.add_argument("--codec", default=video_codecs.DEFAULT_CODEC)
  parser.add_argument("--crf", type=int, default=video_codecs.DEFAULT_CRF)
  parser.add_argument("--preset", default="", help="libx264 speed preset (default: medium)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.set_defaults(run=run)


def write_clip_pair(folder: pathlib.Path, frames: int, height: int,
                    width: int) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes `folder/ir.mp4` and `folder/vis.mp4`: one procedural scene panned 2 pixels a frame."""
  av = video_codecs.import_av()
  ir, vis = synthetic.make_pairs(1, height, width, seed=0, color=True)
  paths = (folder / "ir.mp4", folder / "vis.mp4")
  for path, scene in zip(paths, (ir[0], vis[0])):
    with av.open(str(path), "w") as container:
      stream = container.add_stream("libx264", rate=25)
      stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
      stream.options = {"crf": "18", "preset": "veryfast"}
      for index in range(frames):
        image = np.ascontiguousarray(np.roll(scene, 2 * index, axis=1))
        frame = av.VideoFrame.from_ndarray(image, format="gray" if image.ndim == 2 else "rgb24")
        frame.pts = index
        container.mux(stream.encode(frame))
      container.mux(stream.encode(None))
  return paths


def run(args: argparse.Namespace) -> dict:
  """Frames per second of each stage (see the module's docstring), random weights.

  The cost does not depend on the weights' values.
  """
  params = jax.device_put(networks.init_params(args.model, jax.random.key(0)))
  batch = args.batch or video_fusion.default_batch()
  fuser = fusion.Fuser(params, color=args.color, bucket=0)
  encoding = video_codecs.Encoding(codec=args.codec, crf=args.crf, preset=args.preset)
  with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
    folder = pathlib.Path(tmp)
    ir, vis = write_clip_pair(folder, args.frames, args.height, args.width)
    plan = video_codecs.plan(video_codecs.probe(ir), video_codecs.probe(vis))
    out = folder / "fused.mp4"
    pixel_format = video_codecs.check_encoding(out, encoding, plan, args.color)
    runs = {
        "decode": lambda: sum(len(irs) for irs, _ in
                              video_codecs.decoded_batches(plan, batch)),
        "fuse": lambda: video_fusion.fuse_frames(fuser, plan, lambda images: None,
                                                 batch=batch),
        "encode": lambda: video_fusion.fuse_videos(fuser, plan, out, encoding=encoding,
                                                   batch=batch, progress=False),
    }
    timings = {stage: common.time_call(runs[stage], repeats=args.repeats, warmup=1)
               for stage in STAGES}
    out_bytes = out.stat().st_size
  result = {
      "benchmark": "video",
      "model": args.model,
      "height": args.height,
      "width": args.width,
      "frames": args.frames,
      "batch": batch,
      "color": args.color,
      "codec": args.codec,
      "crf": args.crf,
      "preset": args.preset or "default",
      "pixel_format": pixel_format,
      "output_bytes": out_bytes,
      "runs": args.repeats,
  }
  for stage in STAGES:
    result[f"fps_{stage}"] = args.frames / timings[stage]["median_s"]
  return result
