"""What the student takes from its frozen teacher (SPEC section 3).

* `init_student_from_teacher`: the student's `conv2` starts from the teacher's `conv00`.
* `teacher_targets`: the two maps the distillation loss reads of the teacher's forward pass.
* `TeacherCache`: those targets kept per patch in host RAM after their first computation.
* `teacher_features`: the teacher's first encoder maps of one image, a perception space that
  needs no download (`config.loss.perception = "teacher"`).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, cast

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmdrfuse_jax.models import networks
from mmdrfuse_jax.train import distributed


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
def _jitted_teacher_targets(mesh: Mesh, precision: str):
  """`teacher_targets` jitted for `mesh` (cached: caches on one mesh share a compilation)."""
  batch = NamedSharding(mesh, P("data"))
  return jax.jit(functools.partial(teacher_targets, precision=precision),
                 in_shardings=(NamedSharding(mesh, P()), batch), out_shardings=batch)


class TeacherCache:
  """Host copy of `teacher_targets` per patch id, filled the first time a patch is seen.

  The teacher is frozen, so its targets for a patch never change: computing them once
  instead of every epoch removes the teacher's forward pass from every later step (on a CPU
  that is a large part of a student step; see docs/benchmarks.md). Costs 2 x H x W float32
  of host RAM per patch. Not checkpointed: after a restart it fills again. In a run of
  several processes, each one keeps the targets of the patches of its own batch rows.
  """

  def __init__(self, num_patches: int, patch_size: int, mesh: Mesh, precision: str = "exact"):
    self.values = np.zeros((num_patches, patch_size, patch_size, 2), np.float32)
    self.known = np.zeros(num_patches, bool)
    self._sharding = NamedSharding(mesh, P("data"))
    # With several processes, each one keeps and computes the targets of its own rows only, on
    # its own devices: which patches a process has seen differs between processes, so a
    # computation over the whole mesh would need them all to agree on when to run it.
    local = Mesh(np.array([d for d in mesh.devices.flat if d.process_index == jax.process_index()]),
                 ("data",))
    self._local_replicated = NamedSharding(local, P())
    self._compute = _jitted_teacher_targets(local, precision)

  def add_to(self, batch: Mapping[str, jax.Array | np.ndarray], teacher_params: Any
             ) -> dict[str, jax.Array | np.ndarray]:
    """`batch` with its `teacher` targets (computed now for the patches not seen before)."""
    ids = distributed.local_rows(batch["patch_id"])
    if not self.known[ids].all():
      x = np.concatenate([distributed.local_rows(batch["ir"]),
                          distributed.local_rows(batch["vis"])], axis=-1)
      teacher = jax.device_put(jax.tree_util.tree_map(_process_copy, teacher_params),
                               self._local_replicated)
      self.values[ids] = np.asarray(self._compute(teacher, x))
      self.known[ids] = True
    shape = (batch["patch_id"].shape[0], *self.values.shape[1:])
    return {**batch, "teacher": jax.make_array_from_process_local_data(
        self._sharding, self.values[ids], shape)}


def _process_copy(x: Any) -> Any:
  """`x` as this process holds it: a replicated array spanning several processes as one copy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x.addressable_data(0)
  return x
