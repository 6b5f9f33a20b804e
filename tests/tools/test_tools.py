"""Every command-line tool: a console script, a `bin/` shim, and a `--help` that exits 0."""

import importlib
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TOOLS = sorted(p.stem for p in (REPO / "mmdrfuse_jax" / "tools").glob("*.py")
               if p.stem != "__init__")


def test_every_tool_is_a_console_script_and_a_bin_shim():
  tomllib = pytest.importorskip("tomllib", reason="tomllib is new in Python 3.11")
  scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
  assert scripts == {f"mmdrfuse-{t.replace('_', '-')}": f"mmdrfuse_jax.tools.{t}:main"
                     for t in TOOLS}
  assert sorted(p.stem for p in (REPO / "bin").glob("*.py")) == TOOLS
  for tool in TOOLS:  # A shim only runs the tool: no flags, no logic of its own.
    shim = (REPO / "bin" / f"{tool}.py").read_text()
    assert f"from mmdrfuse_jax.tools.{tool} import main" in shim
    assert "argparse" not in shim and "sys.path" not in shim


@pytest.mark.parametrize("tool", TOOLS)
def test_help_exits_0(tool, capsys):
  main = importlib.import_module(f"mmdrfuse_jax.tools.{tool}").main
  try:
    code = main(["--help"])
  except SystemExit as e:  # argparse's own --help action
    code = e.code
  assert code in (0, None)
  out = capsys.readouterr().out
  assert "usage:" in out and "--help" in out


def test_bin_shim_runs_the_tool():
  done = subprocess.run([sys.executable, "bin/train.py", "--help"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith("usage: mmdrfuse-train")


def test_unknown_flag_is_one_line_exit_2(capsys):
  train = importlib.import_module("mmdrfuse_jax.tools.train")
  assert train.main(["--config=configs/student.py", "--workdir=/nonexistent", "--work=x"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: unexpected arguments: --work=x")


def test_output_choices_are_the_library_modes():
  import argparse

  from mmdrfuse_jax.inference import fusion
  from mmdrfuse_jax.runtime import cli
  parser = argparse.ArgumentParser()
  cli.add_output_arguments(parser)
  choices = next(a.choices for a in parser._actions if a.dest == "output")  # pylint: disable=protected-access
  assert tuple(choices) == fusion.OUTPUT_MODES
