"""bin/fuse.py and bin/evaluate.py: no user mistake loses data, each is one clear line.

Every case here was found by a tester. Where data could be lost, the bytes of every input
file are compared before and after. Images are tiny (48x48, the evaluation's minimum is 41)
and evaluation runs a few cheap metrics, so that the whole file compiles little.
"""

import errno
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO_ROOT, load_script, save_image
from PIL import Image

from mmdrfuse_jax.io import files
from mmdrfuse_jax.runtime import interrupts

fuse_cli = load_script("fuse")
evaluate_cli = load_script("evaluate")

SIZE = 48
METRICS = "EN,CC,PSNR"  # cheap to compile; CC and PSNR have undefined cases


def _pairs(root, stems=("a", "b"), size=(SIZE, SIZE), seed=0):
  rng = np.random.default_rng(seed)
  for stem in stems:
    save_image(root / "ir" / f"{stem}.png", rng.integers(0, 256, size, dtype=np.uint8))
    save_image(root / "vi" / f"{stem}.png", rng.integers(0, 256, size, dtype=np.uint8))
  return root / "ir", root / "vi"


def _snapshot(root):
  """Every file under `root` with its bytes."""
  return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fuse(capsys, *args):
  code = fuse_cli.main([str(a) for a in args] + ["--no_progress"])
  out, err = capsys.readouterr()
  return code, out, err


def _evaluate(capsys, *args):
  code = evaluate_cli.main([str(a) for a in args] + ["--no_progress"])
  out, err = capsys.readouterr()
  return code, out, err


# The first run in a process that computes says on stderr what jax runs on (and may warn of
# an unused accelerator): mmdrfuse_jax.runtime.backend.report. Not a problem line.
_BACKEND_NOTICE = re.compile(r"jax \S+ on \w+: \d+ devices? \(.*\)"
                             r"|warning: an? (NVIDIA GPU|TPU) is visible but jax runs on the CPU.*")


def _one_line(err):
  lines = [line for line in err.strip().splitlines() if not _BACKEND_NOTICE.fullmatch(line)]
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


# Case 1: an output folder that is, or would write over, an input.


def test_fuse_refuses_an_output_folder_that_holds_the_inputs(weights, tmp_path, capsys):
  ir, vis = _pairs(tmp_path / "data")
  before = _snapshot(tmp_path)
  for out in (ir, vis, ir / ".." / "ir"):
    code, _, err = _fuse(capsys, "--weights", weights, "--ir", ir, "--vis", vis, "--out", out)
    assert code == 2
    assert "input folder" in _one_line(err) and str(out) in err
  # Two files: the folder holding the --ir file, where OUT/a.png is that very file.
  code, _, err = _fuse(capsys, "--weights", weights, "--ir", ir / "a.png", "--vis", vis / "a.png",
                       "--out", ir)
  assert code == 2 and "would replace the infrared input" in _one_line(err)
  assert str(ir / "a.png") in err
  # A link to the input folder is the input folder.
  (tmp_path / "link").symlink_to(vis)
  code, _, err = _fuse(capsys, "--weights", weights, "--ir", ir, "--vis", vis,
                       "--out", tmp_path / "link")
  assert code == 2 and "visible input folder" in _one_line(err)
  (tmp_path / "link").unlink()
  assert _snapshot(tmp_path) == before


def test_evaluate_refuses_outputs_over_its_inputs(weights, tmp_path, capsys):
  ir, vis = _pairs(tmp_path / "data")
  before = _snapshot(tmp_path)
  code, _, err = _evaluate(capsys, "--ir", ir, "--vis", vis, "--weights", weights,
                           "--save_fused", ir, "--metrics", METRICS)
  assert code == 2 and "--save_fused" in err and "infrared input folder" in _one_line(err)
  code, _, err = _evaluate(capsys, "--ir", ir, "--vis", vis, "--fused", vis,
                           "--csv", vis / "b.png", "--metrics", METRICS)
  assert code == 2 and "--csv" in err and "would replace" in _one_line(err)
  assert _snapshot(tmp_path) == before


# Case 4: output folders that cannot be used are found before the first image; a single
# output file that cannot be written costs only its own pair.


def _read_only(monkeypatch, folder):
  """Makes `folder` read-only, also for root (whom permissions do not stop): then creating
  anything in it is refused by patching the two calls the output checks make."""
  folder.chmod(0o555)
  if os.geteuid() != 0:
    return

  def inside(path):
    return path is not None and pathlib.Path(path).resolve().is_relative_to(folder.resolve())

  real_mkstemp, real_mkdir = files.tempfile.mkstemp, pathlib.Path.mkdir

  def mkstemp(*args, dir=None, **kwargs):
    if inside(dir):
      raise PermissionError(errno.EACCES, "Permission denied")
    return real_mkstemp(*args, dir=dir, **kwargs)

  def mkdir(self, *args, **kwargs):
    if inside(self.parent):
      raise PermissionError(errno.EACCES, "Permission denied", str(self))
    return real_mkdir(self, *args, **kwargs)

  monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
  monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)


def _unusable_locations(tmp_path, monkeypatch, file_name):
  """A file where a folder is expected, and a (simulated) read-only folder."""
  a_file = tmp_path / file_name
  a_file.write_bytes(b"x")
  read_only = tmp_path / "ro"
  read_only.mkdir()
  _read_only(monkeypatch, read_only)
  return a_file, read_only


def test_fuse_unusable_output_folder_exits_2_before_fusing(weights, tmp_path, capsys,
                                                           monkeypatch):
  ir, vis = _pairs(tmp_path / "data")
  a_file, read_only = _unusable_locations(tmp_path, monkeypatch, "file.png")
  try:
    cases = [(a_file, "is a file, not a folder"),
             (a_file / "sub", "cannot create the folder (not a folder)"),
             (read_only, "cannot write in this folder (permission denied)"),
             (read_only / "new", "cannot create the folder (permission denied)")]
    for out, message in cases:
      code, _, err = _fuse(capsys, "--weights", weights, "--ir", ir, "--vis", vis, "--out", out)
      assert code == 2 and _one_line(err) == f"error: --out {out}: {message}"
  finally:
    read_only.chmod(0o755)
  assert not list(read_only.iterdir())


def test_fuse_a_folder_in_place_of_one_output_costs_only_that_pair(weights, tmp_path, capsys):
  ir, vis = _pairs(tmp_path / "data", stems=("a", "b", "c"))
  (tmp_path / "out" / "b.png").mkdir(parents=True)
  code, out, err = _fuse(capsys, "--weights", weights, "--ir", ir, "--vis", vis,
                         "--out", tmp_path / "out")
  assert code == 1
  assert _one_line(err) == (f"skipped: {tmp_path / 'out' / 'b.png'}: cannot write the fused "
                            "image (a folder of that name is in the way)")
  for stem in ("a", "c"):
    assert Image.open(tmp_path / "out" / f"{stem}.png").size == (SIZE, SIZE)
  assert "fused 2 pair(s)" in out


def test_evaluate_unusable_save_fused(weights, tmp_path, capsys, monkeypatch):
  ir, vis = _pairs(tmp_path / "data", stems=("a", "b"))
  a_file, read_only = _unusable_locations(tmp_path, monkeypatch, "file")
  try:
    for folder in (a_file, read_only):
      code, _, err = _evaluate(capsys, "--ir", ir, "--vis", vis, "--weights", weights,
                               "--save_fused", folder, "--metrics", METRICS)
      assert code == 2 and _one_line(err).startswith(f"error: --save_fused {folder}: ")
  finally:
    read_only.chmod(0o755)
  # A folder where one fused image should go: reported on one line, every image scored.
  (tmp_path / "saved" / "a.png").mkdir(parents=True)
  code, out, err = _evaluate(capsys, "--ir", ir, "--vis", vis, "--weights", weights,
                             "--save_fused", tmp_path / "saved", "--metrics", METRICS)
  assert code == 1 and "Traceback" not in err
  assert f"{tmp_path / 'saved' / 'a.png'}: cannot save the fused image" in err
  assert "mean (2 images)" in out and (tmp_path / "saved" / "b.png").is_file()


# Case 6: undefined metric values (a constant fused image) are never printed as numbers.


def test_undefined_metrics_are_counted_not_averaged(tmp_path, capsys):
  ir, vis = _pairs(tmp_path, stems=("a", "b", "c"))
  rng = np.random.default_rng(5)
  save_image(tmp_path / "fused" / "a.png", np.zeros((SIZE, SIZE), np.uint8))  # CC nan, PSNR -inf
  save_image(tmp_path / "fused" / "b.png", np.full((SIZE, SIZE), 9, np.uint8))  # CC nan
  save_image(tmp_path / "fused" / "c.png", rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
  args = ["--ir", ir, "--vis", vis, "--fused", tmp_path / "fused", "--metrics", METRICS]
  code, out, err = _evaluate(capsys, *args, "--format", "json", "--csv", tmp_path / "s.csv")
  assert code == 0, err

  def refuse(constant):
    raise AssertionError(f"not JSON: {constant}")

  summary = json.loads(out, parse_constant=refuse)
  rows = (tmp_path / "s.csv").read_text().splitlines()
  assert rows[0] == "name,EN,CC,PSNR"
  assert rows[1].endswith(",,") and rows[2].split(",")[2] == "" and rows[2].split(",")[3]
  c_cc, c_psnr = (float(v) for v in rows[3].split(",")[2:])
  assert summary["images"] == 3 and summary["undefined"] == {"EN": 0, "CC": 2, "PSNR": 1}
  assert summary["means"]["CC"] == pytest.approx(c_cc, abs=1e-6)  # over c alone
  b_psnr = float(rows[2].split(",")[3])
  assert summary["means"]["PSNR"] == pytest.approx((b_psnr + c_psnr) / 2, abs=1e-5)
  code, out, _ = _evaluate(capsys, *args)
  lines = out.splitlines()
  assert lines[1].startswith("mean (3 images)") and "nan" not in out and "inf" not in out
  assert lines[2].split() == ["undefined", "(images)", "0", "2", "1"]


# Case 7: --csv is checked before any image is scored.


def test_unwritable_csv_fails_before_scoring(tmp_path, capsys, monkeypatch):
  ir, vis = _pairs(tmp_path / "data")
  scored = []
  monkeypatch.setattr(evaluate_cli.scoring, "evaluate", lambda *a, **k: scored.append(1))
  a_file = tmp_path / "file"
  a_file.write_bytes(b"x")
  (tmp_path / "dir.csv").mkdir()
  for csv_path, message in ((a_file / "s.csv", "file: is a file, not a folder"),
                            (tmp_path / "dir.csv", "is a folder, not a file")):
    code, _, err = _evaluate(capsys, "--ir", ir, "--vis", vis, "--fused", vis,
                             "--csv", csv_path, "--metrics", METRICS)
    assert code == 2 and message in _one_line(err)
  assert not scored


# Case 9: SIGINT/SIGTERM stop after the current image, keep what is finished, exit 130/143.


def test_sigint_stops_fuse_after_the_current_image(weights, tmp_path):
  rng = np.random.default_rng(0)
  for i in range(30):  # 30 sizes with --bucket 0: a compilation each, so the run is slow
    size = (SIZE, SIZE + i)
    save_image(tmp_path / "ir" / f"{i:02d}.png", rng.integers(0, 256, size, dtype=np.uint8))
    save_image(tmp_path / "vi" / f"{i:02d}.png", rng.integers(0, 256, size, dtype=np.uint8))
  out = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  proc = subprocess.Popen(
      [sys.executable, str(REPO_ROOT / "bin" / "fuse.py"), "--weights", str(weights),
       "--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"), "--out", str(out),
       "--bucket", "0", "--no_progress"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  try:
    deadline = time.monotonic() + 60
    while not (out.is_dir() and any(out.glob("*.png"))):
      assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
      time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 130, err
  written = sorted(out.iterdir())
  assert _one_line(err) == (f"stopped by SIGINT: {len(written)} image(s) written to {out} are "
                            f"complete, {30 - len(written)} pair(s) not fused")
  assert 1 <= len(written) < 30
  for i, path in enumerate(written):  # complete PNGs, in order, nothing temporary left
    assert path.name == f"{i:02d}.png"
    with Image.open(path) as img:
      img.load()
      assert img.size == (SIZE + i, SIZE)


def test_sigterm_stops_evaluate_after_the_current_image(weights, tmp_path, capsys,
                                                        monkeypatch):
  ir, vis = _pairs(tmp_path / "data", stems=("a", "b", "c", "d"))
  real = evaluate_cli.scoring.imageio.read_image
  reads = []

  def read_image(path):  # the signal arrives while the second image is being read
    reads.append(path)
    if len(reads) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(path)

  monkeypatch.setattr(evaluate_cli.scoring.imageio, "read_image", read_image)
  handler = signal.getsignal(signal.SIGTERM)
  code, out, err = _evaluate(capsys, "--ir", ir, "--vis", vis, "--weights", weights,
                             "--save_fused", tmp_path / "saved", "--csv", tmp_path / "s.csv",
                             "--metrics", METRICS)
  assert code == 143 and out == ""
  assert _one_line(err) == (f"stopped by SIGTERM after scoring 2 of 4 image(s): no means "
                            f"printed, no CSV written; the fused images saved to "
                            f"{tmp_path / 'saved'} are complete")
  assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["a.png", "b.png"]
  assert not (tmp_path / "s.csv").exists()
  assert signal.getsignal(signal.SIGTERM) is handler  # restored


def test_second_signal_exits_130_on_one_line(weights, tmp_path, capsys, monkeypatch):
  ir, vis = _pairs(tmp_path / "data")

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(fuse_cli.batch_fuse, "fuse_pairs", interrupted)
  code, _, err = _fuse(capsys, "--weights", weights, "--ir", ir, "--vis", vis,
                       "--out", tmp_path / "out")
  assert code == interrupts.SIGINT_EXIT_CODE == 130
  assert "stopped at once" in _one_line(err)
  assert not (tmp_path / "out").exists()  # created for the check, removed: nothing written
  monkeypatch.setattr(evaluate_cli.scoring, "evaluate", interrupted)
  code, _, err = _evaluate(capsys, "--ir", ir, "--vis", vis, "--fused", vis,
                           "--metrics", METRICS)
  assert code == 130 and "stopped at once" in _one_line(err)


# Case 12: smaller ones.


def test_negative_bucket_is_one_line_up_front(weights, tmp_path, capsys):
  ir, vis = _pairs(tmp_path / "data")
  code, _, err = _fuse(capsys, "--weights", weights, "--ir", ir, "--vis", vis,
                       "--out", tmp_path / "out", "--bucket", "-5")
  assert code == 2
  assert _one_line(err) == ("error: --bucket must be 0 (exact sizes) or a positive number of "
                            "pixels, got -5")
  assert not (tmp_path / "out").exists()


def test_size_mismatch_names_the_roles(weights, tmp_path, capsys):
  save_image(tmp_path / "ir" / "x.png", np.zeros((64, 80), np.uint8))
  save_image(tmp_path / "vi" / "x.png", np.zeros((64, 96), np.uint8))
  ir, vis = tmp_path / "ir", tmp_path / "vi"
  code, _, err = _fuse(capsys, "--weights", weights, "--ir", ir, "--vis", vis,
                       "--out", tmp_path / "out")
  assert code == 1
  assert (f"{ir / 'x.png'}: pair of different sizes (infrared {ir / 'x.png'} is 80x64, "
          f"visible {vis / 'x.png'} is 96x64)") in err
  save_image(tmp_path / "vi" / "x.png", np.zeros((64, 80), np.uint8))
  save_image(tmp_path / "fused" / "x.png", np.zeros((50, 80), np.uint8))
  code, _, err = _evaluate(capsys, "--ir", ir, "--vis", vis, "--fused", tmp_path / "fused",
                           "--metrics", METRICS)
  assert code == 2
  assert (f"images of different sizes (fused {tmp_path / 'fused' / 'x.png'} is 80x50, "
          f"infrared {ir / 'x.png'} is 80x64, visible {vis / 'x.png'} is 80x64)") in err


def test_output_folder_is_only_left_when_something_was_written(weights, tmp_path, capsys):
  save_image(tmp_path / "ir" / "x.png", np.zeros((SIZE, SIZE), np.uint8))
  save_image(tmp_path / "vi" / "x.png", np.zeros((SIZE, SIZE + 1), np.uint8))
  out = tmp_path / "new" / "deeper" / "out"
  code, _, _ = _fuse(capsys, "--weights", weights, "--ir", tmp_path / "ir",
                     "--vis", tmp_path / "vi", "--out", out)
  assert code == 1 and not (tmp_path / "new").exists()
  code, _, _ = _evaluate(capsys, "--ir", tmp_path / "ir", "--vis", tmp_path / "vi",
                         "--weights", weights, "--save_fused", out, "--csv", out / "s.csv",
                         "--metrics", METRICS)
  assert code == 2 and not (tmp_path / "new").exists()
