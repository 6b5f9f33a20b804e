"""Shared test fixtures.

Reference material lives outside the repository (`$MMDRFUSE_SHARED`, default `../shared`
from the repo root); tests that need it skip, saying why, where it is absent.
"""

import atexit
import contextlib
import importlib.util
import os
import pathlib
import shutil
import subprocess
import tempfile

# One persistent XLA compilation cache for the test session, shared with the subprocesses
# that tests start (they inherit the environment): a program compiled once, in this process
# or in a subprocess, is read back instead of compiled again. Set before jax is imported.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="mmdrfuse-test-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from mmdrfuse_jax.models import networks, weight_files  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_path() -> pathlib.Path:
  return pathlib.Path(os.environ.get("MMDRFUSE_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> pathlib.Path:
  """The reference folder; skips the test when it is missing."""
  path = shared_path()
  if not (path / "reference" / "SPEC.md").is_file():
    pytest.skip(f"reference material not found at {path} (set MMDRFUSE_SHARED)")
  return path


@pytest.fixture(scope="session")
def golden(shared) -> dict:
  """The published code's reference tensors: {"networks", "losses", "vgg19_random"} -> arrays."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  root = shared / "reference" / "golden"
  out = {}
  for name in ("networks", "losses", "vgg19_random"):
    with np.load(root / f"{name}.npz") as data:
      out[name] = {k: data[k] for k in data.files}
  return out


def load_script(name: str):
  """The tool that `bin/<name>.py` runs (`mmdrfuse_jax.tools.<name>`): tests call its
  `main(argv)` in-process and patch what it imported."""
  if not (REPO_ROOT / "bin" / f"{name}.py").exists():
    raise FileNotFoundError(f"bin/{name}.py")
  return importlib.import_module(f"mmdrfuse_jax.tools.{name}")


def random_params(model: str, seed: int) -> dict:
  """NumPy parameters of `model` with He-scaled normal kernels and small biases.

  Much cheaper than `networks.init_params` for the teacher (whose initialisation runs its whole
  forward pass: about 15 s on a 2-core CPU), for tests that need any teacher.
  """
  rng = np.random.default_rng(seed)
  params = {}
  for layer, shapes in weight_files.expected_shapes(model).items():
    fan_in = np.prod(shapes["kernel"][:-1])
    params[layer] = {
        "kernel": (rng.normal(size=shapes["kernel"]) * np.sqrt(2 / fan_in)).astype(np.float32),
        "bias": (rng.normal(size=shapes["bias"]) * 0.01).astype(np.float32)}
  return params


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
  """A freshly initialised teacher's weights file (`teacher.npz`), for student runs."""
  path = tmp_path_factory.mktemp("teacher") / "teacher.npz"
  weight_files.save_params(path, random_params("teacher", 7))
  return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """A freshly initialised student's weights file (`student.npz`)."""
  path = tmp_path_factory.mktemp("w") / "student.npz"
  weight_files.save_params(path, networks.init_params("student", jax.random.key(0)))
  return path


def save_image(path, array):
  """Writes an image array to `path` (creating its folder)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, size: str):
  """A real tmpfs of `size` at `path`, to fill up (skips the test where mounting is not allowed)."""
  path.mkdir(parents=True, exist_ok=True)
  if os.geteuid() != 0 or not shutil.which("mount"):
    pytest.skip("mounting a tmpfs needs root")
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)
