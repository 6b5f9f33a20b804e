"""The pure training step of the MMDRFuse teacher and the distilled student (SPEC sections 3-5).

The whole update is one jitted, data-parallel `train_step`: forward pass, VGG-19 taps (once per
image, and only for the terms that are on), the comprehensive loss, distillation from the
frozen teacher, the dynamic refresh decisions and memory writes of every enabled memory kind,
the Adam update and the non-finite guard. Nothing is pulled to the host.

Layout across devices: a 1-D `Mesh` with axis `data`; the batch is split along it, the
parameters and optimiser state are replicated, and the refresh memories are placed as
`config.refresh.placement` says (`memory_sharding`): replicated (N x H x W per kind on every
device; the batch's slots are read locally and its writes are an all-gather of the batch),
split over the D devices of `data` ("sharded": ceil(N / D) slots per device; XLA's SPMD
partitioner turns the batch's reads into a masked local gather plus an all-reduce of the
batch's B slots, and its writes into an all-gather of the batch followed by local writes, so no
device ever holds the whole memory) or split the same way in pinned host memory ("host": no
memory slots in device memory at all). All three give the same results.

The run loop that feeds this step lives in `loop.py`; the teacher-then-student sequence in
`stages.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmdrfuse_jax.models import networks, vgg
from mmdrfuse_jax.models import precision as precision_lib
from mmdrfuse_jax.train import distill, losses, refresh


class TrainState(train_state.TrainState):
  """Parameters, Adam state and step, plus what a faithful resume needs.

  Attributes:
    rng: PRNG key (raw uint32), folded with the step for any randomness in the step.
    memory: the refresh memories, `{"best_<kind>": (N, H, W, 1)}` (see `refresh.py`).
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

  Attributes:
    model: "student" or "teacher".
    weights: the loss weights; a term with weight 0 is not computed.
    refresh: the refresh memories and their rule.
    gradient_form: "code" (published code) or "paper" (Eq. 3), see `losses.gradient_mse`.
    distill_normalize: "batch" (published code) or "sample" (Eq. 1).
    steps_per_epoch: batches per epoch (advances `TrainState.epoch`).
    precision: how VGG-19 and the teacher compute: "exact", "default" or "bfloat16" (see
      `precision.py`).
    perception: the perception loss's feature space: "vgg" (VGG-19's five taps, published) or
      "teacher" (a student's frozen teacher's G1 and G2, `distill.teacher_features`).

  A run builds it from its spec (`run_spec.RunSpec.step_config`), every field given; the
  defaults below are the published code's, for a step built without a config (benchmarks).
  """

  model: str
  weights: losses.LossWeights
  refresh: refresh.RefreshConfig = refresh.RefreshConfig()
  gradient_form: str = "code"
  distill_normalize: str = "batch"
  steps_per_epoch: int = 1
  precision: str = "exact"
  perception: str = "vgg"
  alive_margin: float = 0.05

  def __post_init__(self):
    precision_lib.check(self.precision)
    if self.perception not in PERCEPTION_SPACES:
      raise ValueError(f"perception must be one of {', '.join(PERCEPTION_SPACES)}, got "
                       f"{self.perception!r}")
    if self.perception == "teacher" and self.model != "student":
      raise ValueError("perception 'teacher' is for students: the teacher has no teacher")

  @property
  def uses_teacher(self) -> bool:
    """Whether the step reads the frozen teacher's targets (a student with distillation on)."""
    return self.model == "student" and self.weights.w_distill != 0

  @property
  def vgg_perception(self) -> bool:
    """Whether the perception term is on and reads VGG-19."""
    return self.weights.w_percep != 0 and self.perception == "vgg"

  @property
  def refresh_loss_on(self) -> bool:
    return bool(self.refresh.kinds) and self.weights.w_refresh != 0

  @property
  def output_taps(self) -> int:
    """How many VGG-19 taps of the fused output the terms that are on need (0: no VGG pass)."""
    needed = [vgg.NUM_TAPS] if self.vgg_perception else []
    if self.refresh_loss_on:
      needed += [kind.num_taps for kind in self.refresh.kinds]
    return max(needed, default=0)


SCHEDULES = ("constant", "cosine")
PERCEPTION_SPACES = ("vgg", "teacher")


def make_optimizer(lr: float = 1e-4, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                   schedule: str = "constant", warmup_steps: int = 0, total_steps: int = 0,
                   final_lr_fraction: float = 0.0) -> optax.GradientTransformation:
  """Adam, by default with PyTorch's defaults (optax.adam matches torch.optim.Adam).

  Args:
    lr: the step size (the peak of a schedule).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's denominator offset.
    schedule: "constant" (published) or "cosine": from `lr` down to `final_lr_fraction * lr`
      at `total_steps` along a half cosine.
    warmup_steps: first steps rising linearly from 0 to `lr` (either schedule).
    total_steps: the run's steps (for "cosine").
    final_lr_fraction: where "cosine" ends, as a fraction of `lr`.

  Equal settings give the same object: the optimiser is a static part of the `TrainState`
  pytree, so a jitted step is reused across states (stages, resumes, tests) only then.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
  return _adam(float(lr), float(b1), float(b2), float(eps), schedule, int(warmup_steps),
               int(total_steps), float(final_lr_fraction))


@functools.lru_cache(maxsize=32)
def _adam(lr: float, b1: float, b2: float, eps: float, schedule: str = "constant",
          warmup_steps: int = 0, total_steps: int = 0, final_lr_fraction: float = 0.0
          ) -> optax.GradientTransformation:
  if schedule == "constant" and warmup_steps == 0:
    return optax.adam(lr, b1=b1, b2=b2, eps=eps)  # A float: the published optimiser's state.
  if schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1),
                                        alpha=final_lr_fraction)
  else:
    decay = optax.constant_schedule(lr)
  rate = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay],
                              [warmup_steps])
  return optax.adam(rate, b1=b1, b2=b2, eps=eps)


@functools.lru_cache(maxsize=None)
def _network(model: str, precision: str):
  # One module per network: its `apply` is static in the `TrainState`, like the optimiser.
  return networks.get_model(model, precision)


def create_train_state(model: str, tx: optax.GradientTransformation, rng: jax.Array,
                       num_patches: int, patch_size: int, refresh_cfg: refresh.RefreshConfig,
                       teacher_params: Any = None, params: Any = None,
                       precision: str = "exact", mesh: Mesh | None = None,
                       conv1_bias: float = 0.0) -> TrainState:
  """A fresh train state.

  Args:
    model: "student" or "teacher".
    tx: the optimiser.
    rng: PRNG key; split for the initialisation and the state's own key.
    num_patches: N, the number of training patches (refresh memory slots).
    patch_size: the patches' height and width.
    refresh_cfg: the refresh settings (which memories, their dtype and placement).
    teacher_params: for a student, the frozen teacher (its conv00 initialises conv2).
    params: initial parameters to use instead of a fresh initialisation.
    precision: how the teacher computes when it is the model trained (`precision.py`).
    mesh: when given, the refresh memories are created where `refresh_cfg.placement` puts them
      on this mesh (never whole on one device), with `memory_slots` slots; the rest of the
      state still has to be placed with `place_state`. Without a mesh: N slots on the default
      device.
    conv1_bias: a fresh student's conv1 biases (`config.init.conv1_bias`).
  """
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)  # Raw uint32 keys checkpoint as plain arrays.
  init_rng, state_rng = jax.random.split(rng)
  net = _network(model, precision)
  if params is None:
    params = net.init(init_rng, jnp.zeros((1, patch_size, patch_size, 2), jnp.float32))["params"]
    if model == "student" and teacher_params is not None:
      params = distill.init_student_from_teacher(params, teacher_params)
    if model == "student" and conv1_bias:
      params = dict(params)
      params["conv1"] = {**params["conv1"],
                         "bias": jnp.full_like(params["conv1"]["bias"], conv1_bias)}
  if mesh is None:
    memory = refresh.init_memory(num_patches, patch_size, patch_size, refresh_cfg)
  else:
    memory = refresh.init_memory(memory_slots(num_patches, mesh, refresh_cfg.placement),
                                 patch_size, patch_size, refresh_cfg,
                                 memory_sharding(mesh, refresh_cfg.placement))
  state = TrainState.create(
      apply_fn=net.apply, params=params, tx=tx, rng=state_rng,
      memory=memory, nonfinite_skips=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32),
      position=jnp.zeros((), jnp.int32))
  # `create` starts the step as a Python 0 (a weakly typed int32 on the device); a restored
  # checkpoint's is a plain int32, and the step would compile again for it after a resume in
  # the same process.
  return state.replace(step=jnp.zeros((), jnp.int32))


def vgg_taps(params: Any, x: jax.Array, num_taps: int, precision: str):
  """`vgg.vgg19_taps` computing as `precision` says (float32 taps in every mode)."""
  return vgg.vgg19_taps(params, x, num_taps=num_taps,
                        precision=precision_lib.lax_precision(precision),
                        dtype=precision_lib.compute_dtype(precision))


def _vgg_if(pred: jax.Array, params: Any, x: jax.Array, num_taps: int, precision: str):
  """VGG taps of `x` when `pred`, zeros otherwise, without running VGG in the false case."""
  taps = functools.partial(vgg_taps, num_taps=num_taps, precision=precision)
  shapes = jax.eval_shape(taps, params, x)
  return jax.lax.cond(
      pred, taps, lambda p, y: tuple(jnp.zeros(s.shape, s.dtype) for s in shapes), params, x)


def _nonfinite(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.logical_not(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])))


def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: Frozen, *,
               cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step (pure; jit it with `make_train_step`).

  Args:
    state: the train state.
    batch: `ir`, `vis` (B, H, W, 1) float32 in [0, 1] and `patch_id` (B,) int32; for a
      student optionally `teacher`, the (B, H, W, 2) `distill.teacher_targets` (else computed
      here).
    frozen: VGG-19 params and, for the student, the teacher's params.
    cfg: static step settings.

  Returns:
    The new state and a dict of scalar metrics: the loss terms that are on and, per memory
    kind, its refresh statistics.
  """
  ir, vi, ids = batch["ir"], batch["vis"], batch["patch_id"]
  x = jnp.concatenate([ir, vi], axis=-1)
  weights, rcfg = cfg.weights, cfg.refresh
  # Constants w.r.t. the parameters are computed outside the differentiated function.
  if weights.w_percep != 0:
    sources = jnp.concatenate([ir, vi], 0)
    taps_sources = (vgg_taps(frozen.vgg, sources, vgg.NUM_TAPS, cfg.precision)
                    if cfg.vgg_perception else distill.teacher_features(frozen.teacher, sources))
    b = ir.shape[0]
    taps_ir, taps_vi = tuple(t[:b] for t in taps_sources), tuple(t[b:] for t in taps_sources)
  if cfg.uses_teacher:
    # The teacher's targets, from the host-side cache when the loop supplies them.
    targets = batch["teacher"] if "teacher" in batch else distill.teacher_targets(
        frozen.teacher, x, cfg.precision)
    targets = jax.lax.stop_gradient(targets)
  # Each memory's images for this batch and their scores (constants too).
  on_host = rcfg.placement == "host"
  recalled = {}
  for kind in rcfg.kinds:
    images, written = refresh.gather(state.memory[kind.key], ids, rcfg.memory_dtype, on_host)
    recalled[kind.name] = (images, written, kind.score(images, ir, vi, rcfg.per_sample))

  def loss_fn(params):
    o = state.apply_fn({"params": params}, x)
    out = o["out"]
    taps_out = (vgg_taps(frozen.vgg, out, cfg.output_taps, cfg.precision) if cfg.output_taps
                else ())
    terms = {}
    if weights.w_int != 0:
      terms["l_int"] = losses.intensity_loss(out, ir, vi)
    if weights.w_percep != 0:
      percept_out = (taps_out[:vgg.NUM_TAPS] if cfg.vgg_perception
                     else distill.teacher_features(frozen.teacher, out))
      terms["l_percep"] = losses.perception_loss(percept_out, taps_ir, taps_vi)
    if weights.w_grad != 0:
      terms["l_grad"] = losses.gradient_loss(out, ir, vi, form=cfg.gradient_form)
    if cfg.uses_teacher:
      terms["l_distill"] = losses.distillation_loss(
          o["feat"], targets[..., :1], out, targets[..., 1:], normalize=cfg.distill_normalize)
    if weights.w_alive != 0:
      terms["l_alive"] = losses.alive_loss(o["feat_pre"], margin=cfg.alive_margin)
    # Refresh decisions on the current output before this step's update (SPEC section 4).
    out_const = jax.lax.stop_gradient(out)
    decisions = {}
    for kind in rcfg.kinds:
      images, written, best = recalled[kind.name]
      current = kind.score(out_const, ir, vi, rcfg.per_sample)
      decision = refresh.decide(current, best, written, higher_is_better=kind.higher_is_better,
                                per_sample=rcfg.per_sample, weight_scale=rcfg.weight_scale)
      decisions[kind.name] = decision
      if cfg.refresh_loss_on:
        # VGG on the memory images only when some sample needs the loss (never in epoch 1).
        taps_mem = _vgg_if(jnp.any(decision["weight"] > 0), frozen.vgg, images, kind.num_taps,
                           cfg.precision)
        per_sample_loss = kind.loss(taps_mem, taps_out[:kind.num_taps], images, out)
        terms[f"l_refresh_{kind.name}"] = jnp.mean(decision["weight"] * per_sample_loss)
    if cfg.refresh_loss_on:
      terms["l_refresh"] = sum(terms[f"l_refresh_{kind.name}"] for kind in rcfg.kinds)
    terms["loss"] = weights.total(terms)
    return terms["loss"], (terms, decisions, out_const)

  (loss, (terms, decisions, out_const)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  skip = jnp.logical_not(jnp.isfinite(loss)) | _nonfinite(grads)
  updated = state.apply_gradients(grads=grads)

  def keep(new, old):
    return jax.tree_util.tree_map(lambda n, o: jnp.where(skip, o, n), new, old)

  params = keep(updated.params, state.params)
  opt_state = keep(updated.opt_state, state.opt_state)

  # Memory writes, cancelled on a skipped step (a NaN output must never enter a memory).
  memory = dict(state.memory)
  metrics = dict(terms)
  for kind in rcfg.kinds:
    decision = decisions[kind.name]
    memory[kind.key] = refresh.scatter(memory[kind.key], ids, out_const,
                                       decision["replace"] & ~skip, rcfg.memory_dtype, on_host)
    metrics.update(refresh.stats(kind.name, decision))
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


def memory_sharding(mesh: Mesh, placement: str) -> NamedSharding:
  """Where the refresh memories live on `mesh` (`config.refresh.placement`).

  "replicated": every slot on every device. "sharded": the slot axis split over `data`.
  "host": split the same way, in each device's pinned host memory.

  Raises:
    ValueError: an unknown placement, or "host" on a backend without pinned host memory.
  """
  if placement == "replicated":
    return NamedSharding(mesh, P())
  if placement == "sharded":
    return NamedSharding(mesh, P("data"))
  if placement == "host":
    if not has_pinned_host(mesh.devices.flat[0]):
      raise ValueError(f"refresh placement 'host' needs pinned host memory, which "
                       f"{mesh.devices.flat[0].platform} devices do not have")
    return NamedSharding(mesh, P("data"), memory_kind="pinned_host")
  raise ValueError(f"refresh placement must be one of {refresh.PLACEMENTS}, got {placement!r}")


def has_pinned_host(device: jax.Device | None = None) -> bool:
  """Whether `device` (default: the first) has a pinned host memory (placement "host")."""
  device = jax.devices()[0] if device is None else device
  return any(memory.kind == "pinned_host" for memory in device.addressable_memories())


def memory_slots(num_patches: int, mesh: Mesh, placement: str) -> int:
  """Memory slots for N patches: N, padded up to a multiple of the `data` axis when split.

  A split array needs equal parts. The padding slots are never read or written (patch ids are
  below N), so checkpoints of any placement and device count restore into each other by padding
  or truncating them (see `trainer.RunCheckpoints.restore_latest`).
  """
  return _padded_slots(num_patches, mesh.shape["data"], placement)


def _padded_slots(num_patches: int, num_devices: int, placement: str) -> int:
  if placement == "replicated":
    return num_patches
  return -(-num_patches // num_devices) * num_devices


def memory_bytes(num_patches: int, num_devices: int, placement: str,
                 bytes_per_sample: int) -> dict[str, int]:
  """What the refresh memories of N patches take on a `data` axis of D devices, computed.

  The layout `memory_slots` and `memory_sharding` give, without creating anything, so that
  sizes too large for the machine at hand can be planned (the scaling table in docs/train.md).

  Args:
    num_patches: N, the training patches.
    num_devices: D, the devices of the `data` axis.
    placement: "replicated", "sharded" or "host".
    bytes_per_sample: `refresh.bytes_per_sample` (all enabled memory kinds together).

  Returns:
    `slots` (padded as `memory_slots` pads them), `device_bytes` (device memory on each
    device; the same on all of them) and `host_bytes` (pinned host memory, the parts of all
    D devices together).

  Raises:
    ValueError: an unknown placement or a device count below 1.
  """
  if placement not in refresh.PLACEMENTS:
    raise ValueError(f"refresh placement must be one of {refresh.PLACEMENTS}, got {placement!r}")
  if num_devices < 1:
    raise ValueError(f"num_devices must be at least 1, got {num_devices}")
  slots = _padded_slots(num_patches, num_devices, placement)
  per_device = {"replicated": slots, "sharded": slots // num_devices, "host": 0}[placement]
  return {"slots": slots, "device_bytes": per_device * bytes_per_sample,
          "host_bytes": slots * bytes_per_sample if placement == "host" else 0}


def place_state(state: TrainState, mesh: Mesh, placement: str) -> TrainState:
  """`state` on `mesh`: the memories as `placement` says, everything else replicated."""
  memory = jax.device_put(state.memory, memory_sharding(mesh, placement))
  return replicate(state.replace(memory={}), mesh).replace(memory=memory)


@functools.lru_cache(maxsize=8)
def make_train_step(cfg: StepConfig, mesh: Mesh):
  """`train_step` jitted for `mesh`: batch split on `data`, state placed and donated.

  The memories are placed as `cfg.refresh.placement` says and everything else in the state is
  replicated (see `place_state`). Cached, so that runs with the same settings in one process
  (stages, tests) compile once.

  Returns:
    `step(state, batch, frozen) -> (state, metrics)`.
  """
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P("data"))
  memory = memory_sharding(mesh, cfg.refresh.placement)

  # The memories are a separate argument so that their placement can differ from the rest of
  # the state (jit takes one sharding per argument prefix, and the state's static fields are
  # not known here).
  def split_step(state, memories, batch, frozen):
    new, metrics = train_step(state.replace(memory=memories), batch, frozen, cfg=cfg)
    return new.replace(memory={}), new.memory, metrics

  jitted = jax.jit(split_step, in_shardings=(replicated, memory, sharded, replicated),
                   out_shardings=(replicated, memory, replicated), donate_argnums=(0, 1))

  def step(state: TrainState, batch: dict[str, jax.Array], frozen: Frozen):
    new, memories, metrics = jitted(state.replace(memory={}), state.memory, batch, frozen)
    return new.replace(memory=memories), metrics

  # For inspecting the compiled step (tests, benchmarks). mypy does not model attributes set
  # on functions.
  step.jitted = jitted  # type: ignore[attr-defined]
  return step


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every array of `tree` on all devices of `mesh`."""
  return jax.device_put(tree, NamedSharding(mesh, P()))
