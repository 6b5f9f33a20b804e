"""The PyTorch baseline (`benchmarks/torch_baseline.py`, `bench.py torch-baseline`, the suite's
`torch-*` items): it computes what the published code computes (the reference's golden
tensors), the suite puts its figures beside the JAX ones, and without PyTorch everything skips
with one line.

PyTorch is optional (the `bench` extra): the tests that run it skip where it is not
importable, and those that use the reference material skip where `$MMDRFUSE_SHARED` lacks it.
The tests of the skip path run either way (they hide torch where it is installed).
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, load_script
from rounding import ELEMENTWISE_ULPS, assert_equal_up_to_rounding

from mmdrfuse_jax.benchmarks import suite, torch_baseline

# The losses are float32 reductions over 65,536 pixels (and VGG taps), whose summation order
# changes with the CPU: the goldens themselves are float32 values (the distillation golden is
# 6.3e-5 relative from its float64 value), so the JAX tests' 1e-4 relative holds here too.
# Measured on the development machine: at most 9e-8.
RTOL = 1e-4


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip(
      "torch", reason="torch not importable (the optional bench extra: pip install -e '.[bench]')")


@pytest.fixture(scope="module")
def published(torch, shared):
  weights = shared / "reference" / "weights"
  return {model: torch_baseline.load_published(weights / f"{model}.model", model)
          for model in ("student", "teacher")}


def network_ulps(net) -> float:
  """tests/rounding.py's allowance for a network: sqrt(summed fan-ins) + element-wise ulps."""
  fan_ins = sum(int(np.prod(p.shape[1:])) for p in net.parameters() if p.ndim == 4)
  return math.sqrt(fan_ins) + ELEMENTWISE_ULPS


def _rel_err(got, ref) -> float:
  got = np.asarray(got.detach().numpy() if hasattr(got, "detach") else got, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


# ------------------------------------------------------------------------- the goldens


def test_parameter_counts(torch):
  counts = {model: sum(p.numel() for p in torch_baseline.build(model).parameters())
            for model in ("student", "teacher")}
  assert counts == {"student": 113, "teacher": 556_489}


def test_student_reproduces_the_published_tensors(torch, golden, published):
  net, student = golden["networks"], published["student"]
  x = torch.from_numpy(np.concatenate([net["ir"], net["vi"]], axis=1))
  with torch.no_grad():
    out = student.intermediates(x)
    feat, fused = student(x)
  for name, key in [("feat", "student_encoder_0"), ("feat_pre", "student_encoder_1"),
                    ("out", "student_decoder_0"), ("out_pre", "student_decoder_1")]:
    assert_equal_up_to_rounding(out[name].numpy(), net[key], ulps=network_ulps(student),
                                err_msg=name)
  np.testing.assert_array_equal(feat.numpy(), out["feat"].numpy())
  np.testing.assert_array_equal(fused.numpy(), out["out"].numpy())


def test_student_reproduces_the_published_full_image(torch, golden, published):
  net = golden["networks"]
  x = torch.from_numpy(np.stack([net["full_ir"], net["full_vi"]])[None])
  assert tuple(x.shape) == (1, 2, 301, 496)  # Odd and not square.
  with torch.no_grad():
    out = published["student"](x)[1]
  assert_equal_up_to_rounding(out.numpy(), net["full_student_out"],
                              ulps=network_ulps(published["student"]))


def test_teacher_reproduces_the_published_tensors(torch, golden, published):
  net, teacher = golden["networks"], published["teacher"]
  x = torch.from_numpy(np.concatenate([net["ir"], net["vi"]], axis=1))
  with torch.no_grad():
    out = teacher.intermediates(x)
  ulps = network_ulps(teacher)
  for i in range(6):
    assert_equal_up_to_rounding(out["encoder"][i].numpy(), net[f"teacher_encoder_{i}"],
                                ulps=ulps, err_msg=f"G{i + 1}")
  for name, key in [("out", "teacher_decoder_0"), ("feat", "teacher_decoder_1"),
                    ("out_pre", "teacher_decoder_2"), ("feat_pre", "teacher_decoder_3")]:
    assert_equal_up_to_rounding(out[name].numpy(), net[key], ulps=ulps, err_msg=name)
  with pytest.raises(ValueError, match="even sizes"):
    teacher(x[:, :, :127])


def test_published_weights_are_loaded_strictly(torch, tmp_path, published):
  state = published["student"].state_dict()
  state.pop("conv2.1.bias")
  torch.save(state, tmp_path / "student.model")
  with pytest.raises(RuntimeError, match="conv2.1.bias"):
    torch_baseline.load_published(tmp_path / "student.model", "student")
  with pytest.raises(ValueError, match="unknown model"):
    torch_baseline.build("other")


@pytest.fixture(scope="module")
def batch(torch, golden):
  net, losses = golden["networks"], golden["losses"]
  return {key: torch.from_numpy(value) for key, value in {
      "ir": net["ir"], "vi": net["vi"], "out": net["student_decoder_0"],
      "s_feat": net["student_encoder_0"], "t_feat": net["teacher_decoder_1"],
      "t_out": losses["teacher_out"]}.items()}


LOSSES = {
    "intensity_l1": lambda b: torch_baseline.intensity_loss(b["out"], b["ir"], b["vi"]),
    "gradient2_out": lambda b: torch_baseline.gradient(b["out"]),
    "gradient_mse": lambda b: torch_baseline.gradient_mse(b["out"], b["ir"], b["vi"]),
    "ssim_out_ir": lambda b: torch_baseline.ssim(b["out"], b["ir"]),
    "ssim_out_vi": lambda b: torch_baseline.ssim(b["out"], b["vi"]),
    "gmsd_out_ir": lambda b: torch_baseline.gmsd(b["out"], b["ir"]),
    "gmsd_out_vi": lambda b: torch_baseline.gmsd(b["out"], b["vi"]),
    "gmsd_per_image_out_ir": lambda b: torch_baseline.gmsd_per_image(b["out"], b["ir"]),
    "distill_raw": lambda b: torch_baseline.distillation_loss(b["s_feat"], b["t_feat"],
                                                              b["out"], b["t_out"]),
}


@pytest.mark.parametrize("key", sorted(LOSSES))
def test_losses_reproduce_the_goldens(torch, golden, batch, key):
  got = LOSSES[key](batch)
  assert tuple(got.shape) == golden["losses"][key].shape
  assert _rel_err(got, golden["losses"][key]) < RTOL


def test_gradient_loss_is_the_mse_over_ten(torch, batch):
  args = (batch["out"], batch["ir"], batch["vi"])
  assert float(torch_baseline.gradient_loss(*args)) == pytest.approx(
      float(torch_baseline.gradient_mse(*args)) / 10, rel=1e-6)


@pytest.fixture(scope="module")
def vgg(torch):
  return torch_baseline.vgg19()


def test_vgg19_taps_reproduce_the_goldens(torch, golden, vgg):
  ref = golden["vgg19_random"]
  assert f"default_rng({torch_baseline.VGG_SEED})" in str(ref["recipe"])
  with torch.no_grad():
    taps = vgg(torch.from_numpy(ref["x"]))
    gray = vgg(torch.from_numpy(ref["x"][:, :1]), 3)  # One channel is repeated to three.
  assert len(taps) == 5 and len(gray) == 3
  for k, tap in enumerate(taps, start=1):
    assert _rel_err(tap, ref[f"tap_{k}"]) < RTOL, k
  # The golden's three channels are the gray image repeated.
  np.testing.assert_array_equal(ref["x"][:, 1:], np.repeat(ref["x"][:, :1], 2, axis=1))
  for a, b in zip(gray, taps):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert not any(p.requires_grad for p in vgg.parameters())


def test_perception_and_refresh_losses_reproduce_the_goldens(torch, golden, batch, vgg):
  ref = golden["vgg19_random"]
  with torch.no_grad():
    taps = vgg(torch.cat([batch["out"], batch["ir"], batch["vi"], batch["t_out"]]))
  out, ir, vi, mem = zip(*[t.chunk(4) for t in taps])
  assert _rel_err(torch_baseline.perception_loss(out, ir, vi), ref["perception"]) < RTOL
  # The memory is the teacher's output (the goldens' recipe).
  for name, fn in (("refresh_ssim", torch_baseline.refresh_ssim_loss),
                   ("refresh_gmsd", torch_baseline.refresh_gmsd_loss)):
    got = fn(mem, out, batch["t_out"], batch["out"])
    assert _rel_err(got, ref[f"{name}_loss"]) < RTOL, name
    zeros = torch.zeros_like(batch["out"])  # The pixel term vanishes: the VGG part alone.
    assert _rel_err(fn(mem, out, zeros, zeros), ref[f"{name}_vgg"]) < RTOL, name


# --------------------------------------------------------------------------- the step


def test_train_step_is_the_comprehensive_loss_then_adam(torch):
  device = torch.device("cpu")
  step, ir, vi, ids = torch_baseline.make_train_step(2, 32, device=device, compiled=False)
  student = step.student
  before = {k: v.clone() for k, v in student.state_dict().items()}
  memories = {k: v.clone() for k, v in step.memory.items()}
  # The published recipe: the student's conv2 starts as the teacher's conv00.
  teacher, vgg = step.loss_fn.teacher, step.loss_fn.vgg
  np.testing.assert_array_equal(before["conv2.1.weight"].numpy(),
                                teacher.conv00[1].weight.detach().numpy())
  # Every term recomputed here from the (golden-checked) pieces, by SPEC section 3 and 4.
  with torch.no_grad():
    x = torch.cat([ir, vi], 1)
    s_feat, out = student(x)
    t_feat, t_out = teacher(x)
    mem = memories["ssim"][ids]
    taps_out, taps_ir, taps_vi, taps_mem = (vgg(y) for y in (out, ir, vi, mem))
    s_cur = torch_baseline.ssim(out, ir) + torch_baseline.ssim(out, vi)
    s_best = torch_baseline.ssim(mem, ir) + torch_baseline.ssim(mem, vi)
    g_cur = torch_baseline.gmsd(out, ir) + torch_baseline.gmsd(out, vi)
    g_best = torch_baseline.gmsd(mem, ir) + torch_baseline.gmsd(mem, vi)
    want = {
        "l_int": torch_baseline.intensity_loss(out, ir, vi),
        "l_percep": torch_baseline.perception_loss(taps_out, taps_ir, taps_vi),
        "l_grad": torch_baseline.gradient_loss(out, ir, vi),
        "l_distill": torch_baseline.distillation_loss(s_feat, t_feat, out, t_out),
        "l_refresh_ssim": torch_baseline.refresh_ssim_loss(taps_mem, taps_out, mem, out),
        "l_refresh_gmsd": torch_baseline.refresh_gmsd_loss(taps_mem, taps_out, mem, out)}
  # max(ir, vi) in both memories scores better than the untrained output: both losses on.
  assert float(s_best) > float(s_cur) and float(g_best) < float(g_cur)
  want["w_refresh_ssim"] = 10 * (s_best - s_cur)
  want["w_refresh_gmsd"] = 10 * (g_cur - g_best)
  want["l_refresh"] = (want["w_refresh_ssim"] * want["l_refresh_ssim"]
                       + want["w_refresh_gmsd"] * want["l_refresh_gmsd"])
  want["loss"] = (want["l_int"] + 2 * want["l_percep"] + want["l_grad"] + 5 * want["l_distill"]
                  + want["l_refresh"])
  stats = step(ir, vi, ids)
  for key, value in want.items():
    assert float(stats[key]) == pytest.approx(float(value), rel=1e-5), key
  assert not bool(stats["replace_ssim"]) and not bool(stats["replace_gmsd"])
  for key, value in step.memory.items():  # Not replaced: the memories keep their images.
    np.testing.assert_array_equal(value.numpy(), memories[key].numpy(), err_msg=key)
  # Adam's first step moves every parameter by about the learning rate (sign of the gradient).
  for key, value in student.state_dict().items():
    moved = np.abs(value.numpy() - before[key].numpy())
    np.testing.assert_allclose(moved, torch_baseline.LEARNING_RATE, rtol=1e-2, err_msg=key)
  assert all(not p.requires_grad for p in teacher.parameters())


@pytest.mark.slow
def test_compiled_train_step_matches_eager(torch):
  device = torch.device("cpu")
  runs = {}
  for compiled in (False, True):
    torch._dynamo.reset()
    step, ir, vi, ids = torch_baseline.make_train_step(2, 32, device=device, compiled=compiled)
    runs[compiled] = [step(ir, vi, ids) for _ in range(2)]
  for eager, compiled in zip(runs[False], runs[True]):
    for key in ("loss", "l_int", "l_percep", "l_grad", "l_distill", "l_refresh"):
      assert float(compiled[key]) == pytest.approx(float(eager[key]), rel=1e-4), key


# ----------------------------------------------------------------------------- the CLI


def test_torch_baseline_subcommand(torch, capsys):
  bench = load_script("bench")
  assert bench.main(["torch-baseline", "--reduced", "--only", "infer-student-64x48",
                     "--modes", "eager", "--repeats", "2"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["benchmark"] == "torch-baseline" and result["torch"] == torch.__version__
  assert result["precision"] == "exact" and result["reduced"] is True
  (workload,) = result["workloads"]
  assert workload["name"] == "infer-student-64x48" and workload["jax_item"] == (
      "infer-student-64x48-b1")
  assert (workload["height"], workload["width"], workload["batch"]) == (48, 64, 1)
  assert workload["eager"]["ms_per_image"] > 0 and workload["eager"]["runs"] == 2
  assert "compiled" not in workload
  with pytest.raises(SystemExit, match="no workload infer-student-1x1"):
    bench.main(["torch-baseline", "--only", "infer-student-1x1"])
  with pytest.raises(SystemExit, match="--modes"):
    bench.main(["torch-baseline", "--modes", "jit"])


def test_suite_lists_the_baseline_beside_its_jax_items():
  for reduced in (False, True):
    names = [name for name, _ in suite.items(reduced)]
    for workload in torch_baseline.workloads(reduced):
      assert suite.TORCH_PREFIX + workload.name in names
      assert workload.jax_item in names  # The JAX figure it is compared with is measured.
    # The baseline runs last, after every JAX figure.
    torch_items = [i for i, name in enumerate(names) if name.startswith(suite.TORCH_PREFIX)]
    assert torch_items == list(range(len(names) - 4, len(names)))
  full = {w.name: w for w in torch_baseline.workloads()}
  assert sorted(full) == ["infer-student-1280x1024", "infer-student-640x480",
                          "infer-teacher-640x480", "train-step-student"]
  step = full["train-step-student"]
  assert (step.batch, step.height, step.width) == (25, 128, 128)


def test_reduced_suite_puts_torch_beside_jax(torch, tmp_path, capsys, monkeypatch):
  # torch.compile fails here (as it may on some machines): the figure is skipped with the
  # reason, the eager one stands. (The real compilation: the slow test below.)
  def no_compiler(*args, **kwargs):
    raise RuntimeError("no C++ compiler for this test\nsecond line")

  monkeypatch.setattr(torch, "compile", no_compiler)
  bench = load_script("bench")
  assert bench.main(["suite", "--reduced", "--out", str(tmp_path),
                     "--only", "infer-student-64x48-b1,torch-infer-student-64x48"]) == 0
  out = capsys.readouterr().out
  report = json.loads((tmp_path / "bench.json").read_text())
  assert [item["name"] for item in report["items"]] == ["infer-student-64x48-b1",
                                                        "torch-infer-student-64x48"]
  assert report["items"][1]["argv"][:3] == ["torch-baseline", "--only", "infer-student-64x48"]
  (row,) = report["torch_baseline"]["comparisons"]
  jax_ms = report["items"][0]["result"]["ms_per_image"]
  assert row["jax"] == jax_ms and row["jax_item"] == "infer-student-64x48-b1"
  assert row["torch_eager"] > 0 and row["eager_over_jax"] == pytest.approx(
      row["torch_eager"] / jax_ms)
  reason = "torch.compile failed: RuntimeError: no C++ compiler for this test"
  assert row["torch_compiled"] is None and row["compiled_over_jax"] is None
  assert row["compiled_skipped"] == reason
  assert report["torch_baseline"]["torch"] == torch.__version__
  table = (tmp_path / "bench.md").read_text()
  assert "| workload | JAX | PyTorch eager | eager / JAX | PyTorch compiled | compiled / JAX |" \
      in table
  assert f"| infer-student-64x48 (ms per image) | {jax_ms:,.4g} (infer-student-64x48-b1) |" \
      in table and reason in table
  assert f"eager {row['torch_eager']:,.4g} ms per image ({row['eager_over_jax']:.3g}x JAX's" \
      in out
  assert "compare different devices" not in table  # Both on this CPU.
  last = json.loads(out.strip().splitlines()[-1])
  assert last["failed"] == [] and last["items"] == 2


def test_markdown_flags_a_comparison_across_devices():
  workload = {"name": "infer-student-640x480", "kind": "infer",
              "jax_item": "infer-student-640x480-b1", "eager": {"ms_per_image": 6.0},
              "compiled": {"skipped": "torch.compile failed: RuntimeError: a | b"}}
  report = {"device": "gpu: NVIDIA H200 x1", "jax": "0.10.2", "date": "today", "items": [
      {"name": "infer-student-640x480-b1", "seconds": 1.0,
       "result": {"benchmark": "infer", "ms_per_image": 2.0}},
      {"name": "torch-infer-student-640x480", "seconds": 2.0,
       "result": {"benchmark": "torch-baseline", "workloads": [workload]}}]}
  report["torch_baseline"] = {"torch": "2.13.0+cpu", "device": "cpu (2 cores, 2 torch threads)",
                              "precision": "exact", "comparisons": suite.torch_comparisons(report)}
  (row,) = report["torch_baseline"]["comparisons"]
  assert (row["jax"], row["torch_eager"], row["eager_over_jax"]) == (2.0, 6.0, 3.0)
  table = suite.to_markdown(report)
  assert "the ratios compare different devices" in table
  # A reason with a table's separator in it does not break the row.
  assert ("| infer-student-640x480 (ms per image) | 2 (infer-student-640x480-b1) | 6 | 3 | "
          "torch.compile failed: RuntimeError: a / b |  |") in table


@pytest.mark.slow
def test_reduced_suite_compiles_the_baseline(torch, tmp_path):
  bench = load_script("bench")
  assert bench.main(["suite", "--reduced", "--out", str(tmp_path),
                     "--only", "infer-teacher-64x48-b1,torch-infer-teacher-64x48"]) == 0
  (row,) = json.loads((tmp_path / "bench.json").read_text())["torch_baseline"]["comparisons"]
  assert row["torch_eager"] > 0 and row["torch_compiled"] > 0, row
  assert row["compiled_over_jax"] == pytest.approx(row["torch_compiled"] / row["jax"])


# ------------------------------------------------------------------------ without torch


@pytest.fixture
def no_torch(monkeypatch):
  """`import torch` fails (ImportError) and `find_spec` finds nothing, as without PyTorch."""
  monkeypatch.setitem(sys.modules, "torch", None)
  assert not torch_baseline.available()


def test_suite_skips_the_baseline_in_one_line_without_torch(no_torch, tmp_path, capsys):
  bench = load_script("bench")
  assert bench.main(["suite", "--reduced", "--out", str(tmp_path),
                     "--only", "torch-infer-student-64x48,torch-train-step-student"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  line = "PyTorch baseline skipped: torch is not installed (pip install -e '.[bench]')"
  assert out.count(line) == 1
  report = json.loads((tmp_path / "bench.json").read_text())
  assert report["items"] == [] and report["torch_baseline"] == {
      "skipped": torch_baseline.MISSING}
  assert line + "." in (tmp_path / "bench.md").read_text()
  assert json.loads(out[-1])["failed"] == []


def test_subcommand_says_torch_is_missing(no_torch):
  with pytest.raises(SystemExit, match=r"torch is not installed \(pip install -e '.\[bench\]'\)"):
    load_script("bench").main(["torch-baseline", "--reduced"])


def test_importing_needs_no_torch():
  # A fresh interpreter: importing the baseline (and the bench tool) never imports torch, and
  # works where torch cannot be imported at all.
  code = ("import sys\n"
          "import mmdrfuse_jax.benchmarks.torch_baseline as tb\n"
          "assert 'torch' not in sys.modules, 'importing the baseline imported torch'\n"
          "sys.modules['torch'] = None  # From here on `import torch` fails.\n"
          "assert not tb.available() and len(tb.workloads()) == 4\n"
          "from mmdrfuse_jax.tools import bench\n"
          "assert bench.torch_baseline is tb\n")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
