"""The package's shape: its layering, its front door, and what an installed wheel needs."""

import ast
import doctest
import importlib
import pathlib
import subprocess
import sys

import pytest

import mmdrfuse_jax

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mmdrfuse_jax"

# Each part may import its own modules and those of lower layers, never a higher one.
LAYERS = {
    "errors": 0, "io": 0, "runtime": 0,
    "models": 1,
    "data": 2, "inference": 2,
    "evaluation": 3,
    "train": 4,
    "configs": 5, "benchmarks": 5, "reproduce": 5,
    "tools": 6,
}


def _modules() -> dict[str, pathlib.Path]:
  found = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(REPO).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    found[name] = path
  return found


def _imports(path: pathlib.Path, modules) -> set[str]:
  """The package's modules that `path` imports, at the top or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
        node.module.split(".")[0] == "mmdrfuse_jax"):
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        found.add(sub if sub in modules else node.module)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.split(".")[0] == "mmdrfuse_jax")
    elif isinstance(node, ast.ImportFrom) and node.level:
      raise AssertionError(f"{path}: relative import (the package uses absolute ones)")
  return found


def _part(module: str) -> str:
  return module.split(".")[1]


def test_every_part_has_a_layer():
  parts = {_part(m) for m in _modules() if m != "mmdrfuse_jax"}
  assert parts == set(LAYERS), "a new subpackage or flat module needs its place in LAYERS"


def test_no_module_imports_a_higher_layer():
  modules = _modules()
  upward = []
  for name, path in modules.items():
    if name == "mmdrfuse_jax":
      continue  # The front door: its imports are lazy (or for type checkers only).
    for target in _imports(path, modules):
      if target == "mmdrfuse_jax":
        upward.append(f"{name} -> the front door (import the defining module instead)")
      elif LAYERS[_part(target)] > LAYERS[_part(name)]:
        upward.append(f"{name} -> {target}")
  assert not upward, upward


def test_no_import_cycles():
  modules = _modules()
  graph = {name: {t for t in _imports(path, modules) if t != "mmdrfuse_jax" and t != name}
           for name, path in modules.items() if name != "mmdrfuse_jax"}
  # A module's package __init__ runs before it: count that edge too.
  for name in graph:
    parent = name.rsplit(".", 1)[0]
    if parent in graph and parent != name:
      graph[name].add(parent)
  state: dict[str, int] = {}

  def visit(node, stack):
    state[node] = 1
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
      if nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])


def test_few_flat_modules():
  flat = sorted(p.name for p in PACKAGE.glob("*.py"))
  assert len(flat) <= 8, flat


def test_import_does_not_import_jax():
  code = ("import sys, mmdrfuse_jax; "
          "print(sorted(m for m in ('jax', 'flax', 'optax', 'numpy') if m in sys.modules))")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=60, check=True)
  assert done.stdout.strip() == "[]"


def test_front_door_names():
  assert set(mmdrfuse_jax.__all__) == {"__version__", *mmdrfuse_jax._LAZY}  # pylint: disable=protected-access
  assert {"fuse", "Fuser", "load_params", "save_params", "Student", "Teacher", "evaluate",
          "export_onnx", "export_stablehlo", "train_model", "MMDRFuseError"} <= set(
              mmdrfuse_jax.__all__)
  for name in mmdrfuse_jax.__all__:
    assert getattr(mmdrfuse_jax, name) is not None, name
  from mmdrfuse_jax.inference import fusion
  assert mmdrfuse_jax.fuse is fusion.fuse
  with pytest.raises(AttributeError, match="no attribute 'fusee'"):
    mmdrfuse_jax.fusee  # noqa: B018  pylint: disable=pointless-statement


def test_every_error_class_derives_from_the_base():
  for name in _modules():
    importlib.import_module(name)
  ours = [cls for name, module in sys.modules.items() if name.startswith("mmdrfuse_jax")
          for cls in vars(module).values()
          if isinstance(cls, type) and issubclass(cls, Exception) and cls.__name__.endswith("Error")
          and cls.__module__.startswith("mmdrfuse_jax") and not cls.__name__.startswith("_")]
  assert len(ours) >= 13
  strays = [c.__qualname__ for c in ours if not issubclass(c, mmdrfuse_jax.MMDRFuseError)]
  assert not strays, strays


def test_version_is_written_once():
  assert mmdrfuse_jax.__version__ == "0.2.0"
  assert "version =" not in (REPO / "pyproject.toml").read_text().split("[tool.setuptools")[0]


def test_typed_and_no_sys_path_edits():
  assert (PACKAGE / "py.typed").exists()
  edits = [str(p.relative_to(REPO)) for folder in ("mmdrfuse_jax", "bin", "configs")
           for p in (REPO / folder).rglob("*.py") if "sys.path" in p.read_text()]
  assert not edits, edits


# fusion's examples run on 8 devices in tests/inference/test_fusion.py.
_EXAMPLES = sorted(name for name, path in _modules().items()
                   if ">>>" in path.read_text() and name != "mmdrfuse_jax.inference.fusion")


@pytest.mark.parametrize("module", _EXAMPLES)
def test_docstring_examples(module):
  results = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
  assert results.attempted and not results.failed
