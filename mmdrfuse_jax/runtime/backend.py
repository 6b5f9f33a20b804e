"""What jax runs on: a one-line notice, and a warning when an accelerator sits unused.

The command-line tools call `report` once before they compute:

  jax 0.10.2 on cpu: 1 device (cpu)
  jax 0.11.2 on gpu: 1 device (NVIDIA H100 80GB HBM3)

and where an NVIDIA GPU (or a TPU) is visible to the machine but jax runs on the CPU only (the
plain `pip install -e .` installs jax for the CPU), a second line says how to install jax for
it. An explicit `JAX_PLATFORMS` without the accelerator's platform is a choice, not a mistake:
no warning then.
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import pathlib
import shutil
import sys
from typing import Callable, Optional, Sequence

import jax

# /dev/nvidia0 is the first GPU of the NVIDIA driver (also inside containers given a GPU).
NVIDIA_DEVICE_FILES = ("/dev/nvidia0",)
# TPU VMs expose their chips as /dev/accel* (v2-v4) or as PCI devices of Google (vendor
# 0x1ae0) with these device ids (v5e and later use vfio), the ids jax's own check uses.
TPU_DEVICE_FILES = ("/dev/accel0",)
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = frozenset(
    {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})
_CUDA_PLUGINS = ("jax-cuda13-plugin", "jax-cuda12-plugin")

_reported = False  # `report` prints once per process.


def describe() -> str:
  """One line: the jax version, its default backend and that backend's devices."""
  devices = jax.devices()
  kinds = ", ".join(sorted({d.device_kind for d in devices}))
  count = f"{len(devices)} device{'s' if len(devices) != 1 else ''}"
  return f"jax {jax.__version__} on {jax.default_backend()}: {count} ({kinds})"


def nvidia_gpu_visible(*, exists: Callable[[str], bool] = os.path.exists,
                       which: Callable[[str], Optional[str]] = shutil.which) -> bool:
  """Whether the machine shows an NVIDIA GPU: /dev/nvidia0 exists or nvidia-smi is on PATH.

  Args:
    exists: tells whether a path exists (a seam for tests).
    which: finds a program on PATH, None if absent (a seam for tests).
  """
  return any(exists(path) for path in NVIDIA_DEVICE_FILES) or which("nvidia-smi") is not None


def _pci_ids() -> list[tuple[str, str]]:
  """(vendor, device) ids of the machine's PCI devices, read from /sys."""
  ids = []
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      device = pathlib.Path(vendor).with_name("device").read_text().strip()
      ids.append((pathlib.Path(vendor).read_text().strip(), device))
    except OSError:
      continue
  return ids


def tpu_visible(*, exists: Callable[[str], bool] = os.path.exists,
                pci_ids: Optional[Callable[[], Sequence[tuple[str, str]]]] = None) -> bool:
  """Whether the machine shows a Google TPU: /dev/accel0, or a TPU chip on the PCI bus.

  Args:
    exists: tells whether a path exists (a seam for tests).
    pci_ids: returns the (vendor, device) ids of the PCI devices (a seam for tests).
  """
  if any(exists(path) for path in TPU_DEVICE_FILES):
    return True
  return any(vendor == _GOOGLE_PCI_VENDOR and device in _TPU_PCI_DEVICES
             for vendor, device in (pci_ids or _pci_ids)())


def installed_cuda_plugin() -> Optional[str]:
  """The name of the installed jax CUDA plugin package, None if there is none."""
  for name in _CUDA_PLUGINS:
    try:
      importlib.metadata.version(name)
      return name
    except importlib.metadata.PackageNotFoundError:
      continue
  return None


def _allowed(platforms: Optional[str], names: Sequence[str]) -> bool:
  """Whether a `JAX_PLATFORMS` value (None or empty: any platform) lets jax use `names`."""
  chosen = {p.strip() for p in (platforms or "").split(",") if p.strip()}
  return not chosen or bool(chosen & set(names))


def cpu_only_warning(*, backend: Optional[str] = None,
                     gpu_visible: Optional[Callable[[], bool]] = None,
                     tpu_visible_probe: Optional[Callable[[], bool]] = None,
                     platforms: Optional[str] = None,
                     cuda_plugin: Optional[Callable[[], Optional[str]]] = None) -> Optional[str]:
  """One line when an accelerator is visible but jax computes on the CPU; None otherwise.

  Args:
    backend: jax's default backend name (default: `jax.default_backend()`).
    gpu_visible: probe for an NVIDIA GPU (default: `nvidia_gpu_visible`).
    tpu_visible_probe: probe for a TPU (default: `tpu_visible`).
    platforms: the `JAX_PLATFORMS` setting (default: jax's config); one that leaves the
      accelerator out was chosen, so it gets no warning.
    cuda_plugin: returns the installed jax CUDA plugin's name or None (default:
      `installed_cuda_plugin`).

  Returns:
    The warning line, or None.
  """
  if (backend or jax.default_backend()) != "cpu":
    return None
  if platforms is None:
    # jax sets its options as attributes of its Config at run time; its stub lists none.
    platforms = jax.config.jax_platforms  # type: ignore[attr-defined]
  if _allowed(platforms, ("cuda", "gpu")) and (gpu_visible or nvidia_gpu_visible)():
    plugin = (cuda_plugin or installed_cuda_plugin)()
    if plugin:
      return (f"warning: an NVIDIA GPU is visible but jax runs on the CPU only: {plugin} is "
              "installed but did not start (see jax's own message; a driver older than the "
              "plugin's CUDA?)")
    return ("warning: an NVIDIA GPU is visible but jax runs on the CPU only; install jax for "
            "CUDA: pip install -e '.[cuda12]' (or '.[cuda13]')")
  if _allowed(platforms, ("tpu",)) and (tpu_visible_probe or tpu_visible)():
    return ("warning: a TPU is visible but jax runs on the CPU only; install jax for TPU: "
            "pip install -e '.[tpu]'")
  return None


def report(log: Callable[[str], None] = print) -> None:
  """Logs `describe()` and, if any, `cpu_only_warning()`: once per process.

  Args:
    log: where the lines go: the normal log of a training run, `stderr_log` for the tools
      whose standard output is their result.
  """
  global _reported
  if _reported:
    return
  _reported = True
  log(describe())
  warning = cpu_only_warning()
  if warning:
    log(warning)


def stderr_log(line: str) -> None:
  """Prints one line to standard error."""
  print(line, file=sys.stderr)
