"""Validation curves: reading runs' metrics.jsonl, the SVG figure, bin/plot_validation.py."""

import json

import pytest
from conftest import load_script

from mmdrfuse_jax.evaluation import curves

plot_validation = load_script("plot_validation")


def _run(folder, rows):
  folder.mkdir(parents=True)
  (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return folder


@pytest.fixture
def runs(tmp_path):
  a = _run(tmp_path / "a", [
      {"step": 5, "loss": 1.0},
      {"step": 10, "val/VIF": 0.2, "val/Qabf": 0.1, "val/seconds": 3.0},
      {"step": 20, "val/VIF": 0.3, "val/Qabf": 0.2, "val/seconds": 2.0},
      {"step": 10, "val/VIF": 0.25, "val/Qabf": 0.15, "val/seconds": 2.5},  # resumed: kept
  ])
  b = _run(tmp_path / "b", [{"step": 30, "val/VIF": 0.5, "val/seconds": 1.0}])
  return a, b


def test_read_validation_keeps_the_last_row_of_a_step(runs):
  a, b = runs
  assert curves.read_validation(a) == {"VIF": [(10, 0.25), (20, 0.3)],
                                       "Qabf": [(10, 0.15), (20, 0.2)]}
  assert curves.read_validation(b) == {"VIF": [(30, 0.5)]}


def test_plot_is_an_svg_that_depends_only_on_the_scores(runs):
  a, b = runs
  data = {"a": curves.read_validation(a), "b": curves.read_validation(b)}
  svg = curves.plot(data, ["VIF", "Qabf"], references={"ref": {"VIF": 0.4}}, title="t")
  assert svg.startswith(b"<?xml") and b"<svg" in svg
  assert svg == curves.plot(data, ["VIF", "Qabf"], references={"ref": {"VIF": 0.4}}, title="t")
  assert svg != curves.plot(data, ["VIF", "Qabf"], references={"ref": {"VIF": 0.41}}, title="t")


def test_parse_reference():
  assert curves.parse_reference("published = VIF:0.61, Qabf:0.43") == (
      "published", {"VIF": 0.61, "Qabf": 0.43})
  for bad in ("published", "=VIF:1", "p=VIF", "p=VIF:x", "p=:1"):
    with pytest.raises(curves.CurvesError, match="expected NAME=METRIC:VALUE"):
      curves.parse_reference(bad)


def test_cli_writes_the_figure(runs, tmp_path, capsys):
  a, b = runs
  out = tmp_path / "fig" / "curves.svg"
  assert plot_validation.main(["--run", f"a={a}", "--run", f"b={b}", "--reference",
                               "ref=VIF:0.4", "--out", str(out)]) == 0
  assert out.read_bytes().startswith(b"<?xml")
  assert capsys.readouterr().out.strip() == f"wrote {out}: 2 run(s), VIF, Qabf"
  assert [p.name for p in out.parent.iterdir()] == ["curves.svg"]  # no temporary file left


@pytest.mark.parametrize("args, message", [
    (["--run", "a"], "--run 'a': expected NAME=WORKDIR"),
    (["--run", "a={a}", "--run", "a={b}"], "the name 'a' is given twice"),
    (["--run", "x={missing}"], "metrics.jsonl: cannot be read (no such file or folder)"),
    (["--run", "x={empty}"], "holds no validation scores"),
    (["--run", "a={a}", "--metrics", "VIF,nope"], "unknown metric 'nope'"),
])
def test_cli_mistakes_are_one_line(runs, tmp_path, capsys, args, message):
  a, b = runs
  empty = _run(tmp_path / "empty", [{"step": 1, "loss": 2.0}])
  args = [x.format(a=a, b=b, missing=tmp_path / "missing", empty=empty) for x in args]
  assert plot_validation.main(args + ["--out", str(tmp_path / "c.svg")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1
  assert not (tmp_path / "c.svg").exists()
