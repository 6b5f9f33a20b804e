"""SIGINT/SIGTERM while a tool starts (imports jax): one line on stderr, exit 130/143.

Each tool runs in a subprocess under `python -X importtime`, whose stderr names every module as
its import completes: the signal is sent once the tools package is imported (the guard is in
place), while the tool's own imports (jax: seconds) are still running.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT

IMPORT_TIME = "import time:"


def _start(command, ready):
  """Starts `command`; returns it once stderr reports the import of the module `ready`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  done = re.compile(rf"\|\s*{re.escape(ready)}$")
  seen = []
  deadline = time.monotonic() + 60
  for line in proc.stderr:
    seen.append(line)
    if done.search(line.rstrip()) or time.monotonic() > deadline:
      break
  assert proc.poll() is None, "".join(seen[-20:])
  return proc, seen


def _shim(tool):
  return [sys.executable, "-X", "importtime", str(REPO_ROOT / "bin" / f"{tool}.py")]


def _console_script(tool):
  script = shutil.which(f"mmdrfuse-{tool.replace('_', '-')}",
                        path=os.path.dirname(sys.executable))
  if script is None:
    pytest.skip(f"the console script mmdrfuse-{tool} is not installed next to {sys.executable}")
  return [sys.executable, "-X", "importtime", script]


def _module(tool):
  return [sys.executable, "-X", "importtime", "-m", f"mmdrfuse_jax.tools.{tool}"]


@pytest.mark.parametrize("launch, tool, args, ready, sig", [
    # Signalled in the middle of importing jax (jaxlib is imported: jax takes a second more).
    (_shim, "fuse_video", ["--weights", "w.npz", "--ir", "a.mp4", "--vis", "b.mp4", "--out",
                           "o.mp4"], "jaxlib", signal.SIGINT),
    # Signalled as the tool module starts its imports (the tools package is imported).
    (_console_script, "evaluate", ["--ir", "a", "--vis", "b", "--fused", "c"],
     "mmdrfuse_jax.tools", signal.SIGTERM),
    (_module, "fuse", ["--weights", "w.npz", "--ir", "a", "--vis", "b", "--out", "o"],
     "mmdrfuse_jax.tools", signal.SIGINT),
    # train imports jax in main(), after its flags parse: signalled there.
    (_shim, "train", ["--config=configs/quickstart.py", "--workdir=/nonexistent/run"],
     "mmdrfuse_jax.tools.train", signal.SIGTERM),
])
def test_signal_while_a_tool_starts_is_one_line(launch, tool, args, ready, sig):
  proc, _ = _start(launch(tool) + args, ready)
  try:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  lines = [line for line in err.splitlines() if not line.startswith(IMPORT_TIME)]
  name = signal.Signals(sig).name
  assert (proc.returncode, lines) == (128 + sig, [f"stopped by {name} while starting"]), err[-3000:]
