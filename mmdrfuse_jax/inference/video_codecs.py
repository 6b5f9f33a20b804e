"""Reading, checking and writing videos with PyAV: the codec side of `video`'s fusion.

PyAV, the Python binding of FFmpeg (the `video` extra), is imported on first use
(`import_av`). Frames are decoded as `imageio.read_image` reads images (`Decoders`,
`decoded_batches`) and the fused ones are handed to the encoder as `ARRAY_FORMATS` says;
`resize_image` scales a visible frame to the infrared size.

Two videos are checked before anything is written (`probe`, `plan`): their frame counts,
sizes and frame rates must agree, and `MismatchError` says in one line how they differ, naming
both files and their values. `frame_count="shorter"` fuses only as many frames as the shorter
video has; `resize=True` scales the visible frames to the infrared size (PIL bicubic). Frame
rates must always agree: frames are paired by position, so two rates would drift apart.
The output is checked too (`check_output`, `check_encoding`: the encoder is opened in memory),
and the temporary files that killed runs left for it are removed (`remove_stale_temporaries`).

The decoders are freed only after the reader thread has ended, in the caller's thread, with
FFmpeg's own decoding threads idle (`Decoders.close` says why: otherwise a stop could freeze
the process for good).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fractions
import glob
import io
import logging
import os
import pathlib
import re
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from mmdrfuse_jax.errors import MMDRFuseError
from mmdrfuse_jax.io import files, imageio

try:
  import fcntl
except ImportError:  # Windows: a file open in another process cannot be removed there anyway.
  fcntl = None  # type: ignore[assignment]

INSTALL_HINT = "pip install 'mmdrfuse-jax[video]' (or pip install av)"
# Output containers by file extension (FFmpeg's muxer names).
CONTAINERS = {".mkv": "matroska", ".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".avi": "avi",
              ".webm": "webm", ".nut": "nut"}
FRAME_COUNT_MODES = ("error", "shorter")
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                "veryslow", "placebo")
DEFAULT_CODEC = "libx264"
DEFAULT_CRF = 18
# Codecs meant to store pixels as they are: the "auto" pixel format keeps gray or RGB for them
# (lossless with ffv1, png, rawvideo, or libx264rgb at --crf 0). Other codecs get yuv420p,
# which every player plays.
EXACT_CODECS = ("ffv1", "ffvhuff", "huffyuv", "libx264rgb", "png", "qtrle", "rawvideo",
                "utvideo")
# What the fused images are handed to the encoder as, by (ndim, dtype), and the pixel formats
# that store each exactly, best first.
ARRAY_FORMATS = {(2, np.dtype(np.uint8)): "gray", (2, np.dtype(np.uint16)): "gray16le",
                 (3, np.dtype(np.uint8)): "rgb24", (3, np.dtype(np.uint16)): "rgb48le"}
_RGB8 = ("rgb24", "bgr24", "bgr0", "rgb0", "gbrp")
_EXACT_PIXEL_FORMATS = {
    "gray": ("gray", *_RGB8),
    "gray16le": ("gray16le", "gray16be", "rgb48le", "rgb48be", "gbrp16le", "gray", *_RGB8),
    "rgb24": _RGB8,
    "rgb48le": ("rgb48le", "rgb48be", "gbrp16le", *_RGB8),
}
# How frames are decoded, by (gray, more than 8 bits): what `imageio.read_image` gives for images.
_DECODED_FORMATS = {(True, False): "gray", (True, True): "gray16le", (False, False): "rgb24",
                    (False, True): "rgb48le"}
# Pixel formats with chroma at half the height and width (they need even sizes).
_HALF_CHROMA_FORMATS = ("yuv420", "yuvj420", "yuva420", "nv12", "nv21")


class VideoError(MMDRFuseError, ValueError):
  """A video cannot be read or written (or PyAV is missing); the message says why in one line."""


class MismatchError(VideoError):
  """The two videos differ in frame count, size or frame rate; the message names both."""


def import_av():
  """PyAV (its FFmpeg messages put into its errors), or a VideoError saying how to install it."""
  try:
    import av  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise VideoError(f"reading and writing videos needs PyAV: {INSTALL_HINT}") from None
  if av.logging.get_level() is None:  # Unless the caller chose: FFmpeg's errors join the
    av.logging.set_level(av.logging.ERROR)  # exceptions (their `log`), not the terminal.
    logger = logging.getLogger("libav")
    if not logger.handlers:
      logger.addHandler(logging.NullHandler())
      logger.propagate = False
  return av


def error_cause(error: BaseException) -> str:
  """An FFmpeg or OS error's cause in a few words, with FFmpeg's own message if it logged one."""
  if isinstance(error, OSError) and not type(error).__module__.startswith("av"):
    return files.os_error_cause(error)  # Python's own, writing the file
  cause = getattr(error, "strerror", None) or str(error) or type(error).__name__
  log = getattr(error, "log", None)
  if log and str(log[-1]).strip():
    cause += f": {str(log[-1]).strip().rstrip('.')}"
  return cause


def format_rate(rate: fractions.Fraction) -> str:
  """A frame rate as people write it: "25", or "30000/1001 (29.97)"."""
  return f"{rate.numerator}" if rate.denominator == 1 else f"{rate} ({float(rate):.5g})"


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """What `probe` found in a video file.

  Attributes:
    path: the file.
    frames: number of frames (from the container, or by counting its packets).
    width, height: frame size in pixels.
    rate: frames per second.
    array_format: how frames are decoded: "gray" or "gray16le" for gray streams (8 bits, more
      than 8), "rgb24" or "rgb48le" for colour ones.
  """

  path: pathlib.Path
  frames: int
  width: int
  height: int
  rate: fractions.Fraction
  array_format: str


def probe(path: str | os.PathLike) -> VideoInfo:
  """Reads a video's frame count, size, frame rate and pixel kind, without decoding it.

  Raises:
    VideoError: the file is missing, not a video, or has no video stream, frames or frame rate.
  """
  av = import_av()
  path = pathlib.Path(path)
  if not path.is_file():
    raise VideoError(f"{path}: no such file")
  try:
    with av.open(str(path)) as container:
      if not container.streams.video:
        raise VideoError(f"{path}: holds no video stream")
      stream = container.streams.video[0]
      pixels = stream.codec_context.format
      rate = stream.average_rate or stream.guessed_rate
      if pixels is None or not rate:
        raise VideoError(f"{path}: cannot tell the video's "
                         f"{'pixel format' if pixels is None else 'frame rate'}")
      frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
      if not frames:
        raise VideoError(f"{path}: the video holds no frames")
      gray = pixels.name.startswith(("gray", "ya", "mono"))
      deep = max(c.bits for c in pixels.components) > 8
      return VideoInfo(path=path, frames=frames, width=stream.codec_context.width,
                       height=stream.codec_context.height, rate=fractions.Fraction(rate),
                       array_format=_DECODED_FORMATS[gray, deep])
  except av.error.FFmpegError as e:
    raise VideoError(f"{path}: cannot read video ({error_cause(e)})") from None


@dataclasses.dataclass(frozen=True)
class Plan:
  """Two videos to fuse: `frames` frame pairs, visible frames resized when `resize`."""

  ir: VideoInfo
  vis: VideoInfo
  frames: int
  resize: bool


def plan(ir: VideoInfo, vis: VideoInfo, *, frame_count: str = "error",
         resize: bool = False) -> Plan:
  """Checks that two videos can be fused frame by frame.

  Args:
    ir, vis: from `probe`.
    frame_count: "error": the frame counts must be equal; "shorter": fuse as many frames as
      the shorter video has.
    resize: allow frames of different sizes: the visible ones are resized to the infrared size.

  Raises:
    MismatchError: one line naming the two files and every difference not allowed.
  """
  if frame_count not in FRAME_COUNT_MODES:
    raise ValueError(f"frame_count must be one of {FRAME_COUNT_MODES}, got {frame_count!r}")
  differences = []
  if ir.rate != vis.rate:
    differences.append(f"infrared runs at {format_rate(ir.rate)} fps, visible at "
                       f"{format_rate(vis.rate)} fps (frames are paired by position: convert one "
                       "video to the other's rate)")
  if (ir.width, ir.height) != (vis.width, vis.height) and not resize:
    differences.append(f"infrared is {ir.width}x{ir.height}, visible is "
                       f"{vis.width}x{vis.height} (--resize scales the visible frames to "
                       f"{ir.width}x{ir.height})")
  if ir.frames != vis.frames and frame_count == "error":
    differences.append(f"infrared has {ir.frames} frames, visible has {vis.frames} "
                       f"(--frame_count shorter fuses the first {min(ir.frames, vis.frames)})")
  if differences:
    raise MismatchError(f"videos {ir.path} and {vis.path} do not match: "
                        + "; ".join(differences))
  return Plan(ir=ir, vis=vis, frames=min(ir.frames, vis.frames),
              resize=(ir.width, ir.height) != (vis.width, vis.height))


@dataclasses.dataclass(frozen=True)
class Encoding:
  """How the fused video is encoded.

  Attributes:
    codec: an FFmpeg encoder (libx264, libx265, libvpx-vp9, ffv1, libx264rgb, ...).
    crf: constant rate factor, for the codecs that have one (libx264, libx264rgb, libx265,
      libvpx-vp9: lower is better; 0 is lossless for libx264rgb); the others ignore it.
    pixel_format: an FFmpeg pixel format, or "auto": for the codecs of `EXACT_CODECS` gray or
      RGB as fused (exact), else yuv420p.
    preset: the speed preset of libx264/libx264rgb/libx265 (ultrafast ... veryslow; "" for
      the codec's default, medium); other codecs ignore it.
  """

  codec: str = DEFAULT_CODEC
  crf: int = DEFAULT_CRF
  pixel_format: str = "auto"
  preset: str = ""


def fused_array_format(plan_: Plan, color: bool) -> str:
  """The array format of the fused frames `fusion.Fuser(color=color)` gives for `plan_`."""
  formats = (plan_.ir.array_format, plan_.vis.array_format)
  rgb = color and any(f.startswith("rgb") for f in formats)
  deep = any(f in ("gray16le", "rgb48le") for f in formats)
  return ("rgb48le" if deep else "rgb24") if rgb else ("gray16le" if deep else "gray")


def pixel_format(encoding: Encoding, array_format: str) -> str:
  """The pixel format the video is stored in (see `Encoding.pixel_format`).

  Raises:
    VideoError: the codec is unknown or cannot encode video.
  """
  if encoding.pixel_format != "auto":
    return encoding.pixel_format
  av = import_av()
  try:
    codec = av.Codec(encoding.codec, "w")
  except (av.error.FFmpegError, ValueError) as e:
    raise VideoError(f"--codec {encoding.codec}: no such encoder ({error_cause(e)})") from None
  if codec.type != "video":
    raise VideoError(f"--codec {encoding.codec}: is not a video encoder")
  supported = [f.name for f in codec.video_formats or ()]
  if not supported:  # rawvideo and the like take any format.
    return array_format
  if encoding.codec in EXACT_CODECS:
    for name in _EXACT_PIXEL_FORMATS[array_format]:
      if name in supported:
        return name
  return "yuv420p" if "yuv420p" in supported else supported[0]


def container_format(out: str | os.PathLike) -> str:
  """FFmpeg's muxer for the output file's extension.

  Raises:
    files.OutputError: an extension not in `CONTAINERS`.
  """
  suffix = pathlib.Path(out).suffix.lower()
  if suffix not in CONTAINERS:
    raise files.OutputError(f"--out {out}: unknown video extension {suffix!r}; use one of "
                            f"{', '.join(CONTAINERS)}")
  return CONTAINERS[suffix]


def check_output(out: str | os.PathLike,
                 inputs: Sequence[tuple[str, pathlib.Path]]) -> list[pathlib.Path]:
  """Checks, before any work, that the video `out` can be written.

  Refuses a folder, an unknown extension and an `out` that is one of `inputs`, then makes sure
  its folder exists and is writable (creating it if needed).

  Returns:
    The folders created (for `files.remove_created_folders`).

  Raises:
    files.OutputError: one line naming the path and the problem.
  """
  out = pathlib.Path(out)
  if out.is_dir():
    raise files.OutputError(f"--out {out}: is a folder; two videos give a video file")
  container_format(out)
  return files.check_output_file(out, inputs, "--out")


def add_stream(container, encoding: Encoding, array_format: str, plan_: Plan):
  """Adds the fused video's stream to `container`: the infrared size and frame rate, `encoding`."""
  stream = container.add_stream(encoding.codec, rate=plan_.ir.rate)
  stream.width, stream.height = plan_.ir.width, plan_.ir.height
  stream.pix_fmt = pixel_format(encoding, array_format)
  stream.options = {"crf": str(encoding.crf), **({"preset": encoding.preset}
                                                 if encoding.preset else {})}
  return stream


def check_encoding(out: str | os.PathLike, encoding: Encoding, plan_: Plan, color: bool) -> str:
  """Opens the encoder in memory as `video.fuse_videos` will: bad options fail before work.

  Returns:
    The pixel format the video will be stored in.

  Raises:
    VideoError: one line: the codec is unknown, or cannot take this pixel format, size or
      container.
  """
  av = import_av()
  if (encoding.preset and encoding.codec in ("libx264", "libx264rgb", "libx265")
      and encoding.preset not in X264_PRESETS):  # x264 would print to the terminal itself
    raise VideoError(f"--preset {encoding.preset}: not a preset of {encoding.codec}; use one of "
                     f"{', '.join(X264_PRESETS)}")
  array_format = fused_array_format(plan_, color)
  fmt = pixel_format(encoding, array_format)
  try:
    with av.open(io.BytesIO(), "w", format=container_format(out)) as container:
      add_stream(container, encoding, array_format, plan_)
      container.start_encoding()
  except (av.error.FFmpegError, ValueError, TypeError) as e:
    cause = error_cause(e)
    if "divisible" in cause and fmt.startswith(_HALF_CHROMA_FORMATS):
      cause += f"; {fmt} needs an even width and height: --pix_fmt yuv444p or gray do not"
    raise VideoError(f"--codec {encoding.codec}: cannot encode {plan_.ir.width}x"
                     f"{plan_.ir.height} {fmt} video into {pathlib.Path(out).suffix} "
                     f"({cause})") from None
  return fmt


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """PIL bicubic resize (antialiased when shrinking) of an 8- or 16-bit gray or RGB image."""
  if image.dtype == np.uint8:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))
  planes = image[..., None] if image.ndim == 2 else image
  resized = [np.asarray(Image.fromarray(planes[..., c].astype(np.float32), "F")
                        .resize((width, height), Image.Resampling.BICUBIC))
             for c in range(planes.shape[-1])]
  out = imageio.to_levels(np.stack(resized, axis=-1), imageio.max_value(image))
  return out[..., 0] if image.ndim == 2 else out



# ---------------------------------------------------------------------------------------------
# Decoding.


class Decoders:
  """The two videos of a plan, open for decoding, a frame of each at a time (`next_frames`).

  Frames may be decoded in another thread, but `close` belongs to the thread that opened them,
  once no thread decodes any more (`video.fuse_frames` keeps both in the caller's thread). Also
  a context manager that closes them.

  Raises:
    VideoError: a video cannot be opened.
  """

  def __init__(self, plan_: Plan):
    self._av = av = import_av()
    self._infos = (plan_.ir, plan_.vis)
    self._containers: list = []
    self._streams: list = []
    self._frames: list = []  # PyAV's decoding generators
    try:
      for info in self._infos:
        try:
          container = av.open(str(info.path))
          self._containers.append(container)
          stream = container.streams.video[0]
          stream.thread_type = "AUTO"  # FFmpeg's own decoding threads
          self._streams.append(stream)
          self._frames.append(container.decode(stream))
        except av.error.FFmpegError as e:
          raise VideoError(f"{info.path}: cannot read video ({error_cause(e)})") from None
    except BaseException:
      self.close()
      raise

  def __enter__(self) -> "Decoders":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def next_frames(self, index: int) -> list:
    """The next frame of each video (PyAV frames; None where a video has ended).

    Raises:
      VideoError: a frame cannot be decoded; `index` (from 0) numbers it in the message.
    """
    frames = []
    for info, decoder in zip(self._infos, self._frames):
      try:
        frames.append(next(decoder, None))
      except self._av.error.FFmpegError as e:
        raise VideoError(f"{info.path}: cannot decode frame {index + 1} "
                         f"({error_cause(e)})") from None
    return frames

  def close(self) -> None:
    """Frees the decoders; closing them again does nothing.

    FFmpeg's decoding threads may still be decoding the frames after the last one returned, and
    what they log passes PyAV's log callback, which takes the interpreter lock. PyAV frees a
    decoder holding that lock, and the free waits for those threads: one of them logging then
    waits for the lock for ever, and the process is frozen, deaf to signals (their handlers need
    the lock too). `flush_buffers` waits for the threads with the lock released, so the free
    that follows finds them idle.
    """
    frames, streams, containers = self._frames, self._streams, self._containers
    self._frames, self._streams, self._containers = [], [], []
    for decoder in frames:
      decoder.close()
    for stream in streams:
      stream.codec_context.flush_buffers()
    for container in containers:
      container.close()
    # The last references to the streams go with this frame: their decoders are freed here.


def decoded_batches(plan_: Plan, batch: int,
                    decoders: Optional[Decoders] = None) -> Iterator[tuple[list, list]]:
  """(infrared frames, visible frames) as arrays, `batch` pairs at a time.

  Frames are decoded as `VideoInfo.array_format` says; visible frames of another size are
  resized to the infrared size (`resize_image`).

  Args:
    plan_: from `plan`.
    batch: frame pairs per item.
    decoders: `Decoders(plan_)`, for a caller that iterates in another thread and closes them
      itself once that thread has ended; None: the videos are opened when iteration starts and
      closed when it ends or the generator is closed.

  Raises:
    VideoError: a video cannot be decoded, or has fewer or more frames than its container lists.
  """
  if decoders is None:
    with Decoders(plan_) as own:
      yield from decoded_batches(plan_, batch, own)
    return
  infos = (plan_.ir, plan_.vis)
  irs, viss = [], []
  for index in range(plan_.frames):
    ir_frame, vis_frame = decoders.next_frames(index)
    for info, frame in zip(infos, (ir_frame, vis_frame)):
      if frame is None:
        raise VideoError(f"{info.path}: the video ends after {index} frames, but its "
                         f"container lists {info.frames}")
    irs.append(ir_frame.to_ndarray(format=plan_.ir.array_format))
    vis = vis_frame.to_ndarray(format=plan_.vis.array_format)
    if vis.shape[:2] != irs[-1].shape[:2]:
      vis = resize_image(vis, *irs[-1].shape[:2])
    viss.append(vis)
    if len(irs) == batch:
      yield irs, viss
      irs, viss = [], []
  if irs:
    yield irs, viss
  if plan_.ir.frames == plan_.vis.frames:  # Equal by their containers; are they really?
    for info, frame in zip(infos, decoders.next_frames(plan_.frames)):
      if frame is not None:
        raise VideoError(f"{info.path}: the video has more frames than the {info.frames} its "
                         "container lists")


# ---------------------------------------------------------------------------------------------
# The output file.


def hold_while_written(f) -> None:
  """Locks the temporary file `f` (`atomic_write`'s) while this process writes it, so that
  `remove_stale_temporaries` in another run leaves it alone; the lock ends with the process,
  however it ends."""
  if fcntl is not None:
    with contextlib.suppress(OSError):  # A file system without locks: it is not held.
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_stale_temporaries(out: str | os.PathLike) -> list[pathlib.Path]:
  """Removes the temporary files that runs killed while writing the video `out` left.

  `video.fuse_videos` writes `out` as `.NAME.XXXXXXXX.tmp` in its folder
  (`files.atomic_write`); a run killed with SIGKILL (or by a power loss) leaves that file
  behind. A run still writing one holds a lock on it (`fcntl.flock`), and its file is kept.

  Returns:
    The files removed.
  """
  out = pathlib.Path(out)
  name = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]+\.tmp")
  removed = []
  for tmp in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
    if not name.fullmatch(tmp.name):
      continue
    try:
      with open(tmp, "rb") as f:
        if fcntl is not None:  # BlockingIOError: a live run writes it.
          fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        tmp.unlink()
    except OSError:  # Being written, gone meanwhile, or not this user's to remove.
      continue
    removed.append(tmp)
  return removed

