"""Training of the MMDRFuse teacher and the distilled student (SPEC sections 3-5).

The whole update is one jitted, data-parallel `train_step`: forward pass, VGG-19 taps (once per
image), the comprehensive loss, distillation from the frozen teacher, the dynamic refresh
decisions and memory writes, the Adam update and the non-finite guard. Nothing is pulled to the
host except the metrics when they are logged.

Layout across devices: a 1-D `Mesh` with axis `data`; the batch is split along it, everything
in the train state (parameters, optimiser state, refresh memories) is replicated. Memories are
replicated rather than sharded because batches draw arbitrary patch ids: a sharded memory would
need an all-to-all per step, while a replicated one costs N x 2 x H x W bytes per device
(1 GiB for 16,000 bfloat16 patches) and its scatter is a cheap all-gather of the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmdrfuse_jax import losses, models, refresh, vgg


class TrainState(train_state.TrainState):
  """Parameters, Adam state and step, plus what a faithful resume needs.

  Attributes:
    rng: PRNG key (raw uint32), folded with the step for any randomness in the step.
    memory: the refresh memories (`refresh.Memory`).
    nonfinite_skips: how many steps were skipped because the loss or gradients were not finite.
    epoch: the data epoch of the next batch.
    position: how many batches of `epoch` have been consumed.
  """

  rng: jax.Array
  memory: refresh.Memory
  nonfinite_skips: jax.Array
  epoch: jax.Array
  position: jax.Array


@flax.struct.dataclass
class Frozen:
  """Networks used but not optimised (and not checkpointed with the trained model)."""

  vgg: Any
  teacher: Any = None  # Teacher params, student stage only.


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the train step (hashable; they select code at trace time).

  Loss weights follow SPEC section 3: the teacher minimises
  `2 L_int + L_percep + L_grad + L_refresh`, the student
  `L_int + 2 L_percep + L_grad + 5 L_distill + L_refresh`.
  """

  model: str = "student"
  w_int: float = 1.0
  w_percep: float = 2.0
  w_grad: float = 1.0
  w_distill: float = 5.0
  w_refresh: float = 1.0
  gradient_form: str = "code"
  distill_normalize: str = "batch"
  refresh: refresh.RefreshConfig = refresh.RefreshConfig()
  steps_per_epoch: int = 1

  @classmethod
  def published(cls, model: str, **overrides) -> "StepConfig":
    """The published code's loss weights for `model` (SPEC section 3)."""
    if model == "teacher":
      base = cls(model="teacher", w_int=2.0, w_percep=1.0, w_grad=1.0, w_distill=0.0)
    elif model == "student":
      base = cls(model="student")
    else:
      raise ValueError(f"unknown model {model!r}")
    return dataclasses.replace(base, **overrides)

  @classmethod
  def from_config(cls, config: Any, steps_per_epoch: int) -> "StepConfig":
    loss = config.loss
    return cls(
      model=config.model, w_int=float(loss.w_int), w_percep=float(loss.w_percep),
      w_grad=float(loss.w_grad), w_distill=float(loss.w_distill),
      w_refresh=float(loss.w_refresh), gradient_form=str(loss.gradient_form),
      distill_normalize=str(loss.distill_normalize),
      refresh=refresh.RefreshConfig.from_config(config.refresh),
      steps_per_epoch=int(steps_per_epoch))


def make_optimizer(lr: float = 1e-4, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                   ) -> optax.GradientTransformation:
  """Adam, by default with PyTorch's defaults (optax.adam matches torch.optim.Adam)."""
  return optax.adam(lr, b1=b1, b2=b2, eps=eps)


def init_student_from_teacher(student_params: Any, teacher_params: Any) -> Any:
  """The student's conv2 starts from the teacher's conv00 (both 4 -> 1), as published."""
  params = flax.core.unfreeze(student_params) if isinstance(student_params, flax.core.FrozenDict) else dict(student_params)
  # A copy: the teacher is passed to the step too, and the state's buffers are donated.
  params["conv2"] = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True),
                                           dict(teacher_params["conv00"]))
  return params


def create_train_state(model: str, tx: optax.GradientTransformation, rng: jax.Array,
                       num_patches: int, patch_size: int, refresh_cfg: refresh.RefreshConfig,
                       teacher_params: Any = None, params: Any = None) -> TrainState:
  """A fresh train state.

  Args:
    model: "student" or "teacher".
    tx: the optimiser.
    rng: PRNG key; split for the initialisation and the state's own key.
    num_patches: N, the number of training patches (refresh memory slots).
    patch_size: the patches' height and width.
    refresh_cfg: the refresh settings (which memories, their dtype).
    teacher_params: for a student, the frozen teacher (its conv00 initialises conv2).
    params: initial parameters to use instead of a fresh initialisation.
  """
  init_rng, state_rng = jax.random.split(rng)
  net = models.get_model(model)
  if params is None:
    params = net.init(init_rng, jnp.zeros((1, patch_size, patch_size, 2), jnp.float32))["params"]
    if model == "student" and teacher_params is not None:
      params = init_student_from_teacher(params, teacher_params)
  memory = refresh.init_memory(num_patches, patch_size, patch_size, refresh_cfg)
  return TrainState.create(
    apply_fn=net.apply, params=params, tx=tx, rng=state_rng,
    memory=memory, nonfinite_skips=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32),
    position=jnp.zeros((), jnp.int32))


def _split_taps(taps, batch):
  return tuple(t[:batch] for t in taps), tuple(t[batch:] for t in taps)


def _vgg_if(pred: jax.Array, params: Any, x: jax.Array, num_taps: int):
  """VGG taps of `x` when `pred`, zeros otherwise, without running VGG in the false case."""
  shapes = jax.eval_shape(functools.partial(vgg.vgg19_taps, num_taps=num_taps), params, x)
  return jax.lax.cond(
    pred,
    lambda p, y: vgg.vgg19_taps(p, y, num_taps=num_taps),
    lambda p, y: tuple(jnp.zeros(s.shape, s.dtype) for s in shapes),
    params, x)


def _nonfinite(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.logical_not(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))


def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: Frozen, *,
               cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step (pure; jit it with `make_train_step`).

  Args:
    state: the train state.
    batch: `ir`, `vi` (B, H, W, 1) float32 in [0, 1] and `patch_id` (B,) int32.
    frozen: VGG-19 params and, for the student, the teacher's params.
    cfg: static step settings.

  Returns:
    The new state and a dict of scalar metrics (loss terms and refresh statistics).
  """
  ir, vi, ids = batch["ir"], batch["vi"], batch["patch_id"]
  b = ir.shape[0]
  x = jnp.concatenate([ir, vi], axis=-1)
  rcfg = cfg.refresh
  # Constant w.r.t. the parameters: computed outside the differentiated function.
  taps_ir, taps_vi = _split_taps(vgg.vgg19_taps(frozen.vgg, jnp.concatenate([ir, vi], 0)), b)
  if cfg.model == "student":
    t = models.Teacher().apply({"params": frozen.teacher}, x)
    t_feat, t_out = jax.lax.stop_gradient(t["feat"]), jax.lax.stop_gradient(t["out"])

  # Memory images and their scores against the sources (per sample).
  per_sample = rcfg.per_sample
  mem = {}
  if rcfg.ssim:
    img, written = refresh.gather(state.memory.best_ssim, ids, rcfg.memory_dtype)
    dr = None if per_sample else losses.ssim_data_range(img)
    best = losses.ssim_per_image(img, ir, dr) + losses.ssim_per_image(img, vi, dr)
    mem["ssim"] = (img, written, best)
  if rcfg.gmsd:
    img, written = refresh.gather(state.memory.best_gmsd, ids, rcfg.memory_dtype)
    best = losses.gmsd_per_image(img, ir) + losses.gmsd_per_image(img, vi)
    mem["gmsd"] = (img, written, best)

  def loss_fn(params):
    o = state.apply_fn({"params": params}, x)
    out = o["out"]
    taps_out = vgg.vgg19_taps(frozen.vgg, out)
    terms = {
      "l_int": losses.intensity_loss(out, ir, vi),
      "l_percep": losses.perception_loss(taps_out, taps_ir, taps_vi),
      "l_grad": losses.gradient_loss(out, ir, vi, form=cfg.gradient_form),
    }
    if cfg.model == "student":
      terms["l_distill"] = losses.distillation_loss(o["feat"], t_feat, out, t_out,
                                                    normalize=cfg.distill_normalize)
    # Refresh decisions on the current output before this step's update (SPEC section 4).
    out_c = jax.lax.stop_gradient(out)
    decisions, l_refresh = {}, jnp.zeros((), jnp.float32)
    if rcfg.ssim:
      img, written, best = mem["ssim"]
      dr = None if per_sample else losses.ssim_data_range(out_c)
      cur = losses.ssim_per_image(out_c, ir, dr) + losses.ssim_per_image(out_c, vi, dr)
      d = refresh.decide(cur, best, written, higher_is_better=True, per_sample=per_sample,
                         weight_scale=rcfg.weight_scale)
      # VGG on the memory images only when some sample needs the loss (never in epoch 1).
      taps_mem = _vgg_if(jnp.any(d["weight"] > 0), frozen.vgg, img, vgg.NUM_TAPS)
      per = losses.refresh_ssim_loss_per_sample(taps_mem, taps_out, img, out)
      terms["l_refresh_ssim"] = jnp.mean(d["weight"] * per)
      decisions["ssim"] = d
    if rcfg.gmsd:
      img, written, best = mem["gmsd"]
      cur = losses.gmsd_per_image(out_c, ir) + losses.gmsd_per_image(out_c, vi)
      d = refresh.decide(cur, best, written, higher_is_better=False, per_sample=per_sample,
                         weight_scale=rcfg.weight_scale)
      taps_mem = _vgg_if(jnp.any(d["weight"] > 0), frozen.vgg, img, 3)
      per = losses.refresh_gmsd_loss_per_sample(taps_mem, taps_out[:3], img, out)
      terms["l_refresh_gmsd"] = jnp.mean(d["weight"] * per)
      decisions["gmsd"] = d
    l_refresh = terms.get("l_refresh_ssim", 0.0) + terms.get("l_refresh_gmsd", 0.0)
    terms["l_refresh"] = jnp.asarray(l_refresh, jnp.float32)
    total = (cfg.w_int * terms["l_int"] + cfg.w_percep * terms["l_percep"] +
             cfg.w_grad * terms["l_grad"] + cfg.w_refresh * terms["l_refresh"])
    if cfg.model == "student":
      total = total + cfg.w_distill * terms["l_distill"]
    terms["loss"] = total
    return total, (terms, decisions, out_c)

  (loss, (terms, decisions, out_c)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  skip = jnp.logical_not(jnp.isfinite(loss)) | _nonfinite(grads)
  updated = state.apply_gradients(grads=grads)
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(skip, o, n), new, old)
  params = keep(updated.params, state.params)
  opt_state = keep(updated.opt_state, state.opt_state)

  # Memory writes, cancelled on a skipped step (a NaN output must never enter a memory).
  memory = state.memory
  metrics = dict(terms)
  if rcfg.ssim:
    d = decisions["ssim"]
    memory = memory.replace(best_ssim=refresh.scatter(
      memory.best_ssim, ids, out_c, d["replace"] & ~skip, rcfg.memory_dtype))
    metrics.update(refresh.stats("ssim", d))
  if rcfg.gmsd:
    d = decisions["gmsd"]
    memory = memory.replace(best_gmsd=refresh.scatter(
      memory.best_gmsd, ids, out_c, d["replace"] & ~skip, rcfg.memory_dtype))
    metrics.update(refresh.stats("gmsd", d))
  metrics["nonfinite"] = skip.astype(jnp.float32)

  position = state.position + 1
  epoch_done = position >= cfg.steps_per_epoch
  new_state = state.replace(
    step=state.step + 1, params=params, opt_state=opt_state, memory=memory,
    nonfinite_skips=state.nonfinite_skips + skip.astype(jnp.int32),
    epoch=state.epoch + epoch_done.astype(jnp.int32),
    position=jnp.where(epoch_done, 0, position))
  return new_state, metrics


def make_mesh(batch_size: int, devices=None) -> Mesh:
  """A 1-D `data` mesh over the most devices that divide the batch evenly."""
  devices = list(jax.devices() if devices is None else devices)
  n = max(d for d in range(1, len(devices) + 1) if batch_size % d == 0)
  return Mesh(np.array(devices[:n]), ("data",))


def make_train_step(cfg: StepConfig, mesh: Mesh):
  """`train_step` jitted for `mesh`: batch split on `data`, state replicated and donated."""
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P("data"))
  return jax.jit(
    functools.partial(train_step, cfg=cfg),
    in_shardings=(replicated, sharded, replicated),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every array of `tree` on all devices of `mesh`."""
  return jax.device_put(tree, NamedSharding(mesh, P()))
