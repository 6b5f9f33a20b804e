"""`bench.py suite`: the prepared benchmark run writes bench.json (schema below) and bench.md."""

import json
import os
import signal

import pytest
from conftest import load_script

from mmdrfuse_jax.benchmarks import suite


def test_suite_items_cover_the_issue():
  names = [name for name, _ in suite.items(reduced=False)]
  for model in ("student", "teacher"):
    for size in ("640x480", "1280x1024"):
      for batch in ("b1", "b32"):
        assert f"infer-{model}-{size}-{batch}" in names
    for mode in ("exact", "default", "bfloat16"):
      assert f"train-step-{model}-{mode}" in names
  for size in ("640x480", "1280x1024"):
    assert f"infer-student-{size}-8bit-b1" in names
  assert "metrics" in names and "pipeline" in names
  # The reduced suite: the same items at tiny sizes.
  reduced = [name.replace("64x48", "640x480").replace("128x96", "1280x1024").replace("b4", "b32")
             for name, _ in suite.items(reduced=True)]
  assert reduced == names


def test_suite_writes_json_and_markdown(tmp_path, capsys):
  bench = load_script("bench")
  assert bench.main(["suite", "--reduced", "--out", str(tmp_path),
                     "--only", "infer-student-64x48-b1,nothing-matches-this"]) == 0
  report = json.loads((tmp_path / "bench.json").read_text())
  assert report["schema"] == suite.SCHEMA_VERSION and report["reduced"] is True
  assert report["device"].startswith("cpu") and report["jax"] and report["date"]
  (item,) = report["items"]
  assert item["name"] == "infer-student-64x48-b1" and item["argv"][0] == "infer"
  assert item["result"]["benchmark"] == "infer" and item["result"]["ms_per_image"] > 0
  assert item["seconds"] > 0
  table = (tmp_path / "bench.md").read_text()
  assert report["device"] in table and "| infer-student-64x48-b1 | " in table
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert last == {"benchmark": "suite", "device": report["device"], "failed": [], "items": 1,
                  "out": str(tmp_path)}


def test_sigterm_stops_a_benchmark_in_one_line(tmp_path, capsys, monkeypatch):
  bench = load_script("bench")

  def interrupted(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("the signal should have stopped the benchmark")

  monkeypatch.setattr(bench.infer.common, "time_call", interrupted)
  code = bench.main(["infer", "--height", "48", "--width", "64", "--repeats", "1"])
  assert code == 143
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == "stopped by SIGTERM: infer not finished"


def test_memory_write_times_the_storage_it_names(capsys):
  bench = load_script("bench")
  assert bench.main(["memory-write", "--num_patches", "64", "--batch", "4", "--size", "8",
                     "--repeats", "2"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["benchmark"] == "memory-write" and result["device"].startswith("cpu")
  # "bfloat16" memories are kept as their bits: 64 slots of 8x8, 2 bytes each.
  assert result["storage_dtype"] == "uint16" and result["memory_bytes"] == 64 * 8 * 8 * 2
  assert result["runs"] == 2 and result["ms_per_write"] > 0
  with pytest.raises(SystemExit, match="--batch 8 must be between 1 and --num_patches 4"):
    bench.main(["memory-write", "--num_patches", "4", "--batch", "8"])


def test_the_8bit_path_is_timed_beside_the_float_path_and_host_quantize(tmp_path):
  bench = load_script("bench")
  assert bench.main(["suite", "--reduced", "--out", str(tmp_path),
                     "--only", "infer-student-64x48-8bit-b1"]) == 0
  (item,) = json.loads((tmp_path / "bench.json").read_text())["items"]
  result = item["result"]
  assert result["levels"] == 8 and result["ms_per_image"] > 0
  assert result["float_then_host_quantize_ms_per_image"] > 0
  assert result["bound_bytes_per_image"] == 3 * 48 * 64  # One byte a pixel.
  assert "then quantized on the host" in (tmp_path / "bench.md").read_text()
