"""How precisely the heavy networks (VGG-19, the teacher) compute: a named setting.

- `exact`: float32 with `Precision.HIGHEST` for every matrix product and convolution. The
  parity tests use it; on NVIDIA GPUs it rules out tensor-core (TF32) math.
- `default`: float32 arrays, the backend's default precision for products and convolutions
  (TF32 on recent NVIDIA GPUs, bfloat16 passes on TPUs). On a CPU it gives the same numbers
  as `exact` but, with jax 0.10.2, runs slower (measured 1.8x for a student step: XLA's CPU
  backend takes another convolution path), so `exact` is the CPU choice.
- `bfloat16`: VGG-19 and the teacher's forward pass compute in bfloat16 (their float32
  parameters are cast, their outputs cast back to float32); losses, gradients and the
  optimiser stay in float32.

The student has no matrix products (its convolutions are sums of scaled planes), so it is
float32 in every mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MODES = ("exact", "default", "bfloat16")


def check(mode: str) -> str:
  """Returns `mode` if it is one of `MODES`, else raises ValueError (one line)."""
  if mode not in MODES:
    raise ValueError(f"precision must be one of {', '.join(MODES)}; got {mode!r}")
  return mode


def lax_precision(mode: str) -> jax.lax.Precision:
  """The `precision=` argument for products and convolutions in `mode`."""
  return jax.lax.Precision.HIGHEST if check(mode) == "exact" else jax.lax.Precision.DEFAULT


def compute_dtype(mode: str) -> jnp.dtype:
  """The dtype that activations and (cast) parameters have inside VGG-19 and the teacher."""
  return jnp.dtype(jnp.bfloat16 if check(mode) == "bfloat16" else jnp.float32)
