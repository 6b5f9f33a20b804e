"""Exported StableHLO and ONNX files: equal to `fusion.fuse`, runnable alone; the export CLI.

Compilation dominates the time here (a teacher compilation takes seconds on a small CPU), so
every exported file and every reference is made once per module. The student runs at 37x50
and 64x48 (batch 2); the teacher at 37x50 only, which exercises both cases of its any-size
rule (the odd height is padded, the even width is not), and in ONNX at 3x5, its smallest size.
"""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import load_script, save_image
from rounding import assert_equal_up_to_rounding, network_ulps

from mmdrfuse_jax.inference import export, fusion
from mmdrfuse_jax.io import imageio
from mmdrfuse_jax.models import networks, weight_files

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SHAPES = ((2, 37, 50, 1), (2, 64, 48, 1))  # batch 2; odd and even sizes
CASES = [(model, fmt) for model in ("student", "teacher") for fmt in export.FORMATS]
# Each teacher shape costs compilations of seconds (fusion.fuse and the StableHLO file).
TEACHER_SHAPES = SHAPES[:1]

@pytest.fixture(scope="module")
def params():
  """Random weights (scaled like `nn.Conv`'s, biases not zero), made with NumPy: instant,
  where initialising the teacher with Flax runs it eagerly (many seconds)."""
  rng = np.random.default_rng(3)
  trees = {}
  for name in ("student", "teacher"):
    shapes = weight_files.expected_shapes(name)
    trees[name] = {layer: {
        "kernel": (rng.standard_normal(s["kernel"]) / np.sqrt(np.prod(s["kernel"][:3])))
                  .astype(np.float32),
        "bias": (0.1 * rng.standard_normal(s["bias"])).astype(np.float32)}
        for layer, s in shapes.items()}
  return trees


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  return {shape: (rng.random(shape, dtype=np.float32), rng.random(shape, dtype=np.float32))
          for shape in SHAPES}


class _Cache(dict):
  def get_or_make(self, key, make):
    if key not in self:
      self[key] = make()
    return self[key]


@pytest.fixture(scope="module")
def reference(params, images):
  """reference(model, shape): `fusion.fuse` on a test batch, computed once."""
  cache = _Cache()
  return lambda model, shape: cache.get_or_make(
      (model, shape), lambda: np.asarray(fusion.fuse(params[model], *images[shape])))


@pytest.fixture(scope="module")
def exported(params):
  """exported(model, fmt, output): the exported file's bytes, made once."""
  cache = _Cache()
  return lambda model, fmt, output="none": cache.get_or_make(
      (model, fmt, output), lambda: export.export_bytes(params[model], fmt, model, output))


@pytest.fixture(scope="module")
def runner(exported):
  """runner(model, fmt, output): a runner of that file, made once (its compilations kept)."""
  cache = _Cache()
  return lambda model, fmt, output="none": cache.get_or_make(
      (model, fmt, output), lambda: export.load_runner(fmt, exported(model, fmt, output)))


@pytest.mark.slow
@pytest.mark.parametrize("model,fmt", CASES)
def test_export_equals_fuse(model, fmt, runner, images, reference, params):
  for shape in TEACHER_SHAPES if model == "teacher" else SHAPES:
    got = runner(model, fmt)(*images[shape])
    assert got.shape == shape and got.dtype == np.float32
    assert_equal_up_to_rounding(got, reference(model, shape), ulps=network_ulps(params[model]))


# Not the teacher's StableHLO: the JAX output stage is the same function after either network
# (tested with the student), and each teacher file costs seconds of compilation.
@pytest.mark.parametrize("model,fmt", [c for c in CASES if c != ("teacher", "stablehlo")])
def test_minmax_within_one_gray_level(model, fmt, runner, images, reference):
  shape = SHAPES[0]
  got = runner(model, fmt, "minmax")(*images[shape])
  assert got.min() == 0 and got.max() == 1
  max_abs, max_levels = export.compare(got, reference(model, shape), "minmax")
  assert max_abs <= 1e-5 and max_levels <= 1


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_clip_and_constant_images(fmt, runner, images, reference, params):
  shape = SHAPES[1]
  got = runner("student", fmt, "clip")(*images[shape])
  assert_equal_up_to_rounding(got, np.clip(reference("student", shape), 0, 1),
                              ulps=network_ulps(params["student"]))
  # minmax of a constant image is 0, as `fusion.quantize` makes it (no division by zero):
  # conv1 gives 1 everywhere, conv2 then 36.
  constant = {"conv1": {"kernel": np.zeros((3, 3, 2, 4), np.float32),
                        "bias": np.ones(4, np.float32)},
              "conv2": {"kernel": np.ones((3, 3, 4, 1), np.float32),
                        "bias": np.zeros(1, np.float32)}}
  run = export.load_runner(fmt, export.export_bytes(constant, fmt, "student", "minmax"))
  flat = np.zeros((1, 8, 8, 1), np.float32)
  np.testing.assert_array_equal(run(flat, flat), flat)


def test_teacher_smallest_size_and_too_small(runner, params):
  """The teacher takes 3x5: padded to 4x6 (half size 2x3), run, cropped; 2 rows are refused."""
  ir, vis = np.random.default_rng(1).random((2, 1, 3, 5, 1), dtype=np.float32)
  run = runner("teacher", "onnx")  # equal to fusion.fuse at 37x50 (above)

  def pad(x):
    return np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="reflect")

  assert_equal_up_to_rounding(run(ir, vis), run(pad(ir), pad(vis))[:, :3, :5],
                              ulps=network_ulps(params["teacher"]))
  with pytest.raises(ValueError):
    runner("teacher", "stablehlo")(ir[:, :2], vis[:, :2])


def test_onnx_model_is_dynamic_and_described(params):
  onnx = pytest.importorskip("onnx")
  proto = export.export_onnx(params["teacher"], "teacher", "minmax")
  onnx.checker.check_model(proto, full_check=True)
  dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
          for v in list(proto.graph.input) + list(proto.graph.output)]
  assert dims == [["batch", "height", "width", 1]] * 3
  assert [v.name for v in proto.graph.input] == ["ir", "vis"]
  assert {p.key: p.value for p in proto.metadata_props} == {
      "model": "teacher", "output": "minmax", "min_size": "3"}
  assert proto.opset_import[0].version == export.ONNX_OPSET
  stored = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.name.startswith("conv"))
  assert stored == networks.count_params(params["teacher"])


def test_bad_requests_are_errors(params):
  with pytest.raises(export.ExportError, match="the parameters are the student's"):
    export.export_onnx(params["student"], "teacher")
  with pytest.raises(export.ExportError, match="unknown output stage"):
    export.export_stablehlo(params["student"], "student", "sigmoid")
  with pytest.raises(export.ExportError, match="unknown format"):
    export.export_bytes(params["student"], "tflite")


_STANDALONE = """
import sys
import jax
import numpy as np
with open(sys.argv[1], "rb") as f:
  exported = jax.export.deserialize(bytearray(f.read()))
inputs = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(exported.call(inputs["ir"], inputs["vis"])))
assert "mmdrfuse_jax" not in sys.modules, "running the file imported the project"
print("platforms", exported.platforms)
"""


@pytest.mark.slow
def test_stablehlo_runs_in_a_process_without_the_project(tmp_path, exported, images, reference,
                                                          params):
  shape = SHAPES[0]
  export.write_file(tmp_path / "student.stablehlo", exported("student", "stablehlo"))
  np.savez(tmp_path / "inputs.npz", ir=images[shape][0], vis=images[shape][1])
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  done = subprocess.run([sys.executable, "-c", _STANDALONE, "student.stablehlo", "inputs.npz",
                         "out.npy"], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr
  assert "platforms ('cpu', 'cuda')" in done.stdout
  assert_equal_up_to_rounding(np.load(tmp_path / "out.npy"), reference("student", shape),
                              ulps=network_ulps(params["student"]))


# ---------------------------------------------------------------------------------------------
# The command line.

export_script = load_script("export")


@pytest.fixture(scope="module")
def weights(tmp_path_factory, params):
  """A student weights file (`.npz`)."""
  path = tmp_path_factory.mktemp("w") / "student.npz"
  weight_files.save_params(path, params["student"])
  return path


def _run_cli(capsys, *argv):
  code = export_script.main([str(a) for a in argv])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _assert_one_line_error(capsys, needle, *argv):
  code, _, err = _run_cli(capsys, *argv)
  assert code == 2
  assert len(err.strip().splitlines()) == 1, err
  assert err.startswith("error: ") and "Traceback" not in err
  assert needle in err


def test_cli_writes_and_checks(tmp_path, capsys, weights):
  rng = np.random.default_rng(2)
  for stem, (h, w) in (("a", (21, 30)), ("b", (21, 30))):
    save_image(tmp_path / "ir" / f"{stem}.png", rng.integers(0, 256, (h, w), dtype=np.uint8))
    save_image(tmp_path / "vi" / f"{stem}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
  out = tmp_path / "new" / "student.onnx"
  check = ["--check_ir", tmp_path / "ir", "--check_vis", tmp_path / "vi"]
  code, stdout, err = _run_cli(capsys, "--weights", weights, "--format", "onnx", "--out", out,
                               "--output", "minmax", *check)
  assert code == 0, err
  assert "checked 2 pair(s)" in stdout and "within tolerance" in stdout
  assert sorted(p.name for p in out.parent.iterdir()) == ["student.onnx"]  # no temporary left
  # A pair of different sizes is reported, the others checked, and the exit code is 1.
  save_image(tmp_path / "vi" / "b.png", rng.integers(0, 256, (16, 17), dtype=np.uint8))
  code, stdout, err = _run_cli(capsys, "--weights", weights, "--format", "onnx", "--out", out,
                               *check)
  assert code == 1 and "skipped:" in err and "different sizes" in err
  assert "checked 1 pair(s)" in stdout


def test_cli_errors_are_one_line(tmp_path, capsys, weights):
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not weights")
  blocker = tmp_path / "file"
  blocker.write_text("x")
  out = tmp_path / "x.onnx"
  onnx_to = ["--weights", weights, "--format", "onnx", "--out"]
  _assert_one_line_error(capsys, str(bad), "--weights", bad, "--format", "onnx", "--out", out)
  _assert_one_line_error(capsys, "no such weights file", "--weights", tmp_path / "missing.model",
                         "--format", "onnx", "--out", out)
  _assert_one_line_error(capsys, "student weights", "--model", "teacher", *onnx_to, out)
  _assert_one_line_error(capsys, "is a folder", *onnx_to, tmp_path)
  _assert_one_line_error(capsys, "would replace the weights file", *onnx_to, weights)
  _assert_one_line_error(capsys, "--out folder", *onnx_to, blocker / "sub" / "x.onnx")
  _assert_one_line_error(capsys, "no such file or folder", *onnx_to, out,
                         "--check_ir", tmp_path / "nope", "--check_vis", tmp_path / "nope2")
  _assert_one_line_error(capsys, "go together", *onnx_to, out, "--check_ir", tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz", "file"]


def test_cli_without_onnx(tmp_path, capsys, weights, monkeypatch):
  monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
  _assert_one_line_error(capsys, "pip install", "--weights", weights, "--format", "onnx",
                         "--out", tmp_path / "x.onnx")
  assert not (tmp_path / "x.onnx").exists()
  # StableHLO needs no onnx.
  code, stdout, err = _run_cli(capsys, "--weights", weights, "--format", "stablehlo",
                               "--out", tmp_path / "x.stablehlo")
  assert code == 0, err
  exported = jax.export.deserialize(bytearray((tmp_path / "x.stablehlo").read_bytes()))
  assert exported.platforms == export.PLATFORMS


# ---------------------------------------------------------------------------------------------
# The published weights on real shared pairs: the smallest RoadScene_test pair and an MRI_PET
# pair (`bin/export.py --check_ir/--check_vis` checks whole folders; README).


@pytest.fixture(scope="module")
def shared_pairs(shared):
  pairs = []
  for folder, ir, vis in (("RoadScene_test", "ir", "vi"), ("MRI_PET", "PET", "MRI")):
    pairing = imageio.pair_inputs([shared / "data" / folder / ir, shared / "data" / folder / vis])
    pairs.append(min(pairing.pairs, key=lambda p: np.prod(imageio.read_size(p[1][0]))))
  return pairs


def _published(shared, model):
  return weight_files.load_params(shared / "reference" / "weights" / f"{model}.model", model)


@pytest.mark.slow
def test_published_student_on_shared_pairs(shared, shared_pairs):
  params = _published(shared, "student")
  runners = {output: (export.load_runner("onnx", export.export_bytes(params, "onnx", "student",
                                                                     output)), output)
             for output in ("none", "minmax")}
  results, problems = export.check_pairs(runners, params, shared_pairs)
  assert not problems
  for result in results.values():  # minmax: 1e-5 as floats, and 1 level in 8 bits
    assert result.pairs == 2 and result.passed(), result
    assert result.max_abs <= 1e-5 and result.max_levels <= 1


@pytest.fixture(scope="module")
def shared_crops(shared_pairs):
  """Crops of the two shared pairs, as a batch of a shape `fusion.fuse` has compiled."""
  shape = TEACHER_SHAPES[0]
  crops = [[], []]
  for _, paths in shared_pairs:
    for slot, path in enumerate(paths):
      gray = imageio.read_gray(path)
      top, left = (gray.shape[0] - shape[1]) // 2, (gray.shape[1] - shape[2]) // 2
      crops[slot].append(gray[top:top + shape[1], left:left + shape[2], None])
  return np.stack(crops[0]), np.stack(crops[1])


@pytest.mark.parametrize("model,fmt", [c for c in CASES if c != ("teacher", "stablehlo")])
def test_published_weights_on_shared_crops(model, fmt, shared, shared_crops):
  """The networks on crops of the two pairs (full images: the full check in the README).

  Not the teacher's StableHLO: its export and compilation take seconds, and the file is the
  random-weights test's with other constants.
  """
  params = _published(shared, model)
  got = export.load_runner(fmt, export.export_bytes(params, fmt, model))(*shared_crops)
  max_abs, _ = export.compare(got, np.asarray(fusion.fuse(params, *shared_crops)), "none")
  assert max_abs <= 1e-5


@pytest.mark.parametrize("engine", ["stablehlo", "onnxruntime"])
def test_bench_infer_engines(engine, params, monkeypatch):
  # The benchmark's own Flax initialisation runs eagerly (seconds); the weights do not matter.
  monkeypatch.setattr(networks, "init_params", lambda name, rng: params[name])
  bench = load_script("bench")
  result = bench.infer.run(bench.argparse.Namespace(height=16, width=12, batch=1,
                                                    model="student", repeats=1, engine=engine))
  assert result["engine"] == engine and result["ms_per_image"] > 0 and result["file_bytes"] > 0
  assert ("onnxruntime" in result.get("device", "")) == (engine == "onnxruntime")


def test_cli_stopped_by_sigterm_writes_nothing(tmp_path, capsys, weights, monkeypatch):
  cli = load_script("export")

  def interrupted(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("the signal should have stopped the export")

  monkeypatch.setattr(cli.export, "export_bytes", interrupted)
  out = tmp_path / "student.stablehlo"
  assert cli.main(["--weights", str(weights), "--format", "stablehlo", "--out", str(out)]) == 143
  assert capsys.readouterr().err == f"stopped by SIGTERM: {out} not written\n"
  assert list(tmp_path.iterdir()) == []
