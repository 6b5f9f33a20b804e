"""Shared test fixtures.

Reference material lives outside the repository (`$MMDRFUSE_SHARED`, default `../shared`
from the repo root); tests that need it skip, saying why, where it is absent.
"""

import importlib.util
import os
import pathlib

import jax
import pytest
from PIL import Image

from mmdrfuse_jax import checkpoints, models

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


def load_script(name: str):
  """Imports `bin/<name>.py` as a module, so tests call its `main(argv)` in-process."""
  spec = importlib.util.spec_from_file_location(f"bin_{name}", REPO_ROOT / "bin" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """A freshly initialised student's weights file (`student.npz`)."""
  path = tmp_path_factory.mktemp("w") / "student.npz"
  checkpoints.save_params(path, models.init_params("student", jax.random.key(0)))
  return path


def save_image(path, array):
  """Writes an image array to `path` (creating its folder)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)
