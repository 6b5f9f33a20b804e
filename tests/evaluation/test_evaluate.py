"""Tests of bin/evaluate.py: exit codes, per-file problems, CSV output, in-memory fusion."""

import csv
import json

import numpy as np
import pytest
from conftest import load_script
from PIL import Image

from mmdrfuse_jax.evaluation import scoring

evaluate_cli = load_script("evaluate")

SIZE = (48, 44)  # (height, width); one compile for the whole module


def _write(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  rng = np.random.default_rng(0)
  h, w = SIZE
  for stem in ("a", "b", "c"):
    _write(root / "ir" / f"{stem}.png", rng.integers(0, 256, (h, w), dtype=np.uint8))
    _write(root / "vis" / f"{stem}.jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    _write(root / "fused" / f"{stem}.png", rng.integers(0, 256, (h, w), dtype=np.uint8))
  return root


def _run(capsys, *argv):
  code = evaluate_cli.main([str(a) for a in argv] + ["--no_progress"])
  out, err = capsys.readouterr()
  return code, out, err


def test_clean_run_writes_csv(folders, tmp_path, capsys):
  out_csv = tmp_path / "sub" / "scores.csv"
  code, out, err = _run(capsys, "--ir", folders / "ir", "--vis", folders / "vis",
                        "--fused", folders / "fused", "--csv", out_csv)
  assert code == 0, err
  assert "EN" in out and "mean (3 images)" in out
  with open(out_csv, newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["name", "EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "CC",
                     "PSNR"]
  assert [r[0] for r in rows[1:]] == ["a", "b", "c"]
  assert not list(out_csv.parent.glob(".*.tmp"))


def test_problems_reported_rest_scored(folders, tmp_path, capsys):
  root = tmp_path / "broken"
  for sub in ("ir", "vis", "fused"):
    for p in (folders / sub).iterdir():
      _write(root / sub / p.name, np.asarray(Image.open(p)))
  (root / "fused" / "a.png").unlink()  # missing partner
  _write(root / "fused" / "b.png", np.zeros((50, 44), np.uint8))  # different size
  (root / "ir" / "d.png").write_bytes(b"not an image")  # unreadable ...
  _write(root / "vis" / "d.png", np.zeros(SIZE, np.uint8))
  _write(root / "fused" / "d.png", np.zeros(SIZE, np.uint8))
  out_csv = tmp_path / "scores.csv"
  code, out, err = _run(capsys, "--ir", root / "ir", "--vis", root / "vis",
                        "--fused", root / "fused", "--csv", out_csv, "--metrics", "en,SD,mi",
                        "--format", "json")
  assert code == 1
  assert "a.png" in err and "no partner" in err
  assert "b.png" in err and "different sizes" in err
  assert "d.png" in err and "cannot read" in err
  assert "Traceback" not in err
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["images"] == 1 and list(summary["means"]) == ["EN", "SD", "MI"]
  with open(out_csv, newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["name", "EN", "SD", "MI"] and [r[0] for r in rows[1:]] == ["c"]


def test_user_errors_exit_2(folders, tmp_path, capsys):
  code, _, err = _run(capsys, "--ir", tmp_path / "nope", "--vis", folders / "vis",
                      "--fused", folders / "fused")
  assert code == 2 and "no such folder" in err
  code, _, err = _run(capsys, "--ir", folders / "ir", "--vis", folders / "vis",
                      "--fused", folders / "fused", "--metrics", "EN,NOPE")
  assert code == 2 and "NOPE" in err
  code, _, err = _run(capsys, "--ir", folders / "ir", "--vis", folders / "vis",
                      "--weights", tmp_path / "w.model")
  assert code == 2 and "w.model" in err


def test_markdown_and_csv_formats(folders, capsys):
  for fmt, marker in (("markdown", "| mean (3 images) |"), ("csv", "mean,")):
    code, out, _ = _run(capsys, "--ir", folders / "ir", "--vis", folders / "vis",
                        "--fused", folders / "fused", "--format", fmt)
    assert code == 0 and marker in out


def test_weights_match_fused_files(shared, tmp_path, capsys):
  """Fusing in memory scores exactly like the fused files the published student wrote."""
  data = shared / "data" / "MRI_PET"
  stems = ("11", "12", "13")
  for sub in ("PET", "MRI"):
    for stem in stems:
      (tmp_path / sub).mkdir(exist_ok=True)
      (tmp_path / sub / f"{stem}.png").write_bytes((data / sub / f"{stem}.png").read_bytes())
  weights = shared / "reference" / "weights" / "student.model"
  mem_csv, file_csv = tmp_path / "mem.csv", tmp_path / "file.csv"
  code, _, err = _run(capsys, "--ir", tmp_path / "PET", "--vis", tmp_path / "MRI",
                      "--weights", weights, "--csv", mem_csv, "--save_fused", tmp_path / "saved")
  assert code == 0, err
  code, _, err = _run(capsys, "--ir", tmp_path / "PET", "--vis", tmp_path / "MRI",
                      "--fused", tmp_path / "saved", "--csv", file_csv)
  assert code == 0, err
  assert mem_csv.read_text() == file_csv.read_text()
  with open(mem_csv, newline="") as f:
    mem = {r["name"]: r for r in csv.DictReader(f)}
  with open(shared / "reference" / "golden" / "metrics" / "MRI_PET.csv", newline="") as f:
    golden = {r["name"]: r for r in csv.DictReader(f) if r["name"] in stems}
  for stem, row in golden.items():
    for metric, want in row.items():
      if metric != "name":
        assert float(mem[stem][metric]) == pytest.approx(float(want), rel=2e-3,
                                                         abs=2e-3), (stem, metric)


def test_undefined_values_in_every_format(tmp_path):
  """None (undefined) is never a number: excluded from means, counted, empty, null."""
  result = scoring.EvaluationResult(
      names=("EN", "CC", "PSNR"),
      rows=[("a", {"EN": 1.0, "CC": None, "PSNR": None}),
            ("b", {"EN": 3.0, "CC": None, "PSNR": 12.5})],
      problems=[])
  assert result.means() == {"EN": 2.0, "CC": None, "PSNR": 12.5}
  assert result.undefined() == {"EN": 0, "CC": 2, "PSNR": 1}
  summary = json.loads(scoring.format_means(result, "json"))
  assert summary == {"images": 2, "means": {"EN": 2.0, "CC": None, "PSNR": 12.5},
                     "undefined": {"EN": 0, "CC": 2, "PSNR": 1}}
  assert scoring.format_means(result, "csv").splitlines() == [
      "name,EN,CC,PSNR", "mean,2.000000,,12.500000", "undefined,0,2,1"]
  table = scoring.format_means(result, "table").splitlines()
  assert table[1].split() == ["mean", "(2", "images)", "2.00", "n/a", "12.50"]
  assert table[2].split() == ["undefined", "(images)", "0", "2", "1"]
  assert "| undefined (images) | 0 | 2 | 1 |" in scoring.format_means(result, "markdown")
  scoring.write_csv_atomic(tmp_path / "s.csv", result)
  assert (tmp_path / "s.csv").read_text().splitlines()[1:] == ["a,1.000000,,",
                                                               "b,3.000000,,12.500000"]
  assert scoring.defined(float("nan")) is None and scoring.defined(-np.inf) is None
  assert scoring.defined(np.float32(0.5)) == 0.5
  # Without undefined values the output keeps its one-row layout.
  clean = scoring.EvaluationResult(names=("EN",), rows=[("a", {"EN": 1.0})], problems=[])
  assert len(scoring.format_means(clean, "table").splitlines()) == 2
  assert scoring.format_means(clean, "csv") == "name,EN\nmean,1.000000"
