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

A student run computes the frozen teacher's targets once per patch and keeps them in host RAM
(`TeacherCache`), so only first-epoch steps pay for the teacher's forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import signal
import threading
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
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
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)  # Raw uint32 keys checkpoint as plain arrays.
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


def teacher_targets(teacher_params: Any, x: jax.Array) -> jax.Array:
  """What distillation needs of the frozen teacher: (B, H, W, 2) = [sum_c t_feat, t_out].

  The distillation loss only sees the teacher's features summed over channels, so one map
  stands for the four channels exactly.
  """
  t = models.Teacher().apply({"params": teacher_params}, x)
  return jnp.concatenate([jnp.sum(t["feat"], axis=-1, keepdims=True), t["out"]], axis=-1)


class TeacherCache:
  """Host copy of `teacher_targets` per patch id, filled the first time a patch is seen.

  The teacher is frozen, so its targets for a patch never change: computing them once
  instead of every epoch removes the teacher's forward pass (about a third of a student step
  on CPU) from every later step. Costs 2 x H x W float32 of host RAM per patch (2 GiB for
  16,000 patches of 128x128; the published code kept 4.2 GB of float64 memories there).
  Not checkpointed: after a restart it fills again.
  """

  def __init__(self, num_patches: int, patch_size: int, mesh: Mesh):
    self.values = np.zeros((num_patches, patch_size, patch_size, 2), np.float32)
    self.known = np.zeros(num_patches, bool)
    self._sharding = NamedSharding(mesh, P("data"))
    self._compute = jax.jit(teacher_targets, in_shardings=(NamedSharding(mesh, P()), self._sharding),
                            out_shardings=self._sharding)

  def add_to(self, batch: dict[str, jax.Array], teacher_params: Any) -> dict[str, jax.Array]:
    """`batch` with its `teacher` targets (computed now for patches not seen before)."""
    ids = np.asarray(batch["patch_id"])
    if not self.known[ids].all():
      x = jnp.concatenate([batch["ir"], batch["vis"]], axis=-1)
      self.values[ids] = np.asarray(self._compute(teacher_params, x))
      self.known[ids] = True
    return {**batch, "teacher": jax.device_put(self.values[ids], self._sharding)}


def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: Frozen, *,
               cfg: StepConfig) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step (pure; jit it with `make_train_step`).

  Args:
    state: the train state.
    batch: `ir`, `vis` (B, H, W, 1) float32 in [0, 1] and `patch_id` (B,) int32; for a
      student optionally `teacher`, the (B, H, W, 2) `teacher_targets` (else computed here).
    frozen: VGG-19 params and, for the student, the teacher's params.
    cfg: static step settings.

  Returns:
    The new state and a dict of scalar metrics (loss terms and refresh statistics).
  """
  ir, vi, ids = batch["ir"], batch["vis"], batch["patch_id"]
  b = ir.shape[0]
  x = jnp.concatenate([ir, vi], axis=-1)
  rcfg = cfg.refresh
  # Constant w.r.t. the parameters: computed outside the differentiated function.
  taps_ir, taps_vi = _split_taps(vgg.vgg19_taps(frozen.vgg, jnp.concatenate([ir, vi], 0)), b)
  if cfg.model == "student":
    # The teacher's targets, from the host-side cache when the loop supplies them.
    targets = batch["teacher"] if "teacher" in batch else teacher_targets(frozen.teacher, x)
    targets = jax.lax.stop_gradient(targets)
    t_feat, t_out = targets[..., :1], targets[..., 1:]

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
    weighted_refresh = cfg.w_refresh * terms["l_refresh"]
    if cfg.model == "student":
      total = losses.student_total(terms["l_int"], terms["l_percep"], terms["l_grad"],
                                   terms["l_distill"], weighted_refresh, w_int=cfg.w_int,
                                   w_percep=cfg.w_percep, w_grad=cfg.w_grad,
                                   w_distill=cfg.w_distill)
    else:
      total = losses.teacher_total(terms["l_int"], terms["l_percep"], terms["l_grad"],
                                   weighted_refresh, w_int=cfg.w_int, w_percep=cfg.w_percep,
                                   w_grad=cfg.w_grad)
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


@functools.lru_cache(maxsize=8)
def make_train_step(cfg: StepConfig, mesh: Mesh):
  """`train_step` jitted for `mesh`: batch split on `data`, state replicated and donated.

  Cached, so that runs with the same settings in one process (stages, tests) compile once.
  """
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


# ------------------------------------------------------------------------------ training run


class TrainingError(RuntimeError):
  """A user-facing problem with a run's inputs (message is one line)."""


@dataclasses.dataclass
class RunResult:
  """What `train_and_evaluate` did."""

  weights: pathlib.Path | None  # The trained model's weights file (None if interrupted).
  step: int  # The last completed step.
  total_steps: int
  interrupted_by: int | None = None  # The signal number that stopped the run early.
  nonfinite_skips: int = 0


def load_dataset(config: Any):
  """The training patches the config names (built dataset, or procedural pairs)."""
  from mmdrfuse_jax.data import builders, pipeline  # pylint: disable=g-import-not-at-top

  d = config.data
  kwargs = dict(patch_size=int(d.patch_size), patch_stride=int(d.patch_stride))
  if int(d.synthetic_pairs) > 0:
    return pipeline.PatchDataset.from_synthetic(
      int(d.synthetic_pairs), int(d.synthetic_height), int(d.synthetic_width), seed=int(config.seed),
      **kwargs)
  if not d.dataset or not d.data_dir:
    raise TrainingError(
      "no training data: set --config.data.dataset=NAME and --config.data.data_dir=DIR of a dataset "
      "built with `python bin/prepare_data.py --dataset NAME --manual_dir FOLDER --data_dir DIR` "
      "(or use configs/quickstart.py)")
  try:
    return pipeline.PatchDataset.from_tfds(os.path.expanduser(d.data_dir), d.dataset, d.split,
                                           **kwargs)
  except (builders.DataError, ValueError) as e:
    raise TrainingError(str(e)) from None


def load_vgg(config: Any, log) -> Any:
  """The frozen VGG-19: converted weights, or (quickstart only) a seeded random one."""
  if config.vgg_weights:
    try:
      return vgg.load_params(os.path.expanduser(config.vgg_weights))
    except vgg.VGGWeightsError as e:
      raise TrainingError(str(e)) from None
  if config.allow_random_vgg:
    log(f"NOTE: no --config.vgg_weights given: using a RANDOM VGG-19 (seed {config.random_vgg_seed}); "
        "perception losses are only structural stand-ins. For real training: " + vgg.HOW_TO_GET)
    return vgg.random_params(int(config.random_vgg_seed))
  raise TrainingError(f"no VGG-19 weights: set --config.vgg_weights=FILE.npz; to get one, {vgg.HOW_TO_GET}")


def load_teacher(config: Any) -> Any:
  """The frozen teacher of a student run."""
  from mmdrfuse_jax import checkpoints  # pylint: disable=g-import-not-at-top

  if not config.teacher_weights:
    raise TrainingError(
      "a student run needs its teacher: set --config.teacher_weights to the project's teacher weights "
      "(teacher.npz written by a configs/teacher.py run) or the published teacher.model")
  try:
    return checkpoints.load_params(os.path.expanduser(config.teacher_weights), "teacher")
  except checkpoints.WeightsError as e:
    raise TrainingError(str(e)) from None


class _SignalCatcher:
  """Turns SIGTERM/SIGINT into a flag checked between steps (so a checkpoint can be saved)."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # A second signal: stop now.
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def _mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  stacked = jax.device_get(history)
  return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


def _format_metrics(step: int, total: int, m: dict[str, float]) -> str:
  terms = " ".join(f"{k[2:]} {m[k]:.4g}" for k in ("l_int", "l_percep", "l_grad", "l_distill",
                                                    "l_refresh") if k in m)
  parts = [f"step {step}/{total}", f"loss {m['loss']:.4g}", terms]
  for name in ("ssim", "gmsd"):
    if f"refresh/{name}_gap" in m:
      parts.append(f"{name}: refreshed {m[f'refresh/{name}_refreshed']:.0%} "
                   f"loss-on {m[f'refresh/{name}_loss_on']:.0%} gap {m[f'refresh/{name}_gap']:+.3g}")
  if m.get("nonfinite", 0) > 0:
    parts.append(f"non-finite steps skipped {m['nonfinite']:.0%}")
  return " | ".join(parts)


def train_and_evaluate(config: Any, workdir: str | os.PathLike, *, log=print,
                       stop_at_step: int | None = None) -> RunResult:
  """Trains `config.model` in `workdir`, resuming from its latest checkpoint.

  With `config.teacher_run` (the quickstart), the teacher is trained first in
  `workdir/teacher` and the student then distils from it in `workdir/student`.

  Args:
    config: the run's ml_collections config (see configs/default.py).
    workdir: where checkpoints, logs and the final weights (`<model>.npz`) go.
    log: where progress lines go.
    stop_at_step: stop (with a checkpoint) once this step is reached, as if interrupted.

  Returns:
    A `RunResult`.

  Raises:
    TrainingError: missing or unusable data, VGG or teacher weights (one-line message).
  """
  workdir = pathlib.Path(workdir).expanduser()
  if config.get("teacher_run") is not None:
    teacher_cfg = ml_collections.ConfigDict(config.teacher_run.to_dict())
    # Run-wide settings given for the whole run apply to the teacher stage too.
    if not teacher_cfg.vgg_weights:
      teacher_cfg.vgg_weights = config.vgg_weights
    teacher_cfg.progress_bar = config.progress_bar
    log("== stage 1/2: teacher")
    first = train_and_evaluate(teacher_cfg, workdir / "teacher", log=log, stop_at_step=stop_at_step)
    if first.weights is None:
      return first
    student_cfg = ml_collections.ConfigDict(config.to_dict())
    del student_cfg["teacher_run"]
    student_cfg.teacher_weights = str(first.weights)
    log("== stage 2/2: student, distilled from " + str(first.weights))
    return train_and_evaluate(student_cfg, workdir / "student", log=log)
  return _train_stage(config, workdir, log=log, stop_at_step=stop_at_step)


def _train_stage(config: Any, workdir: pathlib.Path, *, log, stop_at_step: int | None) -> RunResult:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top

  from mmdrfuse_jax import checkpoints, summary  # pylint: disable=g-import-not-at-top

  if config.model not in models.MODELS:
    raise TrainingError(f"config.model must be one of {sorted(models.MODELS)}, got {config.model!r}")
  workdir.mkdir(parents=True, exist_ok=True)
  dataset = load_dataset(config)
  vgg_params = load_vgg(config, log)
  teacher = load_teacher(config) if config.model == "student" else None
  batch_size = int(config.batch_size)
  steps_per_epoch = dataset.steps_per_epoch(batch_size)
  if steps_per_epoch == 0:
    raise TrainingError(f"{dataset.num_patches} training patches do not make one batch of {batch_size}")
  total_steps = steps_per_epoch * int(config.num_epochs)
  rcfg = refresh.RefreshConfig.from_config(config.refresh)
  cfg = StepConfig.from_config(config, steps_per_epoch)
  mesh = make_mesh(batch_size)
  log(f"{config.model}: {dataset.num_patches} patches, {steps_per_epoch} steps/epoch x "
      f"{config.num_epochs} epochs, batch {batch_size} over {mesh.devices.size} device(s); refresh memories "
      f"{rcfg.memory_dtype}, {refresh.bytes_per_sample(rcfg, dataset.patch_size, dataset.patch_size):,} "
      "bytes/sample")

  o = config.optim
  state = create_train_state(
    config.model, make_optimizer(float(o.lr), float(o.b1), float(o.b2), float(o.eps)),
    jax.random.PRNGKey(int(config.seed)), dataset.num_patches, dataset.patch_size, rcfg,
    teacher_params=teacher)
  state = replicate(state, mesh)
  frozen = replicate(Frozen(vgg=vgg_params, teacher=teacher), mesh)

  manager = ocp.CheckpointManager(
    (workdir / "checkpoints").resolve(),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=int(config.keep_checkpoints), create=True, enable_async_checkpointing=False,
      cleanup_tmp_directories=True))
  latest = manager.latest_step()
  if latest is not None:
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    try:
      state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # Orbax raises many types for a mismatching or damaged checkpoint.
      first_line = (str(e).splitlines() or [""])[0][:200]
      raise TrainingError(
        f"{workdir / 'checkpoints'}: cannot resume from step {latest} with this config "
        f"({type(e).__name__}: {first_line}); use another --workdir") from None
    log(f"resumed from {workdir / 'checkpoints'} at step {latest} "
        f"(epoch {int(state.epoch)}, batch {int(state.position)})")
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

  def save(step: int) -> None:
    if manager.latest_step() != step:
      manager.save(step, args=ocp.args.StandardSave(state), force=True)
      manager.wait_until_finished()

  cache = None
  if config.model == "student" and config.teacher_cache:
    cache = TeacherCache(dataset.num_patches, dataset.patch_size, mesh)
  step = int(state.step)
  train_step_fn = make_train_step(cfg, mesh)
  writer = summary.SummaryWriter(workdir)
  interrupted = None
  history = []
  end = total_steps if stop_at_step is None else min(total_steps, stop_at_step)
  batches = dataset.iterate(
    batch_size, int(config.seed), {"epoch": int(state.epoch), "step": int(state.position)},
    num_epochs=int(config.num_epochs), sharding=NamedSharding(mesh, P("data")))
  bar = tqdm.tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
                  disable=not config.progress_bar)
  try:
    with _SignalCatcher() as signals:
      for batch, _ in batches:
        if step >= end or signals.signum is not None:
          break
        if cache is not None:
          batch = cache.add_to(batch, frozen.teacher)
        state, metrics = train_step_fn(state, batch, frozen)
        step += 1
        history.append(metrics)
        bar.update(1)
        if step % int(config.log_every_steps) == 0 or step == end:
          m = _mean_metrics(history)
          history = []
          writer.scalars(step, m)
          writer.flush()
          bar.set_postfix(loss=f"{m['loss']:.4g}")
          (bar.write if config.progress_bar else log)(_format_metrics(step, total_steps, m))
        if step % int(config.checkpoint_every_steps) == 0:
          save(step)
      interrupted = signals.signum
  finally:
    bar.close()
    writer.close()
  save(step)
  skips = int(state.nonfinite_skips)
  if skips:
    log(f"warning: {skips} step(s) had a non-finite loss and were skipped")
  if interrupted is not None or step < total_steps:
    why = f"signal {interrupted}" if interrupted is not None else f"stop at step {step}"
    log(f"stopped at step {step}/{total_steps} ({why}); checkpoint saved, rerun to resume")
    return RunResult(None, step, total_steps, interrupted, skips)
  weights = workdir / f"{config.model}.npz"
  checkpoints.save_params(weights, jax.device_get(state.params))
  log(f"done: {total_steps} steps; weights written to {weights}")
  return RunResult(weights, step, total_steps, None, skips)
