"""Exported StableHLO and ONNX files: equal to `fusion.fuse`, runnable alone; the export CLI.

Compilation dominates the time here (a teacher compilation takes seconds on a small CPU), so
every exported file and every reference is made once per module. The student runs at 37x50
and 64x48 (batch 2); the teacher at 37x50 only, which exercises both cases of its any-size
rule (the odd height is padded, the even width is not), and in ONNX at 3x5, its smallest size.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, load_script, save_image
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


def test_minmax_of_an_image_with_nan_is_nan():
  """The project's minmax of an image with a NaN pixel is NaN everywhere (its min and max are
  NaN, as in `fusion.quantize`'s stretch); a constant image still gives 0."""
  fused = np.random.default_rng(4).random((2, 5, 6, 1), dtype=np.float32)
  fused[0, 2, 3, 0] = np.nan
  fused[1] = 0.25
  staged = np.asarray(export.output_stage(fused, "minmax"))
  assert np.isnan(staged[0]).all()
  np.testing.assert_array_equal(staged[1], 0)
  with np.errstate(invalid="ignore"):  # quantize's float stretch, before its integer cast
    low, high = fused[0].min(), fused[0].max()
    assert np.isnan((fused[0] - low) * (np.float32(255) / (high - low))).all()


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_exported_minmax_propagates_nan(fmt, runner, images, params):
  """One NaN input pixel: `fusion.fuse` gives NaN around it, so every minmax pixel is NaN (the
  exported files once gave an all-zero image (StableHLO) or stretched the rest (ONNX))."""
  ir, vis = (x[:1].copy() for x in images[SHAPES[0]])
  ir[0, 10, 20, 0] = np.nan
  assert np.isnan(np.asarray(fusion.fuse(params["student"], ir, vis))).any()
  got = runner("student", fmt, "minmax")(ir, vis)
  assert got.shape == ir.shape and np.isnan(got).all()
  # The other stages keep the network's NaN pixels where they are.
  clipped = runner("student", fmt, "clip")(ir, vis)
  np.testing.assert_array_equal(np.isnan(clipped),
                                np.isnan(np.asarray(fusion.fuse(params["student"], ir, vis))))


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_runner_refuses_too_small_images_in_one_line(fmt, runner):
  """1x1 and 1x64 (width x height 64x1) images: one line naming the minimum, not StableHLO's
  'Error refining shapes' or onnxruntime's Pad error (with its log lines on stderr)."""
  run = runner("student", fmt)
  for height, width in ((1, 1), (1, 64), (64, 1)):
    x = np.zeros((1, height, width, 1), np.float32)
    with pytest.raises(export.ExportError) as info:
      run(x, x)
    assert str(info.value) == (f"image of {width}x{height} pixels is too small for this file "
                               "(at least 2x2)")
  assert run(np.zeros((1, 2, 2, 1), np.float32), np.zeros((1, 2, 2, 1), np.float32)).shape == (
      1, 2, 2, 1)


def test_teacher_smallest_size_and_too_small(runner, params):
  """The teacher takes 3x5: padded to 4x6 (half size 2x3), run, cropped; 2 rows are refused."""
  ir, vis = np.random.default_rng(1).random((2, 1, 3, 5, 1), dtype=np.float32)
  run = runner("teacher", "onnx")  # equal to fusion.fuse at 37x50 (above)

  def pad(x):
    return np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="reflect")

  assert_equal_up_to_rounding(run(ir, vis), run(pad(ir), pad(vis))[:, :3, :5],
                              ulps=network_ulps(params["teacher"]))
  for fmt in export.FORMATS:
    with pytest.raises(export.ExportError, match=r"^image of 5x2 pixels is too small for this "
                       r"file \(at least 3x3\)$"):
      runner(fmt=fmt, model="teacher")(ir[:, :2], vis[:, :2])


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


def test_cli_check_refuses_too_small_pairs_in_one_line(tmp_path, capsys, weights):
  """A 1x64 and a 1x1 check pair beside a usable one (StableHLO): one `skipped:` line each,
  naming the minimum; the usable pair is checked."""
  for stem, size in (("a", (1, 64)), ("b", (1, 1)), ("c", (8, 8))):
    for sub in ("ir", "vi"):
      save_image(tmp_path / sub / f"{stem}.png", np.zeros(size, np.uint8))
  code, stdout, err = _run_cli(capsys, "--weights", weights, "--format", "stablehlo",
                               "--out", tmp_path / "s.stablehlo", "--check_ir", tmp_path / "ir",
                               "--check_vis", tmp_path / "vi")
  assert code == 1 and "checked 1 pair(s)" in stdout
  assert err.splitlines() == [
      f"skipped: {tmp_path / 'ir' / 'a.png'}: image of 64x1 pixels is too small (at least 2x2)",
      f"skipped: {tmp_path / 'ir' / 'b.png'}: image of 1x1 pixels is too small (at least 2x2)"]


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
  """A signal during the export is honoured at the safe point after it: nothing written."""
  cli = load_script("export")
  real = export.export_bytes

  def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

  monkeypatch.setattr(export, "export_bytes", signalled)
  out = tmp_path / "student.stablehlo"
  handler = signal.getsignal(signal.SIGTERM)
  assert cli.main(["--weights", str(weights), "--format", "stablehlo", "--out", str(out)]) == 143
  assert capsys.readouterr().err == f"stopped by SIGTERM: {out} not written\n"
  assert list(tmp_path.iterdir()) == []
  assert signal.getsignal(signal.SIGTERM) is handler  # restored


def _check_folders(root, sizes):
  """ir/ and vi/ with one random pair per (height, width), stems 0, 1, ..."""
  rng = np.random.default_rng(5)
  for i, size in enumerate(sizes):
    for sub in ("ir", "vi"):
      save_image(root / sub / f"{i}.png", rng.integers(0, 256, size, dtype=np.uint8))
  return ["--check_ir", root / "ir", "--check_vis", root / "vi"]


def test_cli_signal_during_the_check_stops_at_the_next_pair(tmp_path, capsys, weights,
                                                            monkeypatch):
  """SIGINT while the file runs on the first check pair (inside the runtime): the pair ends,
  then the tool stops with one line; the written file stays whole."""
  real = export.load_runner
  calls = []

  def load_runner(fmt, data):
    run = real(fmt, data)

    def signalled(ir, vis):
      calls.append(ir.shape)
      if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGINT)
      return run(ir, vis)

    return signalled

  monkeypatch.setattr(export, "load_runner", load_runner)
  check = _check_folders(tmp_path / "check", [(20, 24)] * 3)
  out = tmp_path / "out" / "student.onnx"
  # Where the code under test lets a signal through, it must not reach pytest's handler.
  received = []

  def ours(signum, frame):
    received.append(signum)

  previous = signal.signal(signal.SIGINT, ours)
  try:
    code, stdout, err = _run_cli(capsys, "--weights", weights, "--format", "onnx", "--out", out,
                                 *check)
  finally:
    assert signal.signal(signal.SIGINT, previous) is ours  # the tool restored it
  assert not received and code == 130, err
  assert err == (f"stopped by SIGINT: {out} is written and complete; its check stopped after "
                 "1 of 3 pair(s)\n")
  assert stdout.startswith(f"wrote {out} ") and "checked" not in stdout
  assert len(calls) == 1 and sorted(p.name for p in out.parent.iterdir()) == ["student.onnx"]
  export.load_runner("onnx", out.read_bytes())  # a complete file


_STOP_LINE = re.compile(r"stopped by SIGINT: (.+) is written and complete; its check stopped "
                        r"after (\d+) of (\d+) pair\(s\)")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", export.FORMATS)
def test_cli_sigint_in_a_real_check_is_one_line(fmt, tmp_path, weights):
  """`bin/export.py --check_ir/--check_vis` gets SIGINT once its file is written, while the
  check compiles and runs (XLA, onnxruntime): exit 130, one line, never a traceback (once 40
  lines from inside XLA's compilation, or a segmentation fault)."""
  sizes = [(20 + i, 24 + 2 * i) for i in range(8)]  # 8 sizes: 8 compilations of fusion.fuse
  check = [str(a) for a in _check_folders(tmp_path / "check", sizes)]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  for attempt in range(3):  # The signal must land during the check: retry if it finished first.
    out = tmp_path / f"out{attempt}" / f"student.{fmt}"
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "bin" / "export.py"), "--weights", str(weights),
         "--format", fmt, "--out", str(out), "--output", "minmax", *check],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
      deadline = time.monotonic() + 120
      while not out.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
      time.sleep(0.2 * attempt)
      proc.send_signal(signal.SIGINT)
      _, err = proc.communicate(timeout=120)
    finally:
      proc.kill()
    if proc.returncode == 0:
      continue
    lines = err.splitlines()
    assert proc.returncode == 130 and len(lines) == 1, err
    found = _STOP_LINE.fullmatch(lines[0])
    assert found and found.group(1) == str(out) and int(found.group(2)) < 8, lines
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # whole, no temporary
    export.load_runner(fmt, out.read_bytes())
    return
  pytest.fail("the check finished before the signal three times")


def _catches(pid, signum):
  """Whether process `pid` has a handler for `signum` (Linux: SigCgt in /proc/PID/status)."""
  try:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
  except OSError:
    return False
  mask = re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M)
  return bool(mask and int(mask.group(1), 16) >> (signum - 1) & 1)


@pytest.mark.slow
def test_cli_sigint_during_the_start_up_is_one_line(tmp_path, weights):
  """SIGINT while the tool imports jax (a second): exit 130, one line, no file. Once a
  traceback from inside the import, or a KeyboardInterrupt that jax's gc callback swallowed
  ("Exception ignored in"), after which the file was written and the exit code was 0."""
  if not pathlib.Path("/proc/self/status").is_file():
    pytest.skip("needs /proc to see when the tool has its signal handlers")
  out = tmp_path / "student.stablehlo"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
  proc = subprocess.Popen(
      [sys.executable, str(REPO_ROOT / "bin" / "export.py"), "--weights", str(weights),
       "--format", "stablehlo", "--out", str(out)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  try:
    # Python itself never catches SIGTERM: once it does, the tool's handlers are in, and its
    # imports have begun. (The old tool took it only after its imports: 0.5 s is into them.)
    deadline = time.monotonic() + 0.5
    while not _catches(proc.pid, signal.SIGTERM) and time.monotonic() < deadline:
      time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 130, (stdout, err)
  # Before the tool's own handling, the start-up guard (runtime/startup.py) answers; both
  # are one line and write nothing.
  assert err in (f"stopped by SIGINT: {out} not written\n",
                 "stopped by SIGINT while starting\n") and stdout == "", err
  assert list(tmp_path.iterdir()) == []
