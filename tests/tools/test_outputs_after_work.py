"""What a tool does when its output cannot be written after the work is done (a full disk),
and outputs that would replace a training run's own files (bin/plot_validation.py)."""

import errno
import json

import numpy as np
import pytest
from conftest import load_script, save_image

from mmdrfuse_jax.evaluation import report, scoring

evaluate_cli = load_script("evaluate")
report_cli = load_script("report")
plot_cli = load_script("plot_validation")

SIZE = 48


def _folders(root):
  rng = np.random.default_rng(0)
  for stem in ("a", "b"):
    for side in ("ir", "vi", "avg"):
      save_image(root / side / f"{stem}.png", rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
  return root


def _full_disk(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


def test_evaluate_prints_the_means_when_the_csv_cannot_be_written(tmp_path, capsys, monkeypatch):
  root = _folders(tmp_path)
  monkeypatch.setattr(scoring, "write_csv_atomic", _full_disk)
  code = evaluate_cli.main(["--ir", str(root / "ir"), "--vis", str(root / "vi"), "--fused",
                            str(root / "avg"), "--metrics", "EN,SD", "--csv",
                            str(tmp_path / "s.csv"), "--format", "json", "--no_progress"])
  out, err = capsys.readouterr()
  assert code == 2
  assert json.loads(out)["images"] == 2  # the work is not lost
  assert "cannot write" in err and "no space left on device" in err and "Traceback" not in err


def test_report_prints_the_means_when_the_page_cannot_be_written(tmp_path, capsys, monkeypatch):
  pytest.importorskip("matplotlib")
  root = _folders(tmp_path)
  monkeypatch.setattr(report, "write_atomic", _full_disk)
  code = report_cli.main(["--ir", str(root / "ir"), "--vis", str(root / "vi"), "--fused",
                          f"avg={root / 'avg'}", "--metrics", "EN,SD", "--out",
                          str(tmp_path / "r.html"), "--no_progress"])
  out, err = capsys.readouterr()
  assert code == 2
  assert "avg (2 images)" in out
  assert "cannot write" in err and "means are printed above" in err
  assert not (tmp_path / "r.html").exists()


def _run_folder(root, rows):
  root.mkdir(parents=True)
  (root / "run.json").write_text('{"model": "student"}')
  (root / "metrics.jsonl").write_bytes(rows if isinstance(rows, bytes) else
                                       "".join(json.dumps(r) + "\n" for r in rows).encode())
  return root


_ROWS = [{"step": 10, "val/VIF": 0.3}, {"step": 20, "val/VIF": 0.4}]


@pytest.mark.parametrize("target", ["metrics.jsonl", "run.json"])
def test_plot_validation_never_replaces_a_run_file(tmp_path, capsys, target):
  run = _run_folder(tmp_path / "run", _ROWS)
  before = (run / target).read_bytes()
  code = plot_cli.main(["--run", f"a={run}", "--out", str(run / target)])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and err.startswith("error: --out")
  assert (run / target).read_bytes() == before


@pytest.mark.parametrize("rows,message", [
    (b'{"step": 1e400, "val/VIF": 0.3}\n', "line 1: not a metrics row"),
    (b'{"step": 1, "val/VIF": 0.3}\n\xff\xfe\n', "not UTF-8 text"),
    (b'{"step": 1, "val/VIF": NaN}\n{"step": 2, "val/VIF": Infinity}\n',
     "holds no finite validation scores"),
])
def test_plot_validation_bad_rows_are_one_line_naming_the_file(tmp_path, capsys, rows, message):
  run = _run_folder(tmp_path / "run", rows)
  code = plot_cli.main(["--run", f"a={run}", "--out", str(tmp_path / "c.svg")])
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
  assert str(run / "metrics.jsonl") in err and message in err
  assert not (tmp_path / "c.svg").exists()


def test_evaluate_takes_teacher_weights_without_model(tmp_path, capsys):
  from conftest import random_params

  from mmdrfuse_jax.models import weight_files
  root = _folders(tmp_path)
  weight_files.save_params(tmp_path / "teacher.npz", random_params("teacher", 0))
  code = evaluate_cli.main(["--ir", str(root / "ir"), "--vis", str(root / "vi"), "--weights",
                            str(tmp_path / "teacher.npz"), "--metrics", "EN", "--format",
                            "json", "--no_progress"])
  out, err = capsys.readouterr()
  assert code == 0, err
  assert json.loads(out)["images"] == 2
