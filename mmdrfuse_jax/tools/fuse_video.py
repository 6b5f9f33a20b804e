"""Fuses two videos frame by frame, or two folders of frames, with MMDRFuse weights.

  python bin/fuse_video.py --weights student.model --ir ir.mp4 --vis vis.mp4 --out fused.mp4
  python bin/fuse_video.py --weights student.model --ir IR_DIR --vis VIS_DIR --out OUT_DIR

Two videos (read with PyAV: pip install 'mmdrfuse-jax[video]') give a video of the infrared
one's size and frame rate, its container from --out's extension (.mp4, .mkv, .mov, .avi,
.webm, .nut), encoded with --codec and --crf. Two folders of frames, paired by file stem as in
bin/fuse.py, give OUT_DIR/<stem>.png. Frames are fused --batch at a time while the next ones
are decoded and the previous ones encoded.

Two videos must agree in frame count, size and frame rate; otherwise one line says how they
differ and nothing is written (exit 1). --frame_count shorter fuses only as many frames as the
shorter video has; --resize scales the visible frames to the infrared size. The video is
written under a temporary name and renamed once complete: a failure (exit 1) or SIGINT/SIGTERM
(exit 130/143, within a batch) leaves no file, and the temporary file of a run killed with
SIGKILL is removed by the next run to the same --out. Frame folders behave as in bin/fuse.py:
each problem is one `skipped:` line, the other frames are fused, and the exit code is 1;
SIGINT/SIGTERM stop after the current batch (the images written stay). Exit 2: nothing could
start (unusable weights, inputs, options or --out).
"""

import argparse
import pathlib
import sys

from mmdrfuse_jax.inference import batch_fuse, fusion, video, video_codecs
from mmdrfuse_jax.io import files, imageio
from mmdrfuse_jax.models import weight_files
from mmdrfuse_jax.runtime import backend, cli, interrupts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_weights_arguments(parser)
  parser.add_argument("--ir", required=True,
                      help="infrared (or PET/SPECT/CT) video, or folder of frames")
  parser.add_argument("--vis", required=True, help="visible (or MRI) video, or folder of frames")
  parser.add_argument("--out", required=True,
                      help="output video (two videos) or folder (two folders of frames)")
  cli.add_output_arguments(parser, "frame")
  parser.add_argument("--codec", default=video_codecs.DEFAULT_CODEC,
                      help="FFmpeg video encoder: libx264, libx265, libvpx-vp9, ffv1 (lossless)...")
  parser.add_argument("--crf", type=int, default=video_codecs.DEFAULT_CRF,
                      help=("quality of libx264/libx264rgb/libx265/libvpx-vp9: lower is better "
                            "(libx264rgb: 0 is lossless); other codecs ignore it"))
  parser.add_argument("--preset", default="",
                      help=("libx264/libx265 speed preset (ultrafast ... veryslow); default: the "
                            "codec's (medium); veryfast encodes several times faster"))
  parser.add_argument("--pix_fmt", default="auto",
                      help=("stored pixel format; auto: gray or RGB as fused for lossless codecs "
                            f"({', '.join(video_codecs.EXACT_CODECS)}), else yuv420p"))
  parser.add_argument("--batch", type=int,
                      help=(f"frames fused per network call (default: {video.CPU_BATCH} on a CPU, "
                            f"{video.ACCELERATOR_BATCH} on a GPU or TPU)"))
  parser.add_argument("--frame_count", choices=video_codecs.FRAME_COUNT_MODES, default="error",
                      help="videos of different lengths: error, or fuse as many as the shorter has")
  parser.add_argument("--resize", action="store_true",
                      help="frames of different sizes: resize the visible ones (bicubic)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  return cli.run_until_stopped(_run, args, at_once="no file is half-written")


def _run(args: argparse.Namespace, stop: interrupts.StopRequest) -> int:
  if args.batch is not None and args.batch < 1:
    print(f"error: --batch must be at least 1, got {args.batch}", file=sys.stderr)
    return 2
  try:
    params = weight_files.load_params(args.weights, args.model)
    pairing = imageio.pair_inputs([args.ir, args.vis])
  except (weight_files.WeightsError, imageio.ImageError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if pathlib.Path(args.ir).is_dir():
    return _frame_folders(args, params, pairing, stop)
  return _videos(args, params, stop)


def _videos(args: argparse.Namespace, params, stop: interrupts.StopRequest) -> int:
  out = pathlib.Path(args.out)
  try:
    ir, vis = video_codecs.probe(args.ir), video_codecs.probe(args.vis)
  except video_codecs.VideoError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    plan = video_codecs.plan(ir, vis, frame_count=args.frame_count, resize=args.resize)
  except video_codecs.MismatchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  encoding = video_codecs.Encoding(codec=args.codec, crf=args.crf, pixel_format=args.pix_fmt,
                                   preset=args.preset)
  try:
    created = video_codecs.check_output(out, [("infrared input video (--ir)", ir.path),
                                              ("visible input video (--vis)", vis.path)])
  except files.OutputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    try:
      pixel_format = video_codecs.check_encoding(out, encoding, plan, args.color)
    except video_codecs.VideoError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    backend.report(backend.stderr_log)  # what jax runs on, once the run will fuse
    fuser = fusion.Fuser(params, output=args.output, color=args.color, bucket=0)
    try:
      frames = video.fuse_videos(fuser, plan, out, encoding=encoding, batch=args.batch,
                                 progress=not args.no_progress, stop=stop)
    except video_codecs.VideoError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    except interrupts.Interrupted as e:  # The video is written atomically: nothing is left.
      print(f"stopped by {interrupts.signal_name(e.signum)}: {out} not written",
            file=sys.stderr)
      return interrupts.exit_code(e.signum)
  finally:
    files.remove_created_folders(created)  # only where nothing was written
  shorter = (f"; the first {frames} frames (infrared has {ir.frames}, visible {vis.frames})"
             if ir.frames != vis.frames else "")
  print(f"fused {frames} frame(s) into {out} ({args.codec}, {pixel_format}, "
        f"{video_codecs.format_rate(ir.rate)} fps){shorter}")
  return 0


def _frame_folders(args: argparse.Namespace, params, pairing: imageio.PairingResult,
                   stop: interrupts.StopRequest) -> int:
  try:
    inputs = batch_fuse.input_paths([args.ir, args.vis], pairing.pairs)
    created = batch_fuse.check_output(args.out, [stem for stem, _ in pairing.pairs], inputs)
  except files.OutputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if pairing.pairs:
    backend.report(backend.stderr_log)
  try:
    for problem in pairing.problems:
      print(f"skipped: {problem}", file=sys.stderr)
    fuser = fusion.Fuser(params, output=args.output, color=args.color)
    result = video.fuse_frame_folders(
        fuser, pairing.pairs, args.out, batch=args.batch, resize=args.resize,
        progress=not args.no_progress, stop=stop,
        report=lambda message: print(f"skipped: {message}", file=sys.stderr))
  finally:
    files.remove_created_folders(created)
  return cli.finish_folder_fusion(result, len(pairing.problems), args.out, stop)


if __name__ == "__main__":
  sys.exit(main())
