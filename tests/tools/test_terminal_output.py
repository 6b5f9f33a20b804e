"""What a tool prints cannot command the terminal: file names are escaped (issue 24: 11)."""

import os
import subprocess
import sys

import numpy as np
from conftest import REPO_ROOT, save_image


def test_control_characters_in_file_names_are_printed_escaped(tmp_path):
  hostile = "x\x1b]0;pwned\x07\x1b[2J"
  rng = np.random.default_rng(0)
  for side in ("ir", "vi"):
    save_image(tmp_path / side / f"{hostile}.png", rng.integers(0, 256, (24, 24), dtype=np.uint8))
    save_image(tmp_path / side / "ok.png", rng.integers(0, 256, (24, 24), dtype=np.uint8))
  (tmp_path / "vi" / f"{hostile}.png").unlink()  # a missing partner: a line naming the file
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  done = subprocess.run(
      [sys.executable, "bin/fuse.py", "--weights", str(REPO_ROOT / "weights" / "student.npz"),
       "--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"), "--out",
       str(tmp_path / "out"), "--no_progress"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  printed = done.stdout + done.stderr
  assert "\\x1b]0;pwned\\x07\\x1b[2J" in printed, printed  # named, escaped
  assert "\x1b" not in printed and "\x07" not in printed
  assert done.returncode == 1  # one problem reported, the other pair fused
  assert (tmp_path / "out" / "ok.png").exists()
