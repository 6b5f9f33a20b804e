"""Ablation grids (train/ablation.py, bin/ablate.py): each row trains as bin/train.py would,
the table holds what the runs logged, a rerun resumes without training finished rows, and
mistakes are one line before any row trains.

One tiny grid (two rows of 4 student steps on a procedural pair, random teacher, no VGG-19)
is run once; the tests read what it wrote.
"""

import json
import pathlib
import textwrap

import numpy as np
import pytest

from mmdrfuse_jax.runtime import config_flags
from mmdrfuse_jax.tools import ablate
from mmdrfuse_jax.train import ablation

GRID = textwrap.dedent('''
    from mmdrfuse_jax.configs import default

    def _base():
      config = default.get_config("student")
      config.data.synthetic_pairs = 1
      config.data.synthetic_height = config.data.synthetic_width = 32
      config.data.patch_size = config.data.patch_stride = 16  # 4 patches, 2 steps an epoch.
      config.batch_size = 2
      config.num_epochs = 2
      config.optim.lr = 3e-2
      config.loss.w_percep = 0.0
      config.refresh.ssim = config.refresh.gmsd = False
      config.progress_bar = False
      config.checkpoint_every_steps = 2
      v = config.validation
      v.synthetic_pairs, v.synthetic_height, v.synthetic_width = 1, 48, 48
      v.every_steps, v.metrics, v.num_images = 2, "VIF,SSIM", 0
      return config

    def get_grid(rows="both"):
      grid = {"base": _base(), "lr_small": _base()}
      grid["lr_small"].optim.lr = 1e-3
      if rows == "bad":
        grid["lr_small"].validation.best_metric = "Qabf"  # Not a validation metric.
      if rows == "bad_first":
        grid["base"].validation.best_metric = "Qabf"
      return grid
''')


def _grid_file(folder: pathlib.Path) -> pathlib.Path:
  path = folder / "grid.py"
  path.write_text(GRID)
  return path


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory, teacher_file):
  folder = tmp_path_factory.mktemp("ablation")
  grid = _grid_file(folder)
  argv = [f"--grid={grid}", f"--workdir={folder / 'runs'}",
          f"--grid.teacher_weights={teacher_file}"]
  assert ablate.main(argv) == 0
  return folder / "runs", argv


def _last_validation(run_dir):
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if "val/VIF" in r][-1]


@pytest.mark.slow
def test_table_holds_what_each_run_logged(grid_run):
  workdir, _ = grid_run
  summary = json.loads((workdir / ablation.SUMMARY_JSON).read_text())
  assert [r["name"] for r in summary["rows"]] == ["base", "lr_small"]
  base, small = summary["rows"]
  assert base["changes"] == {} and small["changes"] == {"optim.lr": 1e-3}
  for row in summary["rows"]:
    logged = _last_validation(workdir / row["name"])
    assert row["finished"] and row["step"] == logged["step"] == 4
    assert row["scores"]["VIF"] == logged["val/VIF"]
    assert row["scores"]["SSIM"] == logged["val/SSIM"]
    assert (workdir / row["name"] / "student.npz").is_file() and row["wall_s"] > 0
  # The two learning rates train different students: the table tells them apart.
  assert base["scores"]["VIF"] != small["scores"]["VIF"]
  table = (workdir / ablation.SUMMARY_MD).read_text()
  assert "| Row | Changes against the first row | Step | VIF | SSIM | DeadUnits | Floor |" in table
  assert "| lr_small | `optim.lr=0.001` | 4 |" in table
  assert "| base | (first row) | 4 |" in table
  assert summary["device"] in table


@pytest.mark.slow
def test_rows_share_their_teacher_targets(grid_run):
  """Both rows distil from the same teacher on the same patches: one store in the grid's
  folder holds the targets of every patch, and each row's config names it."""
  workdir, _ = grid_run
  (store,) = (workdir / ablation.TEACHER_TARGETS).rglob("*.npy")
  assert np.load(store, mmap_mode="r")["digest"].any(axis=1).tolist() == [True] * 4
  for name in ("base", "lr_small"):
    config = json.loads((workdir / name / "config.json").read_text())
    assert config["teacher_cache_dir"] == str(workdir / ablation.TEACHER_TARGETS)


@pytest.mark.slow
def test_rerun_resumes_without_training_finished_rows(grid_run):
  workdir, argv = grid_run
  before = {n: (workdir / n / "metrics.jsonl").read_bytes() for n in ("base", "lr_small")}
  walls = [r["wall_s"] for r in json.loads((workdir / ablation.SUMMARY_JSON).read_text())["rows"]]
  assert ablate.main(argv) == 0
  after = json.loads((workdir / ablation.SUMMARY_JSON).read_text())["rows"]
  for name, log in before.items():
    assert (workdir / name / "metrics.jsonl").read_bytes() == log  # Nothing trained again.
  assert all(r["wall_s"] >= w for r, w in zip(after, walls))  # Wall times add up.
  # Training one row keeps the other in the table, as it was.
  assert ablate.main(argv + ["--rows=lr_small"]) == 0
  again = json.loads((workdir / ablation.SUMMARY_JSON).read_text())["rows"]
  assert [r["name"] for r in again] == ["base", "lr_small"]
  assert again[0]["scores"] == after[0]["scores"] and again[0]["finished"]
  assert again[0]["wall_s"] == after[0]["wall_s"]


@pytest.mark.slow
def test_stop_at_step_compares_rows_early_and_a_rerun_goes_on(tmp_path, teacher_file):
  grid = _grid_file(tmp_path)
  argv = [f"--grid={grid}", f"--workdir={tmp_path / 'runs'}",
          f"--grid.teacher_weights={teacher_file}"]
  assert ablate.main(argv + ["--stop_at_step=2"]) == 0
  rows = json.loads((tmp_path / "runs" / ablation.SUMMARY_JSON).read_text())["rows"]
  assert [(r["step"], r["finished"]) for r in rows] == [(2, False), (2, False)]
  assert "(unfinished)" in (tmp_path / "runs" / ablation.SUMMARY_MD).read_text()
  assert ablate.main(argv) == 0
  rows = json.loads((tmp_path / "runs" / ablation.SUMMARY_JSON).read_text())["rows"]
  assert [(r["step"], r["finished"]) for r in rows] == [(4, True), (4, True)]


def test_mistakes_are_one_line_before_any_row_trains(tmp_path, teacher_file, capsys):
  grid = _grid_file(tmp_path)
  workdir = tmp_path / "runs"
  common = [f"--workdir={workdir}", f"--grid.teacher_weights={teacher_file}"]
  cases = [
      ([f"--grid={grid}:bad"], "row lr_small: config.validation.best_metric='Qabf'"),
      ([f"--grid={grid}", "--rows=base,nope"], "--rows: no row 'nope'"),
      # Not trained, but its validation names the table's columns.
      ([f"--grid={grid}:bad_first", "--rows=lr_small"], "row base: config.validation.best_metric"),
      ([f"--grid={grid}", "--grid.optim.lrr=1"], "no field 'lrr' in the config; did you mean"),
      ([f"--grid={tmp_path / 'missing.py'}"], "no such config file"),
  ]
  cases.append(([f"--grid={grid}", "--stop_at_step=x"], "--stop_at_step: invalid int value"))
  for argv, message in cases:
    assert ablate.main(argv + common) == 2, message
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
  assert not workdir.exists()  # The bad row was found before the good one trained.


def test_load_grid_refuses_what_is_not_a_grid(tmp_path):
  cases = {
      "def get_config():\n  return 1\n": "has no get_grid()",
      "def get_grid():\n  return []\n": "non-empty mapping",
      "import ml_collections\ndef get_grid():\n  return {'a/b': ml_collections.ConfigDict()}\n":
          "not usable as a folder name",
      "def get_grid():\n  return {'a': {'lr': 1}}\n": "not a ConfigDict",
      "def get_grid():\n  raise KeyError('x')\n": "KeyError",
  }
  for number, (text, message) in enumerate(cases.items()):
    path = tmp_path / f"grid{number}.py"
    path.write_text(text)
    with pytest.raises(config_flags.ConfigError, match=message):
      config_flags.load_grid(str(path))


def test_summary_picks_the_best_by_the_metrics_direction(tmp_path):
  rows = [{"step": 1, "val/VIF": 0.5, "val/Floor": 0.2, "val/DeadUnits": 0.3},
          {"step": 2, "loss": 1.0},
          {"step": 2, "val/VIF": 0.7, "val/Floor": 0.1, "val/DeadUnits": 0.0},
          {"step": 3, "val/VIF": 0.6, "val/Floor": 0.3, "val/DeadUnits": 0.1}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  r = ablation.summarize("x", {"optim.lr": 0.1}, tmp_path, finished=True, wall_s=60.0)
  assert r.step == 3 and r.scores == {"VIF": 0.6, "Floor": 0.3, "DeadUnits": 0.1}
  # Floor and DeadUnits: smaller is better.
  assert r.best == {"VIF": (2, 0.7), "Floor": (2, 0.1), "DeadUnits": (2, 0.0)}
  table = ablation.to_markdown([r], device="cpu", date="2026-12-03", order=("VIF",))
  assert "| x | `optim.lr=0.1` | 3 | 0.600 | 0.100 | 0.300 | 0.700 (2) | 1.0 min |" in table
  table = ablation.to_markdown([r], device="cpu", date="2026-12-03", order=("Floor", "VIF"))
  assert "| x | `optim.lr=0.1` | 3 | 0.300 | 0.600 | 0.100 | 0.100 (2) | 1.0 min |" in table
  empty = ablation.summarize("y", {}, tmp_path / "none", finished=False, wall_s=0.0)
  assert empty.step is None and empty.scores == {}
  assert "| y | (first row) |  |  |  |  |  | (unfinished) |" in ablation.to_markdown(
      [r, empty], device="cpu", date="2026-12-03", order=("VIF",))


def test_the_shipped_grids_load_and_differ_from_their_first_row_as_named():
  from mmdrfuse_jax.train import run_spec

  for spec in ("configs/ablation_multidomain.py", "configs/ablation_multidomain.py:long"):
    grid = config_flags.load_grid(str(pathlib.Path(__file__).parents[2] / spec))
    first = next(iter(grid.values()))
    for name, config in grid.items():
      config = config_flags.apply_overrides(
          config, [("data.data_dir", "/tfds"), ("teacher_weights", "/t.npz")])
      spec_ = run_spec.RunSpec.from_config(config)  # Every row is a valid run.
      assert spec_.validation.datasets == ("roadscene", "llvip")
      changes = ablation.config_changes(first, config)
      assert set(changes) <= {"data.data_dir", "teacher_weights", "optim.lr", "init.conv1_bias",
                              "loss.perception", "loss.w_percep", "data.augment.enabled",
                              "data.dataset", "data.weights", "num_epochs", "loss.w_grad",
                              "loss.w_int", "loss.w_distill", "loss.w_alive", "optim.schedule",
                              "optim.warmup_steps",
                              "data.augment.per_patch"}, name


def test_the_multidomain_config_trains_the_shipped_row():
  # weights/student.npz is this row's run (docs/domains.md): the config that README and docs
  # point to must train the same thing; only logging and how validation is named may differ
  # (validation.datasets "" is the training datasets: the same pairs).
  from mmdrfuse_jax.configs import ablation_multidomain, student_multidomain

  row = ablation_multidomain.get_grid("long")[
      "recipe_per_patch_wgrad300000_lr3e-4_alive3_36epochs"]
  changes = ablation.config_changes(row, student_multidomain.get_config())
  assert set(changes) <= {"log_every_steps", "progress_bar", "validation.datasets"}, changes
  assert student_multidomain.get_config().data.dataset == "roadscene,llvip"
