"""Why a fused image collapses: the student's dead units.

`metrics.floor_share` measures the symptom on any fused image (pixels with signal in a source
that the fusion sets to its minimum). `dead_unit_share` measures its cause in the student:
the share of pixels where every `conv1` feature is zero after its ReLU. There `conv2` sees
only its bias, so the output is one constant whatever the sources hold: a student whose
`conv1` biases are all well below zero goes blind in every region darker than a threshold.
"""

from __future__ import annotations

from typing import Any, Mapping, cast

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from mmdrfuse_jax.models import networks


@jax.jit
def dead_unit_map(params: Mapping[str, Any], ir: ArrayLike, vis: ArrayLike) -> jax.Array:
  """(B, H, W) booleans: True where every `conv1` feature of the student is zero.

  Args:
    params: student parameters.
    ir, vis: (B, H, W, 1) floats in [0, 1], as `fusion.fuse` takes them.
  """
  if networks.model_of(params) != "student":
    raise ValueError("dead units are defined for the student (its conv1 features)")
  x = jnp.concatenate([ir, vis], axis=-1).astype(jnp.float32)
  # Without `mutable`, apply returns the outputs alone (Flax types it as maybe a pair).
  outputs = cast(Mapping[str, jax.Array], networks.Student().apply({"params": params}, x))
  feat = outputs["feat"]
  return jnp.all(feat <= 0, axis=-1)


def dead_unit_share(params: Mapping[str, Any], ir: ArrayLike, vis: ArrayLike) -> jax.Array:
  """The share of pixels (over the batch) where every student `conv1` feature is zero."""
  return jnp.mean(dead_unit_map(params, ir, vis).astype(jnp.float32))
