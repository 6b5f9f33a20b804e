"""Fusing videos frame by frame, and folders of frames: the library behind `bin/fuse_video.py`.

Two videos, read with PyAV (the Python binding of FFmpeg, the `video` extra), are fused frame
by frame into a video; two folders of frames, paired by stem as `bin/fuse.py` pairs them, into
a folder of `<stem>.png`. Every frame is fused by `fusion.Fuser.fuse_batch`, several at a
time, with exactly the result `bin/fuse.py` gives for that frame. One thread decodes (or
reads) the next frames and another encodes (or writes) the fused ones while the network runs,
so decoding, fusing and encoding overlap.

Two videos are checked before anything is written (`probe`, `plan`; see `video_codecs`, where
they, the decoding and the encoding live; `video_threads` holds the reader and writer threads).
The output video is written under a temporary name in its folder and renamed once complete
(`files.atomic_write`): an error or a stop (`interrupts.Interrupted`) leaves no file, and the
temporary file of a run that was killed (SIGKILL, power loss) is removed by the next run to the
same output.

The threads stop within a batch of a stop, and the decoders are freed only after the reader
thread has ended, in the caller's thread, with FFmpeg's own decoding threads idle
(`video_codecs.Decoders.close` says why: otherwise a stop could freeze the process for good).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Any, Callable, Iterable, Iterator, Optional

import jax
import numpy as np
import tqdm

from mmdrfuse_jax.inference import batch_fuse, fusion, video_codecs, video_threads
from mmdrfuse_jax.inference.video_codecs import plan as plan  # docs/video.md: `video.plan`
from mmdrfuse_jax.inference.video_codecs import probe as probe  # docs/video.md: `video.probe`
from mmdrfuse_jax.io import files, imageio
from mmdrfuse_jax.runtime import interrupts

# Frames per network call unless told: 1 on a CPU, where batches of 2, 4 and 8 were no faster
# per frame (the student is bound by memory traffic there), 8 on accelerators, so that the device
# does not wait on one call per frame (not yet measured).
CPU_BATCH, ACCELERATOR_BATCH = 1, 8


def default_batch() -> int:
  """Frames per network call for jax's default backend (`CPU_BATCH`, `ACCELERATOR_BATCH`)."""
  return CPU_BATCH if jax.default_backend() == "cpu" else ACCELERATOR_BATCH


def fuse_frames(fuser: fusion.Fuser, plan_: video_codecs.Plan,
                handle: Callable[[list[np.ndarray]], None], *, batch: Optional[int] = None,
                stop: Optional[interrupts.StopRequest] = None) -> None:
  """Decodes the frame pairs of `plan_`, fuses them and hands the results to `handle`.

  Decoding (`video_codecs.decoded_batches`) and `handle` run in threads of their own, two
  batches ahead of and behind the fusion, so the three overlap. Both threads have ended when
  this returns or raises (within a batch of a stop); the decoders are opened and freed in the
  calling thread.

  Args:
    fuser: the configured fusion.
    plan_: from `plan`.
    handle: called with each batch of fused images, in order (in its own thread).
    batch: frames fused per network call (a short last batch is padded to it, so that the
      network compiles once); None: `default_batch()`.
    stop: checked between batches; once its `signum` is set, `interrupts.Interrupted` is
      raised.

  Raises:
    video_codecs.VideoError: a video could not be decoded to the end, or its frames are too
      small.
    interrupts.Interrupted: `stop` was set.
    Whatever `handle` raised.
  """
  batch = batch or default_batch()
  # Opened and freed in this thread, after the reader thread has ended
  # (`video_codecs.Decoders.close`).
  with video_codecs.Decoders(plan_) as decoders:
    reader = video_threads.Ahead(video_codecs.decoded_batches(plan_, batch, decoders), depth=2)
    writer = video_threads.Behind(handle, depth=2)
    try:
      for irs, viss in reader:
        if stop is not None and stop.signum is not None:
          raise interrupts.Interrupted(stop.signum)
        try:
          fused = fuser.fuse_batch(irs, viss, batch_size=batch)
        except ValueError as e:  # Frames too small for the network.
          raise video_codecs.VideoError(f"{plan_.ir.path}: {e}") from None
        writer.put(fused)
      writer.finish()
    finally:
      try:
        reader.close()
      finally:  # The encoder thread too, even if a second signal interrupted the above.
        writer.close()


def fuse_videos(fuser: fusion.Fuser, plan_: video_codecs.Plan, out: str | os.PathLike, *,
                encoding: video_codecs.Encoding = video_codecs.Encoding(),
                batch: Optional[int] = None, progress: bool = True,
                stop: Optional[interrupts.StopRequest] = None) -> int:
  """Fuses the two videos of `plan_` frame by frame into the video file `out`.

  The output has the infrared video's size and frame rate. Run `video_codecs.check_output`
  and `video_codecs.check_encoding` first. Temporary files that killed runs left for `out` are
  removed (`video_codecs.remove_stale_temporaries`).

  Args:
    fuser: the configured fusion (bucket 0 suits videos: one size, one compilation).
    plan_: from `plan`.
    out: the video to write; its extension picks the container (`video_codecs.CONTAINERS`).
    encoding: codec, quality and pixel format.
    batch: frames fused per network call (see `fuse_frames`).
    progress: show a progress bar (frames encoded, frames per second).
    stop: checked between batches; once its `signum` is set, `interrupts.Interrupted` is
      raised and nothing is written.

  Returns:
    The number of frames written.

  Raises:
    video_codecs.VideoError: a video could not be decoded to the end or `out` could not be
      written (no file is left at `out`, nor any temporary one).
    interrupts.Interrupted: `stop` was set.
  """
  av = video_codecs.import_av()
  out = pathlib.Path(out)
  array_format = video_codecs.fused_array_format(plan_, fuser.color)
  time_base = 1 / plan_.ir.rate
  video_codecs.remove_stale_temporaries(out)
  bar = tqdm.tqdm(total=plan_.frames, unit="frame", disable=not progress, dynamic_ncols=True)
  written = 0
  try:
    with files.atomic_write(out) as f:
      video_codecs.hold_while_written(f)
      container = av.open(f, "w", format=video_codecs.container_format(out))
      try:
        stream = video_codecs.add_stream(container, encoding, array_format, plan_)

        def encode(images: list[np.ndarray]) -> None:
          nonlocal written
          for image in images:
            frame = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(image),
                format=video_codecs.ARRAY_FORMATS[image.ndim, image.dtype])
            frame.pts, frame.time_base = written, time_base
            container.mux(stream.encode(frame))
            written += 1
            bar.update(1)

        fuse_frames(fuser, plan_, encode, batch=batch, stop=stop)
        container.mux(stream.encode(None))  # what the encoder still holds
        container.close()
      except BaseException:
        with contextlib.suppress(Exception):
          container.close()
        raise
  except (av.error.FFmpegError, OSError) as e:
    raise video_codecs.VideoError(
        f"{out}: cannot write the video ({video_codecs.error_cause(e)})") from None
  finally:
    bar.close()
  return written


# ---------------------------------------------------------------------------------------------
# Folders of frames.


def _network_batch(pairs: int, batch: int) -> int:
  """Pairs a network call runs on: the next power of two, at most `batch` (few compilations)."""
  return min(batch, 1 << max(0, pairs - 1).bit_length())


def _read_groups(pairs: batch_fuse.Pairs, batch: int, resize: bool) -> Iterator[Any]:
  """Reads the pairs (reader thread): a one-line problem (str) for each pair that cannot be
  fused, else lists of up to `batch` consecutive pairs of one size, (stem, ir path, ir, vis)."""
  group: list = []
  for stem, (ir_path, vis_path) in pairs:
    try:
      ir, vis = imageio.read_image(ir_path), imageio.read_image(vis_path)
      if resize and ir.shape[:2] != vis.shape[:2]:
        vis = video_codecs.resize_image(vis, *ir.shape[:2])
      imageio.check_same_size((ir_path, vis_path), (ir, vis), batch_fuse.ROLES)
    except imageio.ImageError as e:
      yield str(e)
      continue
    if group and (len(group) == batch or group[0][2].shape[:2] != ir.shape[:2]):
      yield group
      group = []
    group.append((stem, ir_path, ir, vis))
  if group:
    yield group


def fuse_frame_folders(fuser: fusion.Fuser, pairs: batch_fuse.Pairs,
                       out_dir: str | os.PathLike, *, batch: Optional[int] = None,
                       resize: bool = False, progress: bool = True,
                       report: Callable[[str], None] = print,
                       stop: Optional[interrupts.StopRequest] = None) -> batch_fuse.BatchResult:
  """Fuses frame pairs (stem, (ir_path, vis_path)) into `out_dir/<stem>.png`, in batches.

  As `batch_fuse.fuse_pairs` (the same images, problems and stop), with the reading, fusing and
  writing overlapped and consecutive frames of one size fused `batch` at a time (None:
  `default_batch()`; a short batch runs at the next power of two, so a folder of one size
  compiles a few programs at most); `resize` scales a visible frame of another size to its
  infrared frame's size.
  """
  batch = batch or default_batch()
  result = batch_fuse.BatchResult()
  bar = tqdm.tqdm(total=len(pairs), unit="frame", disable=not progress or len(pairs) < 2,
                  dynamic_ncols=True)

  def problem(message: str) -> None:
    result.problems.append(message)
    with bar.external_write_mode():
      report(message)

  def write(fused: Iterable[tuple[str, np.ndarray]]) -> None:
    for stem, image in fused:
      try:
        batch_fuse.write_output(batch_fuse.output_path(out_dir, stem), image)
        result.written += 1
      except imageio.ImageError as e:
        problem(str(e))
      bar.update(1)

  reader = video_threads.Ahead(_read_groups(pairs, batch, resize), depth=2)
  writer = video_threads.Behind(write, depth=2)
  started = 0
  try:
    for entry in reader:
      if stop is not None and stop.signum is not None:
        result.not_started = len(pairs) - started
        break
      if isinstance(entry, str):
        started += 1
        problem(entry)
        bar.update(1)
        continue
      started += len(entry)
      stems, ir_paths, irs, viss = zip(*entry)
      try:
        fused = fuser.fuse_batch(irs, viss, batch_size=_network_batch(len(entry), batch))
      except ValueError as e:  # Images too small for the network (one size: all of them).
        for ir_path in ir_paths:
          problem(f"{ir_path}: {e}")
        bar.update(len(entry))
        continue
      writer.put(list(zip(stems, fused)))
    writer.finish()
  finally:
    reader.close()
    writer.close()
    bar.close()
  return result
