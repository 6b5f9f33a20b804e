"""The reproduction recipe: data, student and comparison, resumable; its command line.

A tiny recipe (a procedural 32x32 pair on disk, 16x16 patches, no VGG-19 terms, a given random
teacher) distils a student and compares it with a reference on two test sets.
"""

import dataclasses
import json
import os
import pathlib
import shutil
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


def test_a_copied_workdir_continues_there(done, recipe, tmp_path):
  # The run records keep the recipe's data folder relative to the stage: a copy elsewhere (a
  # bigger disk, another mount point) is the same run.
  workdir, _, _ = done
  shutil.copytree(workdir, tmp_path / "copy")
  lines = []
  outcome = reproduce.run(recipe, tmp_path / "copy", log=lines.append)
  assert outcome.finished and outcome.results == tmp_path / "copy" / "results.md"
  assert not any(line.startswith("step ") for line in lines)  # Nothing trained again.
  assert any(f"resumed from {tmp_path / 'copy' / 'student' / 'checkpoints'}" in line
             for line in lines), lines
  record = json.loads((tmp_path / "copy" / "student" / "run.json").read_text())
  assert record["identity"]["data.data_dir"] == "../data"


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


@pytest.fixture
def unbuilt(tmp_path, monkeypatch, teacher_file):
  """A tiny recipe whose data must not be built: `prepare.prepare` fails the test."""
  from mmdrfuse_jax.data import prepare

  def build(*args, **kwargs):
    raise AssertionError("the data was built before the recipe's files were checked")

  monkeypatch.setattr(prepare, "prepare", build)
  synthetic.write_pairs(tmp_path / "train", 1, 32, 32, seed=0)
  synthetic.write_pairs(tmp_path / "test", 1, 48, 48, seed=1)
  return reproduce.Recipe(
      student=_tiny_student(), teacher=None, teacher_weights=str(teacher_file),
      dataset="paired_folders", manual_dir=str(tmp_path / "train"),
      tests=[reproduce.TestSet("t", tmp_path / "test" / "ir", tmp_path / "test" / "vi")],
      metrics=METRICS)


def _with_vgg(config, vgg_weights):
  config.loss.w_percep = 2.0  # A term that reads VGG-19.
  config.vgg_weights = vgg_weights
  return config


@pytest.mark.parametrize("case", ["student vgg", "no vgg", "teacher vgg", "teacher weights",
                                  "test pairs", "reference"])
def test_missing_files_are_found_before_any_work(unbuilt, tmp_path, case):
  # The reported case: a missing vgg19.npz was reported after the whole dataset was built.
  missing = str(tmp_path / "vgg19.npz")
  recipe = unbuilt
  if case == "student vgg":
    recipe.student = _with_vgg(recipe.student, missing)
    expected = f"student: {missing}: VGG-19 weights not found"
  elif case == "no vgg":
    recipe.student = _with_vgg(recipe.student, "")
    expected = "student: no VGG-19 weights: set --config.vgg_weights=FILE.npz"
  elif case == "teacher vgg":
    recipe.teacher = _with_vgg(default.get_config("teacher"), missing)
    recipe.teacher_weights = ""
    expected = f"teacher: {missing}: VGG-19 weights not found"
  elif case == "teacher weights":
    recipe.teacher_weights = str(tmp_path / "teacher.model")
    expected = f"student: {tmp_path / 'teacher.model'}"
  elif case == "test pairs":
    synthetic.write_pairs(tmp_path / "unpaired", 2, 48, 48, seed=2)
    (tmp_path / "unpaired" / "vi" / "0000.png").unlink()  # 0000 and 0001 without partners.
    (tmp_path / "unpaired" / "ir" / "0001.png").unlink()
    recipe.tests = [*recipe.tests, reproduce.TestSet("unpaired", tmp_path / "unpaired" / "ir",
                                                     tmp_path / "unpaired" / "vi")]
    expected = f"--test unpaired: no pairs in {tmp_path / 'unpaired' / 'ir'} and"
  else:
    (tmp_path / "published.model").write_bytes(b"not weights")
    recipe.references = [reproduce.Reference("published", tmp_path / "published.model")]
    expected = f"--reference published: {tmp_path / 'published.model'}"
  with pytest.raises(reproduce.InputError) as info:
    reproduce.run(recipe, tmp_path / "w", log=lambda *_: None)
  assert "\n" not in str(info.value) and str(info.value).startswith(expected), str(info.value)
  assert not (tmp_path / "w").exists()


def test_cli_reports_a_missing_vgg_before_building_in_one_line(unbuilt, tmp_path, monkeypatch,
                                                              capsys, teacher_file):
  from conftest import load_script

  from mmdrfuse_jax.runtime import cli

  def leave(message):  # In-process: not os._exit.
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)

  monkeypatch.setattr(cli, "exit_after_error", leave)
  code = load_script("reproduce").main([
      f"--workdir={tmp_path / 'w'}", "--dataset=paired_folders",
      f"--manual_dir={tmp_path / 'train'}", f"--config={REPO / 'configs' / 'student.py'}",
      f"--config.vgg_weights={tmp_path / 'vgg19.npz'}", f"--teacher_weights={teacher_file}",
      f"--test=t={tmp_path / 'test' / 'ir'},{tmp_path / 'test' / 'vi'}"])
  err = capsys.readouterr().err
  assert code == 2, err
  assert err.startswith(f"error: student: {tmp_path / 'vgg19.npz'}: VGG-19 weights not found")
  assert err.count("\n") == 1 and not (tmp_path / "w").exists()
