"""`bench.py torch-baseline`: the student, the teacher and the student's train step in PyTorch.

A PyTorch (NCHW) baseline written from the specification (SPEC sections 1, 3 and 4), timed on
the same workloads as the JAX benchmarks so that the suite can put the two side by side:

* `Student` and `Teacher`: every 3x3 convolution preceded by reflection padding of 1, the
  teacher's x2 upsampling PyTorch's bicubic (`align_corners=False`, coefficient -0.75), the
  concatenations in the published order. Their parameter names are those of the published
  `state_dict`s (`conv1.1.weight`: index 0 of each layer is the padding), so
  `load_published` reads `weights/student.model` and `weights/teacher.model` as they are.
  The teacher keeps the published rule: even heights and widths only.
* `VGG19`: torchvision's VGG-19 `features` (configuration "E", the same layer indices) built
  from plain `torch.nn` layers up to relu5_4, all five taps in one pass, with the seeded random
  weights of the reference's golden taps (`random_vgg19_state`): a benchmark times, it needs
  no ImageNet weights.
* The training losses (intensity, gradient, perception, distillation, the training SSIM and
  GMSD and the two refresh losses) and `StudentTrainStep`: one step of the student as the
  published code trains it in a later epoch: the frozen teacher's forward pass in the step,
  VGG-19 on the sources, the output and both memories, the comprehensive loss
  `L_int + 2 L_percep + L_grad + 5 L_distill + L_refresh` with batch refresh decisions,
  backward, Adam (PyTorch defaults, learning rate 1e-4), and the memory writes. The decisions
  are computed with `torch.where` (no value leaves the device, every term is computed every
  step), so a step costs the same whatever is decided, and `torch.compile` sees one graph.

Timings are medians after warm-up with the device work finished (`torch.cuda.synchronize` on
a GPU), inference under `torch.no_grad`, the thread count left at PyTorch's default, eager
and through `torch.compile` (a compilation that fails is reported as a skipped figure with
its reason). "exact" precision (the default, like the JAX `exact` mode that the suite compares
with) turns TF32 off for convolutions and matrix products on NVIDIA GPUs; "default" leaves
PyTorch's own settings (TF32 convolutions on recent NVIDIA GPUs).

PyTorch is optional (`pip install -e '.[bench]'`): it is imported inside the functions, so
importing this module never needs it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import statistics
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

MISSING = "torch is not installed (pip install -e '.[bench]')"
VGG_SEED = 20241127  # The seed of the reference's golden VGG-19 taps (vgg19_random.npz).
PRECISIONS = ("exact", "default")
MODES = ("eager", "compiled")

# The comprehensive loss's weights of the published code (SPEC section 3) and the factor of
# the refresh weights (SPEC section 4).
STUDENT_WEIGHTS = {"int": 1.0, "percep": 2.0, "grad": 1.0, "distill": 5.0, "refresh": 1.0}
REFRESH_SCALE = 10.0
LEARNING_RATE = 1e-4

TEACHER_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "conv66", "conv55",
                  "conv44", "conv33", "conv22", "conv11", "conv00")
# torchvision's VGG-19 "features": channels per conv of each block; a 2x2/2 max-pool ends the
# blocks; taps after the last ReLU of each block (features[3], [8], [17], [26], [35]).
VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512),
              (512, 512, 512, 512))
VGG_TAP_INDICES = (3, 8, 17, 26, 35)


def available() -> bool:
  """Whether `torch` can be found (without importing it)."""
  try:
    return importlib.util.find_spec("torch") is not None
  except (ImportError, ValueError):
    return False


def _torch() -> Any:
  """The `torch` module, imported on first use (typed Any: checked with or without torch)."""
  import torch  # type: ignore[import-not-found, unused-ignore]  # pylint: disable=g-import-not-at-top

  return torch


# ------------------------------------------------------------------------------- networks


@functools.cache
def _classes():  # Unannotated: mypy leaves the body (classes on a runtime base) unchecked.
  """The `torch.nn.Module` classes, defined on first use (they subclass a torch class)."""
  torch = _torch()
  nn, F = torch.nn, torch.nn.functional

  def conv(cin: int, cout: int, stride: int = 1) -> Any:
    # Index 0 the padding, index 1 the convolution: the published state_dict's key layout.
    return nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3, stride))

  class Student(nn.Module):
    """The 113-parameter student: conv1 2->4, ReLU, conv2 4->1, tanh."""

    def __init__(self):
      super().__init__()
      self.conv1 = conv(2, 4)
      self.conv2 = conv(4, 1)

    def intermediates(self, x):
      feat_pre = self.conv1(x)
      feat = F.relu(feat_pre)
      out_pre = self.conv2(feat)
      return {"feat_pre": feat_pre, "feat": feat, "out_pre": out_pre, "out": torch.tanh(out_pre)}

    def forward(self, x):
      """(B, 2, H, W) stacked [ir, visible] -> (s_feat, s_out)."""
      feat = F.relu(self.conv1(x))
      return feat, torch.tanh(self.conv2(feat))

  class Teacher(nn.Module):
    """The 556,489-parameter teacher (SPEC section 1); even heights and widths only."""

    def __init__(self):
      super().__init__()
      for name, cin, cout, stride in (
          ("conv1", 2, 32, 1), ("conv2", 32, 32, 1), ("conv3", 64, 64, 2), ("conv4", 64, 64, 1),
          ("conv5", 128, 64, 1), ("conv6", 192, 64, 1), ("conv66", 64, 64, 1),
          ("conv55", 128, 64, 1), ("conv44", 128, 64, 1), ("conv33", 128, 64, 1),
          ("conv22", 96, 32, 1), ("conv11", 64, 4, 1), ("conv00", 4, 1, 1)):
        setattr(self, name, conv(cin, cout, stride))

    def intermediates(self, x):
      height, width = x.shape[-2:]
      if height % 2 or width % 2:
        raise ValueError(f"the published teacher needs even sizes, got {height}x{width}")
      g1 = F.relu(self.conv1(x))
      g2 = F.relu(self.conv2(g1))
      g3 = F.relu(self.conv3(torch.cat([g1, g2], 1)))
      g4 = F.relu(self.conv4(g3))
      g5 = F.relu(self.conv5(torch.cat([g3, g4], 1)))
      g6 = F.relu(self.conv6(torch.cat([g3, g4, g5], 1)))
      d6 = F.relu(self.conv66(g6))
      d5 = F.relu(self.conv55(torch.cat([g5, d6], 1)))
      d4 = F.relu(self.conv44(torch.cat([g4, d5], 1)))
      d3 = F.relu(self.conv33(torch.cat([g3, d4], 1)))
      up = F.interpolate(d3, scale_factor=2, mode="bicubic", align_corners=False)
      d2 = F.relu(self.conv22(torch.cat([g2, up], 1)))
      feat_pre = self.conv11(torch.cat([g1, d2], 1))
      feat = F.relu(feat_pre)
      out_pre = self.conv00(feat)
      return {"encoder": (g1, g2, g3, g4, g5, g6), "feat_pre": feat_pre, "feat": feat,
              "out_pre": out_pre, "out": torch.tanh(out_pre)}

    def forward(self, x):
      """(B, 2, H, W) stacked [ir, visible] -> (t_feat, t_out)."""
      t = self.intermediates(x)
      return t["feat"], t["out"]

  class VGG19(nn.Module):
    """torchvision's VGG-19 `features[:36]` (to relu5_4) in plain layers; frozen."""

    def __init__(self):
      super().__init__()
      layers, cin = [], 3
      for b, block in enumerate(VGG_BLOCKS):
        for cout in block:
          layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
          cin = cout
        if b < len(VGG_BLOCKS) - 1:
          layers.append(nn.MaxPool2d(2, 2))
      self.features = nn.Sequential(*layers)
      self.requires_grad_(False)

    def forward(self, x, num_taps: int = len(VGG_TAP_INDICES)):
      """The first `num_taps` taps of (B, 1 or 3, H, W) images (gray repeated, no normalising)."""
      if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
      taps = []
      for index, layer in enumerate(self.features):
        x = layer(x)
        if index in VGG_TAP_INDICES:
          taps.append(x)
          if len(taps) == num_taps:
            break
      return tuple(taps)

  class StepLoss(nn.Module):
    """Everything of the student's step before backward: the loss and the refresh decisions."""

    def __init__(self, student, teacher, vgg):
      super().__init__()
      self.student, self.teacher, self.vgg = student, teacher, vgg

    def forward(self, ir, vi, mem_ssim, mem_gmsd):
      return student_step_loss(self.student, self.teacher, self.vgg, ir, vi, mem_ssim, mem_gmsd)

  return dict(Student=Student, Teacher=Teacher, VGG19=VGG19, StepLoss=StepLoss)


def build(model: str) -> Any:
  """A new `Student` or `Teacher` (`torch.nn.Module`, PyTorch's default initialisation)."""
  if model not in ("student", "teacher"):
    raise ValueError(f"unknown model {model!r}; choose one of student, teacher")
  return _classes()["Student" if model == "student" else "Teacher"]()


def load_published(path: str | os.PathLike, model: str) -> Any:
  """The network with the published weights: a `torch.save`d `state_dict` (`.model`).

  Read with `torch.load(..., weights_only=True)` (no code in the file runs) and loaded
  strictly: a missing, unexpected or misshapen tensor raises.
  """
  net = build(model)
  state = _torch().load(os.fspath(path), map_location="cpu", weights_only=True)
  net.load_state_dict(state, strict=True)
  return net.eval()


def random_vgg19_state(seed: int = VGG_SEED) -> dict[str, np.ndarray]:
  """Seeded random VGG-19 `features` weights, the recipe of the reference's golden taps.

  For each conv in order: weight = N(0, 1) of shape (out, in, 3, 3) * sqrt(2 / (in * 9)), then
  bias = N(0, 1) * 0.01, drawn in float64 from `np.random.default_rng(seed)`, cast to float32.
  Keys are torchvision's (`features.0.weight`, ...).
  """
  rng = np.random.default_rng(seed)
  state, index, cin = {}, 0, 3
  for block in VGG_BLOCKS:
    for cout in block:
      weight = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))
      bias = rng.standard_normal(cout) * 0.01
      state[f"features.{index}.weight"] = weight.astype(np.float32)
      state[f"features.{index}.bias"] = bias.astype(np.float32)
      index, cin = index + 2, cout
    index += 1
  return state


def vgg19(seed: int = VGG_SEED) -> Any:
  """The frozen VGG-19 stack with `random_vgg19_state(seed)` weights, in eval mode."""
  torch = _torch()
  net = _classes()["VGG19"]()
  net.load_state_dict({k: torch.from_numpy(v) for k, v in random_vgg19_state(seed).items()},
                      strict=True)
  return net.eval()


# ---------------------------------------------------------------------------------- losses
# NCHW tensors; images (B, 1, H, W). The filters' kernels are made on the input's device.


def intensity_loss(out: Any, ir: Any, vi: Any) -> Any:
  """L_int = mean(|max(ir, vi) - out|)."""
  torch = _torch()
  return torch.mean(torch.abs(torch.maximum(ir, vi) - out))


def gradient(x: Any) -> Any:
  """Cross-correlation with [[1,1,1],[1,-8,1],[1,1,1]] / 8, zero padding 1, of (B, 1, H, W)."""
  torch = _torch()
  kernel = torch.ones((1, 1, 3, 3), device=x.device, dtype=x.dtype)
  kernel[:, :, 1, 1] = -8.0
  return torch.nn.functional.conv2d(x, kernel / 8, padding=1)


def gradient_mse(out: Any, ir: Any, vi: Any) -> Any:
  """mean((grad(out) - grad(max(ir, vi)))^2), the published code's form, before its /10."""
  torch = _torch()
  return torch.mean(torch.square(gradient(out) - gradient(torch.maximum(ir, vi))))


def gradient_loss(out: Any, ir: Any, vi: Any) -> Any:
  """L_grad = gradient_mse / 10."""
  return gradient_mse(out, ir, vi) / 10


def _mse(a: Any, b: Any) -> Any:
  return _torch().mean(_torch().square(a - b))


def perception_loss(taps_out: Sequence[Any], taps_ir: Sequence[Any], taps_vi: Sequence[Any]
                    ) -> Any:
  """L_percep = (1/5) sum_k mean((max(phi_k(ir), phi_k(vi)) - phi_k(out))^2)."""
  torch = _torch()
  terms = [_mse(torch.maximum(i, v), o) for o, i, v in zip(taps_out, taps_ir, taps_vi)]
  return sum(terms) / len(terms)


def _attention(x: Any) -> Any:
  a = x.sum(1)  # (B, H, W): summed over channels, normalised over the whole batch tensor.
  return a / a.norm().clamp_min(1e-12)


def distillation_loss(s_feat: Any, t_feat: Any, s_out: Any, t_out: Any) -> Any:
  """L_distill (before its x5) = (term(feat) + term(out)) / 2, term = sum((a(s) - a(t))^2)."""
  torch = _torch()
  def term(s, t):
    return torch.sum(torch.square(_attention(s) - _attention(t)))
  return (term(s_feat, t_feat) + term(s_out, t_out)) / 2


def ssim(x: Any, y: Any) -> Any:
  """Training SSIM: 11x11 Gaussian (sigma 1.5), 'valid', L from all of `x`, batch mean."""
  torch = _torch()
  size = min(11, x.shape[-2], x.shape[-1])
  g = torch.arange(size, device=x.device, dtype=x.dtype) - size // 2
  g = torch.exp(-g * g / (2 * 1.5**2))
  g = g / g.sum()
  window = (g[:, None] * g[None, :]).expand(5, 1, size, size).contiguous()
  moments = torch.nn.functional.conv2d(torch.cat([x, y, x * x, y * y, x * y], 1), window,
                                       groups=5)
  mu_x, mu_y, e_xx, e_yy, e_xy = moments.unbind(1)
  hi = torch.where(x.max() > 128, 255.0, 1.0)
  lo = torch.where(x.min() < -0.5, -1.0, 0.0)
  data_range = hi - lo
  c1, c2 = (0.01 * data_range)**2, (0.03 * data_range)**2
  mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
  v1 = 2 * (e_xy - mu_xy) + c2
  v2 = (e_xx - mu_xx) + (e_yy - mu_yy) + c2
  return torch.mean((2 * mu_xy + c1) * v1 / ((mu_xx + mu_yy + c1) * v2))


def _gradient_magnitude(x: Any) -> Any:
  torch = _torch()
  F = torch.nn.functional
  x = x * torch.where(x.amax(dim=(1, 2, 3), keepdim=True) <= 1, 255.0, 1.0)
  # The 2x2 'valid' mean filter then every second row and column from 0: a 2x2/2 pooling.
  x = F.avg_pool2d(x, 2, 2)
  prewitt = ((1 - torch.arange(3, device=x.device, dtype=x.dtype)) / 3).expand(3, 3)
  gx = F.conv2d(x, prewitt[None, None].contiguous())
  gy = F.conv2d(x, prewitt.T[None, None].contiguous())
  return torch.sqrt(gx * gx + gy * gy)


def gmsd_per_image(x: Any, y: Any) -> Any:
  """Training GMSD of each image pair, shape (B,): std (n - 1) of the GMS map."""
  ma, mb = _gradient_magnitude(x), _gradient_magnitude(y)
  gms = (2 * ma * mb + 170.0) / (ma * ma + mb * mb + 170.0)
  return gms.flatten(1).std(dim=1)


def gmsd(x: Any, y: Any) -> Any:
  """Training GMSD: `gmsd_per_image` averaged over the batch."""
  return gmsd_per_image(x, y).mean()


def refresh_ssim_loss(taps_mem: Sequence[Any], taps_out: Sequence[Any], mem: Any, out: Any
                      ) -> Any:
  """L_s = (1/2) sum_{k=4,5} mean((phi_k(mem) - phi_k(out))^2) + mean(|mem - out|)."""
  torch = _torch()
  vgg = (_mse(taps_mem[3], taps_out[3]) + _mse(taps_mem[4], taps_out[4])) / 2
  return vgg + torch.mean(torch.abs(mem - out))


def refresh_gmsd_loss(taps_mem: Sequence[Any], taps_out: Sequence[Any], mem: Any, out: Any
                      ) -> Any:
  """L_g = (1/3) sum_{k=1..3} mean((phi_k(mem) - phi_k(out))^2) + mse(grad(out), grad(mem))."""
  vgg = sum(_mse(taps_mem[k], taps_out[k]) for k in range(3)) / 3
  return vgg + _mse(gradient(out), gradient(mem))


def student_step_loss(student: Any, teacher: Any, vgg: Any, ir: Any, vi: Any, mem_ssim: Any,
                      mem_gmsd: Any) -> tuple[Any, Any, dict[str, Any]]:
  """The student's comprehensive loss for one batch in a later epoch (SPEC sections 3 and 4).

  Args:
    student, teacher, vgg: the networks (teacher and VGG-19 frozen).
    ir, vi: (B, 1, H, W) sources in [0, 1].
    mem_ssim, mem_gmsd: (B, 1, H, W) the batch's images of the two refresh memories.

  Returns:
    `(loss, out, stats)`: the total loss (differentiable w.r.t. the student), the fused output
    (detached, for the memory writes) and a dict of detached scalars: each term, the refresh
    weights (0 where no loss) and `replace_ssim`/`replace_gmsd` (write `out` into a memory).
  """
  torch = _torch()
  x = torch.cat([ir, vi], 1)
  b = ir.shape[0]
  with torch.no_grad():  # Constants w.r.t. the student.
    taps_src = vgg(torch.cat([ir, vi], 0))
    taps_ir, taps_vi = [t[:b] for t in taps_src], [t[b:] for t in taps_src]
    t_feat, t_out = teacher(x)
    s_best = ssim(mem_ssim, ir) + ssim(mem_ssim, vi)
    g_best = gmsd(mem_gmsd, ir) + gmsd(mem_gmsd, vi)
    taps_mem_ssim = vgg(mem_ssim, 5)
    taps_mem_gmsd = vgg(mem_gmsd, 3)
  s_feat, out = student(x)
  taps_out = vgg(out)
  terms = {"int": intensity_loss(out, ir, vi),
           "percep": perception_loss(taps_out, taps_ir, taps_vi),
           "grad": gradient_loss(out, ir, vi),
           "distill": distillation_loss(s_feat, t_feat, out, t_out)}
  with torch.no_grad():  # Batch decisions on the output before this step's update.
    out_const = out.detach()
    s_cur = ssim(out_const, ir) + ssim(out_const, vi)
    g_cur = gmsd(out_const, ir) + gmsd(out_const, vi)
    w_ssim = torch.where(s_cur < s_best, REFRESH_SCALE * (s_best - s_cur), 0.0)
    w_gmsd = torch.where(g_cur > g_best, REFRESH_SCALE * (g_cur - g_best), 0.0)
  l_ssim = refresh_ssim_loss(taps_mem_ssim, taps_out, mem_ssim, out)
  l_gmsd = refresh_gmsd_loss(taps_mem_gmsd, taps_out, mem_gmsd, out)
  terms["refresh"] = w_ssim * l_ssim + w_gmsd * l_gmsd
  loss = sum(STUDENT_WEIGHTS[name] * value for name, value in terms.items())
  stats = {f"l_{name}": value.detach() for name, value in terms.items()}
  stats.update(l_refresh_ssim=l_ssim.detach(), l_refresh_gmsd=l_gmsd.detach(),
               w_refresh_ssim=w_ssim, w_refresh_gmsd=w_gmsd,
               replace_ssim=s_cur > s_best, replace_gmsd=g_cur < g_best)
  return loss, out_const, stats


class StudentTrainStep:
  """The student's full training step in PyTorch, with its optimiser and refresh memories.

  Args:
    student, teacher, vgg: the networks (moved to `device`; teacher and VGG-19 frozen).
    num_patches: slots of each refresh memory, float32 (N, 1, size, size) on `device`.
    size: patch height and width.
    device: a `torch.device` or its name.
    compiled: run the loss through `torch.compile` (backward and Adam stay eager).
  """

  def __init__(self, student: Any, teacher: Any, vgg: Any, num_patches: int, size: int,
               device: Any = "cpu", compiled: bool = False):
    torch = _torch()
    self.student = student.to(device).train()
    teacher = teacher.to(device).eval().requires_grad_(False)
    vgg = vgg.to(device).eval().requires_grad_(False)
    self.optimizer = torch.optim.Adam(self.student.parameters(), lr=LEARNING_RATE)
    self.memory = {kind: torch.zeros((num_patches, 1, size, size), device=device)
                   for kind in ("ssim", "gmsd")}
    loss = _classes()["StepLoss"](self.student, teacher, vgg)
    self.loss_fn = torch.compile(loss, dynamic=False) if compiled else loss

  def fill_memories(self, ids: Any, images: Any) -> None:
    """Writes `images` into both memories at `ids` (as the first epoch does)."""
    for memory in self.memory.values():
      memory[ids] = images

  def __call__(self, ir: Any, vi: Any, ids: Any) -> dict[str, Any]:
    """One step on (B, 1, H, W) sources and (B,) int64 patch ids; returns `stats` (tensors)."""
    torch = _torch()
    mem_ssim, mem_gmsd = self.memory["ssim"][ids], self.memory["gmsd"][ids]
    loss, out, stats = self.loss_fn(ir, vi, mem_ssim, mem_gmsd)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    with torch.no_grad():
      self.memory["ssim"][ids] = torch.where(stats["replace_ssim"], out, mem_ssim)
      self.memory["gmsd"][ids] = torch.where(stats["replace_gmsd"], out, mem_gmsd)
    return {"loss": loss.detach(), **stats}


# ------------------------------------------------------------------------------- workloads


@dataclasses.dataclass(frozen=True)
class Workload:
  """One timed workload and the JAX suite item that measures the same work.

  Attributes:
    name: e.g. `infer-student-640x480` (width x height) or `train-step-student`.
    kind: `infer` (time per image) or `train-step` (time per step).
    model: `student` or `teacher` (a train step is the student's).
    height, width: image (or patch) size.
    batch: images per call.
    jax_item: the name of the suite's item it is compared with.
  """

  name: str
  kind: str
  model: str
  height: int
  width: int
  batch: int
  jax_item: str


def workloads(reduced: bool = False) -> list[Workload]:
  """Student inference at two sizes, the teacher's at the smaller, the student's train step.

  Full: 1280x1024 and 640x480, batch 1, and a step of 25 patches of 128x128 (the published
  recipe); reduced (a CPU check of the suite itself): 128x96 and 64x48, and 2 patches of 32x32.
  """
  (small_h, small_w), (large_h, large_w) = ((48, 64), (96, 128)) if reduced else (
      (480, 640), (1024, 1280))
  step_batch, step_size = (2, 32) if reduced else (25, 128)
  chosen = [Workload(f"infer-student-{w}x{h}", "infer", "student", h, w, 1,
                     f"infer-student-{w}x{h}-b1")
            for h, w in ((large_h, large_w), (small_h, small_w))]
  chosen.append(Workload(f"infer-teacher-{small_w}x{small_h}", "infer", "teacher", small_h,
                         small_w, 1, f"infer-teacher-{small_w}x{small_h}-b1"))
  chosen.append(Workload("train-step-student", "train-step", "student", step_size, step_size,
                         step_batch, "train-step-student-teacher-in-step"))
  return chosen


def resolve_device(name: str = "auto") -> Any:
  """A `torch.device`: `auto` is CUDA where PyTorch sees a GPU, else the CPU."""
  torch = _torch()
  if name == "auto":
    name = "cuda" if torch.cuda.is_available() else "cpu"
  return torch.device(name)


def device_description(device: Any) -> str:
  """A human-readable name of `device` (with the CPU core and thread counts on a CPU)."""
  torch = _torch()
  if device.type == "cuda":
    return f"cuda: {torch.cuda.get_device_name(device)}"
  return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


@contextlib.contextmanager
def float32_precision(precision: str) -> Iterator[None]:
  """Within: "exact" turns TF32 off on NVIDIA GPUs (convolutions and matmuls); "default"
  changes nothing. The previous settings come back on exit."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
  torch = _torch()
  saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
  if precision == "exact":
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
  try:
    yield
  finally:
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def time_call(fn: Callable[[], Any], sync: Callable[[], None], *, repeats: int, warmup: int = 2
              ) -> dict[str, float | int]:
  """Median time of `fn()` with the device work finished (`sync()`), after `warmup` calls.

  Returns:
    `median_s`, `min_s`, `runs`, and `first_call_s` (the first warm-up call: with
    `torch.compile`, the compilation).
  """
  first = 0.0
  for i in range(warmup):
    start = time.perf_counter()
    fn()
    sync()
    if i == 0:
      first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - start)
  return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times),
          "first_call_s": first}


def _sync(device: Any) -> Callable[[], None]:
  torch = _torch()
  return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _sources(workload: Workload, device: Any) -> tuple[Any, Any]:
  """Random [0, 1) infrared and visible batches (the cost does not depend on the values)."""
  torch = _torch()
  rng = np.random.default_rng(0)
  shape = (workload.batch, 1, workload.height, workload.width)
  return tuple(torch.from_numpy(rng.random(shape, dtype=np.float32)).to(device)
               for _ in range(2))


def _compile_failure(e: BaseException) -> str:
  first_line = (str(e).strip().splitlines() or [""])[0][:300]
  return f"torch.compile failed: {type(e).__name__}: {first_line}"


def time_infer(workload: Workload, *, compiled: bool, device: Any, repeats: int) -> dict:
  """Time per image of the network's forward pass (concatenation included, `torch.no_grad`).

  Random weights (PyTorch's initialisation, seed 0) and images. Returns `ms_per_image`,
  `ms_per_image_min`, `runs`, and `compile_s` when compiled.
  """
  torch = _torch()
  torch.manual_seed(0)
  net = build(workload.model).to(device).eval()
  ir, vi = _sources(workload, device)

  def fuse(ir, vi):
    return net(torch.cat([ir, vi], 1))[1]

  if compiled:
    torch._dynamo.reset()  # pylint: disable=protected-access  # A compilation of its own.
    fuse = torch.compile(fuse, dynamic=False)
  with torch.no_grad():
    timing = time_call(lambda: fuse(ir, vi), _sync(device), repeats=repeats)
  result = {"ms_per_image": 1e3 * timing["median_s"] / workload.batch,
            "ms_per_image_min": 1e3 * timing["min_s"] / workload.batch, "runs": timing["runs"]}
  if compiled:
    result["compile_s"] = max(timing["first_call_s"] - timing["median_s"], 0.0)
  return result


def make_train_step(batch: int, size: int, *, device: Any, compiled: bool, seed: int = 0
                    ) -> tuple[StudentTrainStep, Any, Any, Any]:
  """A `StudentTrainStep` on random data as in a later epoch, every refresh loss active.

  Random student and teacher (PyTorch's initialisation; the student's conv2 starts as the
  teacher's conv00, as the published recipe does) and the seeded random VGG-19. Both memories
  hold max(ir, vi) for the batch's patches, which scores better than the untrained student's
  output, so the refresh losses are on (their cost does not depend on it: every term is
  computed every step).

  Returns:
    `(step, ir, vi, ids)`.
  """
  torch = _torch()
  torch.manual_seed(seed)
  student, teacher = build("student"), build("teacher")
  with torch.no_grad():
    student.conv2.load_state_dict(teacher.conv00.state_dict())
  step = StudentTrainStep(student, teacher, vgg19(), batch, size, device, compiled)
  ir, vi = _sources(Workload("", "train-step", "student", size, size, batch, ""), device)
  ids = torch.arange(batch, device=device)
  step.fill_memories(ids, torch.maximum(ir, vi))
  return step, ir, vi, ids


def time_train_step(workload: Workload, *, compiled: bool, device: Any, repeats: int) -> dict:
  """Time per step of `StudentTrainStep` (`make_train_step`); one warm-up step.

  Returns `ms_per_step`, `ms_per_step_min`, `runs`, whether each refresh loss was on in the
  last step, and `compile_s` when compiled.
  """
  torch = _torch()
  if compiled:
    torch._dynamo.reset()  # pylint: disable=protected-access
  step, ir, vi, ids = make_train_step(workload.batch, workload.height, device=device,
                                      compiled=compiled)
  box: dict[str, Any] = {}

  def one_step():
    box["stats"] = step(ir, vi, ids)

  # Later steps refresh the same slots, as the JAX benchmark does.
  timing = time_call(one_step, _sync(device), repeats=repeats, warmup=2 if compiled else 1)
  stats = box["stats"]
  result = {"ms_per_step": 1e3 * timing["median_s"], "ms_per_step_min": 1e3 * timing["min_s"],
            "runs": timing["runs"], "loss": float(stats["loss"]),
            "refresh_ssim_loss_on": float(stats["w_refresh_ssim"] > 0),
            "refresh_gmsd_loss_on": float(stats["w_refresh_gmsd"] > 0)}
  if compiled:
    result["compile_s"] = max(timing["first_call_s"] - timing["median_s"], 0.0)
  return result


def run_workload(workload: Workload, *, modes: Sequence[str] = MODES, device: Any = None,
                 repeats: int = 10, precision: str = "exact") -> dict:
  """Times `workload` eager and/or compiled.

  Returns:
    The workload's fields and, per mode, the timing dict; a compilation that fails gives
    `{"skipped": "torch.compile failed: ..."}` instead of a figure.
  """
  torch = _torch()
  device = resolve_device() if device is None else device
  time_fn = time_infer if workload.kind == "infer" else time_train_step
  result: dict[str, Any] = dataclasses.asdict(workload)
  with float32_precision(precision):
    for mode in modes:
      if mode == "eager":
        result["eager"] = time_fn(workload, compiled=False, device=device, repeats=repeats)
      else:
        try:
          result["compiled"] = time_fn(workload, compiled=True, device=device, repeats=repeats)
        except Exception as e:  # pylint: disable=broad-except  # Reported, not raised.
          result["compiled"] = {"skipped": _compile_failure(e)}
      if device.type == "cuda":
        torch.cuda.empty_cache()
  return result


# ------------------------------------------------------------------------------------ CLI


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser(
      "torch-baseline", help="the PyTorch baseline (student, teacher, train step; needs torch)")
  names = ", ".join(w.name for w in workloads())
  parser.add_argument("--only", default="",
                      help=f"comma-separated workloads (default: all: {names}; with --reduced "
                      "the sizes are the reduced ones)")
  parser.add_argument("--reduced", action="store_true", help="tiny sizes (a CPU check)")
  parser.add_argument("--modes", default=",".join(MODES),
                      help="comma-separated: eager, compiled (torch.compile)")
  parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
  parser.add_argument("--precision", choices=PRECISIONS, default="exact",
                      help="exact: no TF32 on NVIDIA GPUs (as JAX's exact mode); default: "
                      "PyTorch's own settings")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed runs (default: 10 for inference, 5 for a train step; 3 and 2 "
                      "with --reduced)")
  parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
  """Times the chosen workloads; exits with one line when torch is not installed."""
  if not available():
    raise SystemExit(f"error: PyTorch baseline: {MISSING}")
  modes = [m for m in args.modes.split(",") if m]
  if not modes or any(m not in MODES for m in modes):
    raise SystemExit(f"error: --modes takes a comma-separated list of {', '.join(MODES)}")
  every = workloads(args.reduced)
  wanted = [w for w in args.only.split(",") if w]
  unknown = sorted(set(wanted) - {w.name for w in every})
  if unknown:
    raise SystemExit(f"error: no workload {', '.join(unknown)}; choose from "
                     f"{', '.join(w.name for w in every)}")
  torch = _torch()
  device = resolve_device(args.device)
  results = []
  for workload in every:
    if wanted and workload.name not in wanted:
      continue
    repeats = args.repeats or {("infer", False): 10, ("train-step", False): 5,
                               ("infer", True): 3, ("train-step", True): 2}[
                                   (workload.kind, args.reduced)]
    results.append(run_workload(workload, modes=modes, device=device, repeats=repeats,
                                precision=args.precision))
  return {"benchmark": "torch-baseline", "torch": torch.__version__,
          "device": device_description(device), "precision": args.precision,
          "reduced": args.reduced, "workloads": results}


def figure(result: dict, mode: str) -> float | None:
  """A workload's headline number in `mode` (ms per image or per step); None if skipped."""
  timing = result.get(mode, {})
  for key in ("ms_per_image", "ms_per_step"):
    if key in timing:
      return float(timing[key])
  return None


def ratio(torch_ms: float | None, jax_ms: float | None) -> float | None:
  """PyTorch's time over JAX's (above 1: JAX is faster); None when either is missing."""
  if torch_ms is None or not jax_ms or not math.isfinite(jax_ms):
    return None
  return torch_ms / jax_ms
