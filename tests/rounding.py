"""Tolerances for claims that two float32 computations differ only by rounding.

A fixed absolute tolerance tuned on one CPU does not hold on another: XLA's CPU convolutions
(and onnxruntime's) pick their vector width and their blocking from the processor's
instruction set and cache sizes, so the order in which a convolution's products are summed,
and with it the rounding, changes from machine to machine. On a 2-core AMD EPYC (AVX2, no
AVX-512) the teacher's G6 on a canvas differed from the image run alone by 3.3e-6 where this
project's Intel machines (AVX-512) gave 8.6e-7.

The bound used here is derived from the computation instead:
- A sum of n products computed in two orders differs by a random walk of roundings, each at
  most half an ulp of the running sum's magnitude: about sqrt(n) ulps of the scale of the
  terms (the deterministic worst case, n ulps, is never approached by real summation orders).
- A network adds one such walk per convolution, and independent walks add in quadrature: about
  sqrt(sum of the fan-ins) ulps of the output's scale.
- The element-wise functions after them (the output's tanh; ReLU and the bicubic weights are
  exact or shared) are approximated by polynomials that differ with the vector width and
  between XLA, PyTorch and onnxruntime, each within a few ulps: ELEMENTWISE_ULPS on top.
- The scale is the largest magnitude in the tensor compared, not each element's own value: an
  output near zero is the cancellation of terms as large as the tensor's others, and carries
  their absolute rounding (a per-element relative bound fails there, legitimately).

For the teacher (fan-ins summing to 9,846) that is 107 ulps of the scale, ten times the 9.9
seen on the AMD machine; for the student (54) 15 ulps, about four times the most seen here. A
real fault (a border reflected wrongly, values from outside an image on a canvas leaking in)
moves outputs by percents of the scale, thousands of times more.
"""

from __future__ import annotations

import math

import jax
import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)
ELEMENTWISE_ULPS = 8


def summed_fan_in(params) -> int:
  """The fan-ins (kernel height x width x input channels) of every convolution, summed."""
  return sum(int(np.prod(leaf.shape[:-1])) for leaf in jax.tree_util.tree_leaves(params)
             if np.ndim(leaf) == 4)


def network_ulps(params) -> float:
  """A network's rounding allowance in ulps of its outputs' scale (see the module's docstring)."""
  return math.sqrt(summed_fan_in(params)) + ELEMENTWISE_ULPS


def assert_equal_up_to_rounding(actual, desired, *, ulps: float, err_msg: str = "") -> None:
  """Asserts |actual - desired| <= ulps * float32 eps * max|desired|, element by element."""
  desired = np.asarray(desired)
  scale = float(np.max(np.abs(desired))) if desired.size else 0.0
  np.testing.assert_allclose(actual, desired, rtol=0, atol=ulps * F32_EPS * scale,
                             err_msg=f"{err_msg} (allowed: {ulps:.1f} ulps of {scale:.4g})")
