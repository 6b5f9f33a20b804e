"""bin/fuse_video.py: videos and frame folders fused as bin/fuse.py fuses each frame.

A short clip pair is built here with a lossless codec (ffv1), its frames also written as PNG
folders and fused by bin/fuse.py: every frame of a fused video (or folder) must be within one
gray level of those. Mismatched videos, bad options and stops must leave no file.
"""

import dataclasses
import fcntl
import fractions
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import av
import numpy as np
import pytest
from conftest import REPO_ROOT, load_script, save_image, tmpfs
from PIL import Image

from mmdrfuse_jax.benchmarks import suite
from mmdrfuse_jax.inference import fusion, video, video_codecs
from mmdrfuse_jax.models import weight_files
from mmdrfuse_jax.runtime import interrupts

fuse_video = load_script("fuse_video")
fuse_cli = load_script("fuse")

FRAMES, HEIGHT, WIDTH, RATE = 6, 48, 64, 25
# 6 frames: videos fuse a full batch of 4 and a short one (padded to 4: one compiled program);
# frame folders (bucketed canvases, as bin/fuse.py) batches of 2, and 1 as bin/fuse.py.
BATCH = "4"
FOLDER_BATCH = "2"


def make_frames(count, height, width, color, seed):
  """Smooth moving patterns with a little noise, uint8 gray (H, W) or RGB (H, W, 3)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
  frames = []
  for t in range(count):
    base = 0.5 + 0.3 * np.sin(6 * x + t / 2 + seed) * np.cos(4 * y - t / 3)
    planes = [base + 0.15 * np.sin(3 * x * (c + 1) + y) for c in range(3 if color else 1)]
    image = np.stack(planes, axis=-1) + rng.normal(0, 0.02, (height, width, len(planes)))
    image = np.clip(np.round(255 * image), 0, 255).astype(np.uint8)
    frames.append(image if color else image[..., 0])
  return frames


def write_clip(path, frames, rate=RATE, pix_fmt=None):
  """Writes uint8 gray or RGB frames (or uint16 gray) as a lossless ffv1 video."""
  fmt = {(2, np.uint8): "gray", (3, np.uint8): "rgb24", (2, np.uint16): "gray16le"}[
      frames[0].ndim, frames[0].dtype.type]
  with av.open(str(path), "w") as out:
    stream = out.add_stream("ffv1", rate=rate)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt = pix_fmt or {"rgb24": "bgr0"}.get(fmt, fmt)
    for image in frames:
      out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format=fmt)))
    out.mux(stream.encode(None))
  return path


def read_clip(path, fmt):
  """(frames as arrays, frame rate) of a video."""
  with av.open(str(path)) as container:
    stream = container.streams.video[0]
    return [frame.to_ndarray(format=fmt) for frame in container.decode(stream)], stream.average_rate


@pytest.fixture(scope="module")
def clips(tmp_path_factory, weights):
  """The clip pair, its frames as PNG folders, bin/fuse.py's results on them, odd clips."""
  root = tmp_path_factory.mktemp("clips")
  ir_frames = make_frames(FRAMES, HEIGHT, WIDTH, color=False, seed=1)
  vis_frames = make_frames(FRAMES, HEIGHT, WIDTH, color=True, seed=2)
  c = {"root": root, "ir": write_clip(root / "ir.mkv", ir_frames),
       "vis": write_clip(root / "vis.mkv", vis_frames),
       "short": write_clip(root / "short.mkv", vis_frames[:5]),
       "wide": write_clip(root / "wide.mkv", make_frames(FRAMES, HEIGHT, 80, True, seed=3)),
       "fast": write_clip(root / "fast.mkv", vis_frames, rate=30)}
  # The frames as decoded from the clips: lossless, so exactly the frames written.
  for key, fmt, frames in (("ir", "gray", ir_frames), ("vis", "rgb24", vis_frames)):
    decoded, rate = read_clip(c[key], fmt)
    assert rate == RATE and all(np.array_equal(a, b) for a, b in zip(decoded, frames))
    for index, frame in enumerate(decoded):
      save_image(root / f"{key}_frames" / f"f{index:03d}.png", frame)
  c["stems"] = [f"f{index:03d}" for index in range(FRAMES)]
  for name, extra in (("gray", []), ("color", ["--color"])):
    assert fuse_cli.main(["--weights", str(weights), "--ir", str(root / "ir_frames"),
                          "--vis", str(root / "vis_frames"), "--out", str(root / name),
                          "--no_progress", *extra]) == 0
    c[name] = [np.asarray(Image.open(root / name / f"{stem}.png")) for stem in c["stems"]]
  return c


def assert_within_one_level(frames, expected):
  assert len(frames) == len(expected)
  for index, (got, want) in enumerate(zip(frames, expected)):
    assert got.shape == want.shape, index
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, f"frame {index}"


@pytest.mark.slow
def test_video_frames_match_fuse_py(clips, weights, tmp_path):
  params = weight_files.load_params(weights, "student")
  plan = video_codecs.plan(video_codecs.probe(clips["ir"]), video_codecs.probe(clips["vis"]))
  assert (plan.frames, plan.ir.array_format, plan.vis.array_format) == (6, "gray", "rgb24")
  out = tmp_path / "fused.mkv"
  written = video.fuse_videos(fusion.Fuser(params, bucket=0), plan, out, batch=int(BATCH),
                              encoding=video_codecs.Encoding(codec="ffv1"), progress=False)
  assert written == FRAMES
  frames, rate = read_clip(out, "gray")
  assert rate == RATE
  assert_within_one_level(frames, clips["gray"])
  assert os.listdir(tmp_path) == ["fused.mkv"]  # no temporary file left


def test_sources_of_more_than_8_bits_give_16_bits(clips, weights, tmp_path):
  ir16 = [frame.astype(np.uint16) * 257 + 3 for frame in make_frames(4, HEIGHT, WIDTH, False, 4)]
  ir = write_clip(tmp_path / "ir16.mkv", ir16)
  vis = write_clip(tmp_path / "vis10.mkv", make_frames(4, HEIGHT, WIDTH, True, 5),
                   pix_fmt="yuv444p10le")
  plan = video_codecs.plan(video_codecs.probe(ir), video_codecs.probe(vis))
  assert (plan.ir.array_format, plan.vis.array_format) == ("gray16le", "rgb48le")
  params = weight_files.load_params(weights, "student")
  out = tmp_path / "fused.mkv"
  video.fuse_videos(fusion.Fuser(params, bucket=0, color=True), plan, out, batch=int(BATCH),
                    encoding=video_codecs.Encoding(codec="ffv1"), progress=False)
  frames, _ = read_clip(out, "rgb48le")
  fuser = fusion.Fuser(params, color=True)
  assert_within_one_level(frames, [fuser.fuse_images(a, b) for a, b in
                                   zip(read_clip(ir, "gray16le")[0], read_clip(vis, "rgb48le")[0])])


def test_cli_colour_video_in_a_subprocess(clips, weights, tmp_path):
  out = tmp_path / "color.mkv"
  run = subprocess.run(
      [sys.executable, str(REPO_ROOT / "bin" / "fuse_video.py"), "--weights", str(weights),
       "--ir", str(clips["ir"]), "--vis", str(clips["vis"]), "--out", str(out), "--color",
       "--codec", "ffv1", "--batch", BATCH],
      capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip() == f"fused 6 frame(s) into {out} (ffv1, bgr0, 25 fps)"
  assert "frame/s" in run.stderr and "Traceback" not in run.stderr  # the progress bar
  frames, _ = read_clip(out, "rgb24")
  assert_within_one_level(frames, clips["color"])
  assert os.listdir(tmp_path) == ["color.mkv"]


def test_frame_folders_match_fuse_py(clips, weights, tmp_path, capsys):
  out = tmp_path / "out"
  assert fuse_video.main(["--weights", str(weights), "--ir", str(clips["root"] / "ir_frames"),
                          "--vis", str(clips["root"] / "vis_frames"), "--out", str(out),
                          "--batch", FOLDER_BATCH, "--no_progress"]) == 0
  assert capsys.readouterr().out.strip() == f"fused 6 pair(s) into {out}"
  assert sorted(os.listdir(out)) == [f"{stem}.png" for stem in clips["stems"]]
  assert_within_one_level([np.asarray(Image.open(out / f"{stem}.png")) for stem in clips["stems"]],
                          clips["gray"])


def test_frame_folder_problems_are_skipped(clips, weights, tmp_path, capsys):
  ir, vis = tmp_path / "ir", tmp_path / "vi"
  for index in (0, 1):
    frame = np.asarray(Image.open(clips["root"] / "ir_frames" / f"f00{index}.png"))
    save_image(ir / f"f00{index}.png", frame)
    save_image(vis / f"f00{index}.png", frame)
  save_image(ir / "lonely.png", np.zeros((HEIGHT, WIDTH), np.uint8))
  save_image(ir / "odd.png", np.zeros((HEIGHT, WIDTH), np.uint8))
  save_image(vis / "odd.png", np.zeros((HEIGHT, WIDTH + 2), np.uint8))
  args = ["--weights", str(weights), "--ir", str(ir), "--vis", str(vis), "--no_progress",
          "--batch", FOLDER_BATCH]
  assert fuse_video.main(args + ["--out", str(tmp_path / "o")]) == 1
  err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("jax ")]
  assert len(err) == 2 and all(line.startswith("skipped: ") for line in err)
  assert "lonely.png: no partner" in err[0] and "odd.png: pair of different sizes" in err[1]
  assert sorted(os.listdir(tmp_path / "o")) == ["f000.png", "f001.png"]
  assert fuse_video.main(args + ["--out", str(tmp_path / "r"), "--resize"]) == 1  # lonely stays
  assert sorted(os.listdir(tmp_path / "r")) == ["f000.png", "f001.png", "odd.png"]


@pytest.mark.parametrize("other, expected", [
    ("short", "infrared has 6 frames, visible has 5 (--frame_count shorter fuses the first 5)"),
    ("wide", "infrared is 64x48, visible is 80x48 (--resize scales the visible frames to 64x48)"),
    ("fast", "infrared runs at 25 fps, visible at 30 fps"),
])
def test_mismatched_videos_one_line_no_file(clips, weights, tmp_path, capsys, other, expected):
  out = tmp_path / "new" / "out.mp4"
  code = fuse_video.main(["--weights", str(weights), "--ir", str(clips["ir"]),
                          "--vis", str(clips[other]), "--out", str(out), "--no_progress"])
  assert code == 1
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith(f"error: videos {clips['ir']} and {clips[other]} do not match: ")
  assert expected in line
  assert not (tmp_path / "new").exists() and os.listdir(tmp_path) == []


def test_shorter_and_resize(clips, weights, tmp_path, capsys):
  base = ["--weights", str(weights), "--ir", str(clips["ir"]), "--no_progress", "--batch", BATCH]
  # The default codec (libx264, yuv420p, crf 18) in an mp4: close to the frames, not exact.
  out = tmp_path / "short.mp4"
  assert fuse_video.main(base + ["--vis", str(clips["short"]), "--out", str(out),
                                 "--frame_count", "shorter"]) == 0
  assert "the first 5 frames (infrared has 6, visible 5)" in capsys.readouterr().out
  frames, rate = read_clip(out, "gray")
  assert len(frames) == 5 and rate == RATE and frames[0].shape == (HEIGHT, WIDTH)
  for index, got in enumerate(frames):  # each frame nearest its own, and near it
    errors = [np.abs(got.astype(int) - want.astype(int)).mean() for want in clips["gray"]]
    assert np.argmin(errors) == index and errors[index] < 6
  # --resize: the visible frames scaled to 64x48 (bicubic), then fused as bin/fuse.py would.
  out = tmp_path / "resized.mkv"
  assert fuse_video.main(base + ["--vis", str(clips["wide"]), "--out", str(out), "--resize",
                                 "--codec", "ffv1"]) == 0
  frames, _ = read_clip(out, "gray")
  wide, _ = read_clip(clips["wide"], "rgb24")
  irs, _ = read_clip(clips["ir"], "gray")
  fuser = fusion.Fuser(weight_files.load_params(weights, "student"))
  assert_within_one_level(
      frames, [fuser.fuse_images(ir, video_codecs.resize_image(vis, HEIGHT, WIDTH))
               for ir, vis in zip(irs, wide)])


@pytest.mark.parametrize("out_name, extra, message", [
    ("out.xyz", [], "--out {out}: unknown video extension '.xyz'"),
    ("out.webm", [], "--codec libx264: cannot encode 64x48 yuv420p video into .webm"),
    ("out.mkv", ["--codec", "nope"], "--codec nope: no such encoder"),
    ("out.mkv", ["--pix_fmt", "nope"], "--codec libx264: cannot encode 64x48 nope video"),
    ("ir.mkv", [], "--out: {out} would replace the infrared input video (--ir)"),
    ("folder", [], "--out {out}: is a folder"),
])
def test_unusable_options_exit_2(clips, weights, tmp_path, capsys, out_name, extra, message):
  folder = tmp_path if out_name != "ir.mkv" else clips["root"]
  out = folder / out_name
  if out_name == "folder":
    out.mkdir()
  before = sorted(os.listdir(folder))
  code = fuse_video.main(["--weights", str(weights), "--ir", str(clips["ir"]),
                          "--vis", str(clips["vis"]), "--out", str(out), *extra])
  assert code == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith("error: " + message.format(out=out)), line
  assert sorted(os.listdir(folder)) == before


def test_inputs_that_are_not_two_videos_exit_2(clips, weights, tmp_path, capsys):
  base = ["--weights", str(weights), "--out", str(tmp_path / "o.mkv")]
  assert fuse_video.main(base + ["--ir", str(clips["ir"]),
                                 "--vis", str(clips["root"] / "vis_frames")]) == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line == (f"error: {clips['root'] / 'vis_frames'}: is a folder, but the other input is a "
                  "file; give two files or two folders")
  not_video = tmp_path / "notes.mkv"
  not_video.write_text("not a video")
  assert fuse_video.main(base + ["--ir", str(not_video), "--vis", str(clips["vis"])]) == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith(f"error: {not_video}: cannot read video (")
  assert os.listdir(tmp_path) == ["notes.mkv"]


def test_sigterm_stops_without_a_file(clips, weights, tmp_path, capsys, monkeypatch):
  original = fusion.Fuser.fuse_batch

  def fuse_then_signal(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the first batch is fused
    return original(self, *args, **kwargs)

  monkeypatch.setattr(fusion.Fuser, "fuse_batch", fuse_then_signal)
  out = tmp_path / "out.mkv"
  code = fuse_video.main(["--weights", str(weights), "--ir", str(clips["ir"]),
                          "--vis", str(clips["vis"]), "--out", str(out), "--codec", "ffv1",
                          "--batch", BATCH, "--no_progress"])
  assert code == 143
  assert capsys.readouterr().err.splitlines()[-1] == f"stopped by SIGTERM: {out} not written"
  assert os.listdir(tmp_path) == []


def test_failure_midway_leaves_no_file(clips, weights, tmp_path, capsys, monkeypatch):
  batches = video_codecs.decoded_batches

  def fail_after_one_batch(plan, batch, *decoders):
    iterator = batches(plan, batch, *decoders)
    yield next(iterator)
    raise video_codecs.VideoError(f"{plan.vis.path}: cannot decode frame 3 (test)")

  monkeypatch.setattr(video_codecs, "decoded_batches", fail_after_one_batch)
  out = tmp_path / "out.mkv"
  code = fuse_video.main(["--weights", str(weights), "--ir", str(clips["ir"]),
                          "--vis", str(clips["vis"]), "--out", str(out), "--codec", "ffv1",
                          "--batch", BATCH, "--no_progress"])
  assert code == 1
  assert capsys.readouterr().err.splitlines()[-1] == (
      f"error: {clips['vis']}: cannot decode frame 3 (test)")
  assert os.listdir(tmp_path) == []


def test_full_disk_leaves_no_file(clips, weights, tmp_path, capsys):
  with tmpfs(tmp_path / "small", "8k") as small:
    out = small / "out.mkv"
    code = fuse_video.main(["--weights", str(weights), "--ir", str(clips["ir"]),
                            "--vis", str(clips["vis"]), "--out", str(out), "--codec", "ffv1",
                            "--batch", BATCH, "--no_progress"])
    assert code == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {out}: cannot write the video (no space left on device)")
    assert os.listdir(small) == []


def test_without_pyav_videos_are_one_line(clips, weights, tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "av", None)  # import av now fails
  code = fuse_video.main(["--weights", str(weights), "--ir", str(clips["ir"]),
                          "--vis", str(clips["vis"]), "--out", str(tmp_path / "out.mkv")])
  assert code == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line == f"error: reading and writing videos needs PyAV: {video_codecs.INSTALL_HINT}"
  assert os.listdir(tmp_path) == []


def test_rates_in_messages():
  assert video_codecs.format_rate(fractions.Fraction(25)) == "25"
  assert video_codecs.format_rate(fractions.Fraction(30000, 1001)) == "30000/1001 (29.97)"


def test_bench_video_reports_frames_per_second(capsys):
  bench = load_script("bench")
  assert bench.main(["video", "--height", str(HEIGHT), "--width", str(WIDTH), "--frames", "6",
                     "--batch", BATCH, "--repeats", "1"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["benchmark"] == "video" and result["device"].startswith("cpu")
  assert (result["frames"], result["batch"], result["pixel_format"]) == (6, 4, "yuv420p")
  assert all(result[f"fps_{stage}"] > 0 for stage in ("decode", "fuse", "encode"))
  assert result["output_bytes"] > 0
  names = [name for name, _ in suite.items(reduced=False)]
  assert "video-640x480" in names and "video-1280x1024" in names


# Stops: the reader thread, FFmpeg's decoding threads and the interpreter lock (the issue: a
# SIGINT/SIGTERM sometimes froze bin/fuse_video.py for good, leaving its temporary file).


class CopyFuser:
  """Stands in for `fusion.Fuser` where the threads are under test: returns the infrared frames."""

  color = False

  def fuse_batch(self, irs, viss, batch_size):
    del viss, batch_size
    return list(irs)


@pytest.mark.parametrize("ending", ["completed", "stopped", "failed"])
def test_decoders_are_freed_in_the_calling_thread(clips, monkeypatch, ending):
  # Freeing a decoder waits for FFmpeg's decoding threads while PyAV holds the interpreter lock;
  # from the reader thread, that froze a stopped bin/fuse_video.py (`video_codecs.Decoders.close`).
  plan = video_codecs.plan(video_codecs.probe(clips["ir"]), video_codecs.probe(clips["vis"]))
  stop = None
  if ending == "stopped":
    stop = interrupts.StopRequest()  # not entered: a flag, already set
    stop.signum = signal.SIGTERM
  elif ending == "failed":  # the container promises more frames than the video has
    plan = dataclasses.replace(plan, frames=FRAMES + 2)
  closed_in = []
  real_open = av.open

  class Recorded:
    """A container that notes which thread closes it."""

    def __init__(self, container):
      self._container = container

    def __getattr__(self, name):
      return getattr(self._container, name)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.close()

    def close(self):
      closed_in.append(threading.current_thread().name)
      self._container.close()

  monkeypatch.setattr(av, "open", lambda *args, **kwargs: Recorded(real_open(*args, **kwargs)))
  fused = []
  expected = {"completed": None, "stopped": interrupts.Interrupted,
              "failed": video_codecs.VideoError}[ending]
  try:
    video.fuse_frames(CopyFuser(), plan, fused.extend, batch=2, stop=stop)
  except BaseException as e:  # pylint: disable=broad-except
    assert expected is not None and isinstance(e, expected), e
  else:
    assert expected is None and len(fused) == FRAMES
  assert closed_in and set(closed_in) == {threading.main_thread().name}, closed_in


def test_a_second_signal_while_stopping_still_waits_for_the_reader(clips, monkeypatch):
  # A second Ctrl-C raises KeyboardInterrupt in the main thread; if that ended the wait for the
  # reader thread, the decoders would be freed while it still decodes with them.
  plan = video_codecs.plan(video_codecs.probe(clips["ir"]), video_codecs.probe(clips["vis"]))
  pair = ([np.zeros((HEIGHT, WIDTH), np.uint8)], [np.zeros((HEIGHT, WIDTH, 3), np.uint8)])
  decoding, second_signal, decoded = threading.Event(), threading.Event(), threading.Event()

  def slow_batches(plan_, batch, *decoders):
    yield pair
    yield pair
    decoding.set()
    second_signal.wait(10)  # a slow third batch: under way when both signals come
    time.sleep(0.2)
    decoded.set()
    yield pair

  def signal_again():
    os.kill(os.getpid(), signal.SIGINT)
    second_signal.set()

  monkeypatch.setattr(video_codecs, "decoded_batches", slow_batches)
  with interrupts.StopRequest() as stop:

    class SignallingFuser(CopyFuser):
      def fuse_batch(self, irs, viss, batch_size):
        if decoding.wait(10) and stop.signum is None:
          os.kill(os.getpid(), signal.SIGTERM)  # stops before the next batch...
          threading.Timer(0.3, signal_again).start()  # ...and once more
        return super().fuse_batch(irs, viss, batch_size)

    with pytest.raises(KeyboardInterrupt):
      video.fuse_frames(SignallingFuser(), plan, lambda images: None, batch=1, stop=stop)
    assert decoded.is_set()  # the reader thread had ended


def write_h264(path, count, height=240, width=320, seed=0, preset="medium"):
  """An H.264 (libx264, yuv420p) clip of smooth moving colour patterns."""
  with av.open(str(path), "w") as out:
    stream = out.add_stream("libx264", rate=RATE)
    stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
    stream.options = {"preset": preset}
    for image in make_frames(count, height, width, color=True, seed=seed):
      out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
    out.mux(stream.encode(None))
  return path


# Runs in a subprocess (a freeze would hang pytest): decodes the first frame pair of two H.264
# clips and frees the decoders at once, while FFmpeg's frame threads still decode the next
# frames and log through PyAV's callback (VERBOSE makes each of them log as it starts).
_FREE_BUSY_DECODERS = textwrap.dedent("""
    import logging, sys
    import av
    logging.getLogger("libav").addHandler(logging.NullHandler())
    logging.getLogger("libav").propagate = False
    av.logging.set_level(av.logging.VERBOSE)
    from mmdrfuse_jax.inference import video_codecs
    plan = video_codecs.plan(video_codecs.probe(sys.argv[1]), video_codecs.probe(sys.argv[2]))
    for _ in range(int(sys.argv[3])):
      decoders = video_codecs.Decoders(plan)
      decoders.next_frames(0)
      decoders.close()
    print("freed")
    """)


def test_freeing_busy_decoders_does_not_freeze(tmp_path):
  # PyAV frees a decoder holding the interpreter lock and the free waits for FFmpeg's threads:
  # one of them logging then waits for the lock forever. Without the flush in `Decoders.close`
  # this froze within the first few of these tries (in the main thread as well).
  ir, vis = write_h264(tmp_path / "ir.mp4", 12, seed=1), write_h264(tmp_path / "vis.mp4", 12)
  run = subprocess.run([sys.executable, "-c", _FREE_BUSY_DECODERS, str(ir), str(vis), "30"],
                       capture_output=True, text=True, timeout=30)  # about 2 s when it works
  assert run.returncode == 0 and run.stdout.strip() == "freed", run.stderr


def _temporaries(folder):
  return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.slow
def test_signals_stop_fuse_video_at_once_and_a_rerun_removes_a_killed_runs_file(weights,
                                                                                 tmp_path):
  ir = write_h264(tmp_path / "ir.mp4", 150, 120, 160, seed=1, preset="ultrafast")
  vis = write_h264(tmp_path / "vis.mp4", 150, 120, 160, seed=2, preset="ultrafast")
  folder = tmp_path / "out"
  folder.mkdir()
  out = folder / "OUT.mp4"
  command = [sys.executable, str(REPO_ROOT / "bin" / "fuse_video.py"), "--weights", str(weights),
             "--ir", str(ir), "--vis", str(vis), "--out", str(out), "--batch", "1",
             "--no_progress"]
  for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
      deadline = time.monotonic() + 120
      while not _temporaries(folder):  # the video is being written: decoding and fusing
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
      time.sleep(0.3)
      proc.send_signal(sig)
      sent = time.monotonic()
      _, err = proc.communicate(timeout=30)
      took = time.monotonic() - sent
    finally:
      proc.kill()
    if sig == signal.SIGKILL:  # what a frozen run ended with: its temporary file stays
      assert proc.returncode == -signal.SIGKILL and len(_temporaries(folder)) == 1
      continue
    assert proc.returncode == 128 + sig, err
    assert took < 10, f"{signal.Signals(sig).name}: exited {took:.1f} s after the signal"
    assert err.splitlines()[-1] == (f"stopped by {signal.Signals(sig).name}: {out} not "
                                    "written"), err
    assert "Traceback" not in err and os.listdir(folder) == []
  rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr
  assert os.listdir(folder) == ["OUT.mp4"]  # the killed run's temporary file is gone


def test_rerun_removes_a_stale_temporary_file_but_not_one_being_written(clips, weights,
                                                                        tmp_path, capsys):
  out = tmp_path / "out.mkv"
  stale = tmp_path / ".out.mkv.k1ll3d_9.tmp"  # left by a run killed with SIGKILL
  stale.write_bytes(b"half a video")
  live = tmp_path / ".out.mkv.wr1t1ng_.tmp"  # another run still writing it holds its lock
  live.write_bytes(b"a video being written")
  other = tmp_path / ".out.mkv.old.tmp.txt"  # not a temporary file of out.mkv
  other.write_bytes(b"notes")
  with open(live, "rb") as held:
    fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert fuse_video.main(["--weights", str(weights), "--ir", str(clips["ir"]),
                            "--vis", str(clips["vis"]), "--out", str(out), "--codec", "ffv1",
                            "--batch", BATCH, "--no_progress"]) == 0
  assert sorted(os.listdir(tmp_path)) == sorted([out.name, live.name, other.name])
  assert capsys.readouterr().out.startswith(f"fused 6 frame(s) into {out}")
