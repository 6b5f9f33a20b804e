"""The backend notice and the warning for an accelerator that jax does not use."""

import functools
import re

import jax
import numpy as np
from conftest import load_script, save_image

from mmdrfuse_jax.runtime import backend

fuse_cli = load_script("fuse")

INSTALL = "pip install -e '.[cuda12]'"


def test_describe_on_this_machine():
  line = backend.describe()
  count = len(jax.devices())
  assert line.startswith(f"jax {jax.__version__} on {jax.default_backend()}: {count} device")
  assert jax.devices()[0].device_kind in line and "\n" not in line
  if jax.default_backend() == "cpu" and count == 1:
    assert line == f"jax {jax.__version__} on cpu: 1 device (cpu)"


def test_nvidia_probe():
  none = dict(exists=lambda path: False, which=lambda name: None)
  assert not backend.nvidia_gpu_visible(**none)
  assert backend.nvidia_gpu_visible(exists=lambda path: path == "/dev/nvidia0",
                                    which=lambda name: None)
  smi = {"nvidia-smi": "/usr/bin/nvidia-smi"}
  assert backend.nvidia_gpu_visible(exists=lambda path: False, which=smi.get)


def test_tpu_probe():
  assert not backend.tpu_visible(exists=lambda path: False, pci_ids=lambda: [])
  assert backend.tpu_visible(exists=lambda path: path == "/dev/accel0", pci_ids=lambda: [])
  gvnic = ("0x1ae0", "0x0042")  # Google's network card, on every Google Cloud VM: not a TPU
  assert not backend.tpu_visible(exists=lambda path: False, pci_ids=lambda: [gvnic])
  v5e = ("0x1ae0", "0x0063")
  assert backend.tpu_visible(exists=lambda path: False, pci_ids=lambda: [gvnic, v5e])


def _warning(**kwargs):
  probes = dict(backend="cpu", gpu_visible=lambda: False, tpu_visible_probe=lambda: False,
                platforms="", cuda_plugin=lambda: None)
  return backend.cpu_only_warning(**{**probes, **kwargs})


def test_warning_only_for_an_unused_accelerator():
  warning = _warning(gpu_visible=lambda: True)
  assert warning.startswith("warning: an NVIDIA GPU is visible but jax runs on the CPU only")
  assert INSTALL in warning and "'.[cuda13]'" in warning and "\n" not in warning
  assert _warning() is None  # no accelerator
  assert _warning(gpu_visible=lambda: True, backend="gpu") is None  # jax uses it
  assert _warning(gpu_visible=lambda: True, platforms="cpu") is None  # the CPU was chosen
  assert INSTALL in _warning(gpu_visible=lambda: True, platforms="cuda,cpu")
  # Installed for CUDA but it did not start: reinstalling would not help.
  warning = _warning(gpu_visible=lambda: True, cuda_plugin=lambda: "jax-cuda12-plugin")
  assert "jax-cuda12-plugin is installed but did not start" in warning and INSTALL not in warning
  assert "pip install -e '.[tpu]'" in _warning(tpu_visible_probe=lambda: True)
  assert _warning(tpu_visible_probe=lambda: True, backend="tpu") is None


def test_fuse_reports_the_backend_and_the_warning_once(weights, tmp_path, capsys, monkeypatch):
  rng = np.random.default_rng(0)
  for sub in ("ir", "vis"):
    save_image(tmp_path / sub / "a.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
  monkeypatch.setattr(backend, "_reported", False)
  # This machine as one with an NVIDIA GPU and jax for the CPU only.
  monkeypatch.setattr(backend, "cpu_only_warning", functools.partial(
      backend.cpu_only_warning, backend="cpu", gpu_visible=lambda: True, platforms="",
      cuda_plugin=lambda: None))
  outputs = []
  for run in range(2):
    code = fuse_cli.main(["--weights", str(weights), "--ir", str(tmp_path / "ir"),
                          "--vis", str(tmp_path / "vis"), "--out", str(tmp_path / f"o{run}"),
                          "--no_progress"])
    assert code == 0
    outputs.append(capsys.readouterr())
  first, second = outputs
  assert first.err.splitlines() == [backend.describe(), backend.cpu_only_warning()]
  assert re.fullmatch(r"jax \S+ on \w+: \d+ devices? \(.+\)", first.err.splitlines()[0])
  assert INSTALL in first.err
  assert second.err == ""  # once per process
  for out in (first.out, second.out):  # standard output is unchanged
    assert re.fullmatch(r"fused 1 pair\(s\) into \S+\n", out)


def test_usage_errors_stay_one_line(weights, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(backend, "_reported", False)
  code = fuse_cli.main(["--weights", str(weights), "--ir", str(tmp_path / "nope"),
                        "--vis", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
  assert code == 2
  assert len(capsys.readouterr().err.strip().splitlines()) == 1
  assert not backend._reported


def test_report_goes_through_log_once(monkeypatch):
  lines = []
  monkeypatch.setattr(backend, "_reported", False)
  monkeypatch.setattr(backend, "cpu_only_warning", lambda: "warning: x")
  backend.report(lines.append)
  backend.report(lines.append)
  assert lines == [backend.describe(), "warning: x"]
