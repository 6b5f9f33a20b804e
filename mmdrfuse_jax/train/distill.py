"""What the student takes from its frozen teacher (SPEC section 3).

* `init_student_from_teacher`: the student's `conv2` starts from the teacher's `conv00`.
* `teacher_targets`: the two maps the distillation loss reads of the teacher's forward pass.
* `jitted_teacher_targets`: those maps jitted for a mesh (`teacher_cache.py` keeps them per
  patch).
* `teacher_features`: the teacher's first encoder maps of one image, a perception space that
  needs no download (`config.loss.perception = "teacher"`).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, cast

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmdrfuse_jax.models import networks


def init_student_from_teacher(student_params: Any, teacher_params: Any) -> Any:
  """The student's conv2 starts from the teacher's conv00 (both 4 -> 1), as published."""
  params = (flax.core.unfreeze(student_params)
            if isinstance(student_params, flax.core.FrozenDict) else dict(student_params))
  # A copy: the teacher is passed to the step too, and the state's buffers are donated.
  params["conv2"] = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True),
                                           dict(teacher_params["conv00"]))
  return params


TEACHER_FEATURE_LAYERS = ("conv1", "conv2")  # G1 and G2: 2 -> 32 -> 32 at full resolution.


def teacher_features(teacher_params: Any, x: jax.Array, precision: str = "exact"
                     ) -> tuple[jax.Array, ...]:
  """The frozen teacher's G1 and G2 maps of single-channel images, (B, H, W, 32) each.

  The teacher reads (infrared, visible); a lone image `x` (B, H, W, 1) goes in as both, so
  its features say what the teacher's first layers, trained for fusion, see in it. Only
  these two full-resolution layers run (about 10k multiply-adds a pixel), the published
  teacher's own padding and convolutions. Differentiable in `x`.
  """
  del precision  # Two small layers: always float32, highest precision.
  y = jnp.concatenate([x, x], axis=-1)
  maps = []
  for name in TEACHER_FEATURE_LAYERS:
    layer = teacher_params[name]
    y = jax.lax.conv_general_dilated(
        networks.reflect_pad(y), jnp.asarray(layer["kernel"], jnp.float32), (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    y = jax.nn.relu(y + jnp.asarray(layer["bias"], jnp.float32))
    maps.append(y)
  return tuple(maps)


def teacher_targets(teacher_params: Any, x: jax.Array, precision: str = "exact") -> jax.Array:
  """What distillation needs of the frozen teacher: (B, H, W, 2) = [sum_c t_feat, t_out].

  The distillation loss only sees the teacher's features summed over channels, so one map
  stands for the four channels exactly. `precision`: the teacher's (see `precision.py`).
  """
  # Without `mutable`, apply returns the network's output dict (Flax's annotation also allows
  # the (output, variables) pair of the mutable case).
  t = cast(Mapping[str, Any], networks.Teacher(precision=precision).apply(
      {"params": teacher_params}, x))
  return jnp.concatenate([jnp.sum(t["feat"], axis=-1, keepdims=True), t["out"]], axis=-1)


@functools.lru_cache(maxsize=8)
def jitted_teacher_targets(mesh: Mesh, precision: str):
  """`teacher_targets` jitted for `mesh` (cached: caches on one mesh share a compilation)."""
  batch = NamedSharding(mesh, P("data"))
  return jax.jit(functools.partial(teacher_targets, precision=precision),
                 in_shardings=(NamedSharding(mesh, P()), batch), out_shardings=batch)
