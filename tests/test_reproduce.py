"""The reproduction recipe: data, student and comparison, resumable; its command line.

A tiny recipe (a procedural 32x32 pair on disk, 16x16 patches, no VGG-19 terms, a given random
teacher) distils a student and compares it with a reference on two test sets.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from mmdrfuse_jax import reproduce
from mmdrfuse_jax.configs import default
from mmdrfuse_jax.data import synthetic
from mmdrfuse_jax.models import networks, weight_files

REPO = pathlib.Path(__file__).resolve().parents[1]

METRICS = ("VIF", "Qabf", "SSIM")


def _tiny_student():
  # tests/test_validation.py's training settings: the same programs, so that when both modules
  # run in one test session the second finds them in the persistent compilation cache.
  config = default.get_config("student")
  config.data.patch_size = config.data.patch_stride = 16  # 1 pair of 32x32: 4 patches.
  config.batch_size = 2
  config.num_epochs = 2
  config.loss.w_percep = 0.0  # No VGG-19: a cheap step to compile.
  config.refresh.ssim = config.refresh.gmsd = False
  config.optim.lr = 3e-2
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1
  config.progress_bar = False
  return config


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
  root = tmp_path_factory.mktemp("pairs")
  synthetic.write_pairs(root / "train", 1, 32, 32, seed=0)
  synthetic.write_pairs(root / "test", 2, 48, 48, seed=1)
  teacher = root / "teacher.npz"  # A given teacher: the teacher stage is covered by test_faults.
  weight_files.save_params(teacher, networks.init_params("teacher", jax.random.PRNGKey(3)))
  reference = root / "reference.npz"
  weight_files.save_params(reference, networks.init_params("student", jax.random.PRNGKey(5)))
  test = reproduce.parse_test(f"procedural={root / 'test' / 'ir'},{root / 'test' / 'vi'}")
  return reproduce.Recipe(
      student=_tiny_student(), teacher=None, teacher_weights=str(teacher),
      dataset="paired_folders", manual_dir=str(root / "train"),
      tests=[test, dataclasses.replace(test, name="again")],
      references=[reproduce.parse_reference(f"random={reference}")], metrics=METRICS,
      argv=["bin/reproduce.py", "..."])


@pytest.fixture(scope="module")
def done(recipe, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("repro")
  lines = []
  outcome = reproduce.run(recipe, workdir, log=lines.append)
  return workdir, outcome, lines


def test_all_stages_run_and_the_table_compares_every_model(done, recipe):
  workdir, outcome, lines = done
  assert outcome.finished and outcome.results == workdir / "results.md"
  assert [line for line in lines if line.startswith("== ")] == [
      f"== data: paired_folders from {recipe.manual_dir}",
      f"== student: {workdir / 'student'}",
      "== comparison on procedural: student, random",
      "== comparison on again: student, random"]
  record = json.loads((workdir / "results.json").read_text())
  rows = {(r["test"], r["method"]): r for r in record["rows"]}
  assert set(rows) == {(t, m) for t in ("procedural", "again")
                       for m in ("student", "random")}
  for row in rows.values():
    assert row["images"] == 2 and all(row[n] is not None for n in METRICS)
    assert row["VIF / random"] == pytest.approx(
        row["VIF"] / rows[(row["test"], "random")]["VIF"])
  assert rows[("again", "student")]["VIF"] == rows[("procedural", "student")]["VIF"]
  assert record["stages"]["student"]["steps"] == 4 and "teacher" not in record["stages"]
  table = (workdir / "results.md").read_text()
  assert "| test | method | images | VIF | Qabf | SSIM | VIF / random | Qabf / random |" in table
  assert (workdir / "report_procedural.html").stat().st_size > 10_000
  assert sorted(p.name for p in (workdir / "fused" / "procedural" / "student").iterdir()) == [
      "0000.png", "0001.png"]


def test_a_rerun_continues_and_does_not_train_again(done, recipe):
  workdir, _, _ = done
  before = json.loads((workdir / "results.json").read_text())["rows"]
  lines = []
  outcome = reproduce.run(recipe, workdir, log=lines.append)
  assert outcome.finished
  assert not any(line.startswith("step ") for line in lines)  # Both runs were complete.
  assert json.loads((workdir / "results.json").read_text())["rows"] == before


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "bin/reproduce.py", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_mistakes_are_one_line(tmp_path):
  base = [f"--workdir={tmp_path / 'w'}", "--dataset=roadscene", f"--manual_dir={tmp_path}",
          "--config=configs/student.py", "--teacher_weights=t.model"]
  for extra, expected in [
      (["--test=x"], "expected NAME=IR_DIR,VIS_DIR"),
      ([f"--test=t={tmp_path}/no,{tmp_path}"], "no such folder"),
      ([f"--test=t={tmp_path},{tmp_path}", "--reference=r=/nope.npz"], "no such weights file"),
      ([f"--test=t={tmp_path},{tmp_path}", "--config.batchsize=3"], "did you mean 'batch_size'"),
      ([f"--test=t={tmp_path},{tmp_path}", "--config=nope.py"], "--config=nope.py: no such"),
      ([f"--test=t={tmp_path},{tmp_path}", "--teacher_config=nope.py"],
       "either --teacher_config=configs/teacher.py"),
  ]:
    proc = _cli(*base, *extra)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and expected in proc.stderr, proc.stderr
  assert not (tmp_path / "w").exists()
