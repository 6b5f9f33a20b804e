"""The run loop of one model: data, frozen networks, checkpoints, signals and logging.

`train_model(config, workdir)` trains `config.model` with `train.train_step`, resuming from the
latest checkpoint in `workdir`, and writes `workdir/<model>.npz` at the end. The
teacher-then-student sequence of the quickstart is `stages.run`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmdrfuse_jax import checkpoints, distill, interrupts, models, refresh, summary, train, vgg


class TrainingError(RuntimeError):
  """A user-facing problem with a run's inputs (message is one line)."""


@dataclasses.dataclass
class RunResult:
  """What `train_model` did."""

  weights: pathlib.Path | None  # The trained model's weights file (None if interrupted).
  step: int  # The last completed step.
  total_steps: int
  interrupted_by: int | None = None  # The signal number that stopped the run early.
  nonfinite_skips: int = 0


# ------------------------------------------------------------------------------ run inputs


def load_dataset(config: Any):
  """The training patches the config names (built dataset, or procedural pairs)."""
  from mmdrfuse_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  d = config.data
  kwargs = dict(patch_size=int(d.patch_size), patch_stride=int(d.patch_stride))
  if int(d.synthetic_pairs) > 0:
    return pipeline.PatchDataset.from_synthetic(
        int(d.synthetic_pairs), int(d.synthetic_height), int(d.synthetic_width),
        seed=int(config.seed), **kwargs)
  if not d.dataset or not d.data_dir:
    raise TrainingError(
        "no training data: set --config.data.dataset=NAME and --config.data.data_dir=DIR of a "
        "dataset built with `python bin/prepare_data.py --dataset NAME --manual_dir FOLDER "
        "--data_dir DIR` (or use configs/quickstart.py)")
  from mmdrfuse_jax.data import builders  # pylint: disable=g-import-not-at-top

  try:
    return pipeline.PatchDataset.from_tfds(os.path.expanduser(d.data_dir), d.dataset, d.split,
                                           **kwargs)
  except (builders.DataError, ValueError) as e:
    raise TrainingError(str(e)) from None


def load_vgg(config: Any, log: Callable[[str], None]) -> Any:
  """The frozen VGG-19: converted weights, or (quickstart only) a seeded random one."""
  if config.vgg_weights:
    try:
      return vgg.load_params(os.path.expanduser(config.vgg_weights))
    except vgg.VGGWeightsError as e:
      raise TrainingError(str(e)) from None
  if config.allow_random_vgg:
    log(f"NOTE: no --config.vgg_weights given: using a RANDOM VGG-19 (seed "
        f"{config.random_vgg_seed}); perception losses are only structural stand-ins. For real "
        "training: " + vgg.HOW_TO_GET)
    return vgg.random_params(int(config.random_vgg_seed))
  raise TrainingError(
      f"no VGG-19 weights: set --config.vgg_weights=FILE.npz; to get one, {vgg.HOW_TO_GET}")


def load_teacher(config: Any) -> Any:
  """The frozen teacher of a student run."""
  if not config.teacher_weights:
    raise TrainingError(
        "a student run needs its teacher: set --config.teacher_weights to the project's teacher "
        "weights (teacher.npz written by a configs/teacher.py run) or the published "
        "teacher.model")
  try:
    return checkpoints.load_params(os.path.expanduser(config.teacher_weights), "teacher")
  except checkpoints.WeightsError as e:
    raise TrainingError(str(e)) from None


# ----------------------------------------------------------------------------- checkpoints


class RunCheckpoints:
  """The run's orbax checkpoints (`workdir/checkpoints`): the last few train states."""

  def __init__(self, directory: pathlib.Path, keep: int):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    self._ocp = ocp
    self.directory = directory
    self._manager = ocp.CheckpointManager(
        directory.resolve(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False,
            cleanup_tmp_directories=True))

  def restore_latest(self, like: train.TrainState) -> tuple[train.TrainState, int | None]:
    """The latest saved state (shaped and placed like `like`) and its step; `like` if none."""
    latest = self._manager.latest_step()
    if latest is None:
      return like, None
    abstract = jax.tree_util.tree_map(self._ocp.utils.to_shape_dtype_struct, like)
    try:
      return self._manager.restore(latest, args=self._ocp.args.StandardRestore(abstract)), latest
    except Exception as e:  # Orbax raises many types for a mismatching or damaged checkpoint.
      first_line = (str(e).splitlines() or [""])[0][:200]
      raise TrainingError(
          f"{self.directory}: cannot resume from step {latest} with this config "
          f"({type(e).__name__}: {first_line}); use another --workdir") from None

  def save(self, step: int, state: train.TrainState) -> None:
    """Saves `state` as `step` (once: a step already saved is not written again)."""
    if self._manager.latest_step() != step:
      self._manager.save(step, args=self._ocp.args.StandardSave(state), force=True)
      self._manager.wait_until_finished()


# -------------------------------------------------------------------------------- the loop


def _mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  stacked = jax.device_get(history)
  return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


def train_model(config: Any, workdir: str | os.PathLike, *, log: Callable[[str], None] = print,
                stop_at_step: int | None = None) -> RunResult:
  """Trains `config.model` in `workdir`, resuming from its latest checkpoint.

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
  import tqdm  # pylint: disable=g-import-not-at-top

  workdir = pathlib.Path(workdir).expanduser()
  if config.model not in models.MODELS:
    raise TrainingError(
        f"config.model must be one of {sorted(models.MODELS)}, got {config.model!r}")
  workdir.mkdir(parents=True, exist_ok=True)
  dataset = load_dataset(config)
  vgg_params = load_vgg(config, log)
  teacher = load_teacher(config) if config.model == "student" else None
  batch_size = int(config.batch_size)
  steps_per_epoch = dataset.steps_per_epoch(batch_size)
  if steps_per_epoch == 0:
    raise TrainingError(
        f"{dataset.num_patches} training patches do not make one batch of {batch_size}")
  total_steps = steps_per_epoch * int(config.num_epochs)
  cfg = train.StepConfig.from_config(config, steps_per_epoch)
  mesh = train.make_mesh(batch_size)
  memory_bytes = refresh.bytes_per_sample(cfg.refresh, dataset.patch_size, dataset.patch_size)
  log(f"{config.model}: {dataset.num_patches} patches, {steps_per_epoch} steps/epoch x "
      f"{config.num_epochs} epochs, batch {batch_size} over {mesh.devices.size} device(s); "
      f"refresh memories {cfg.refresh.memory_dtype}, {memory_bytes:,} bytes/sample")

  o = config.optim
  state = train.create_train_state(
      config.model, train.make_optimizer(float(o.lr), float(o.b1), float(o.b2), float(o.eps)),
      jax.random.PRNGKey(int(config.seed)), dataset.num_patches, dataset.patch_size,
      cfg.refresh, teacher_params=teacher)
  state = train.replicate(state, mesh)
  frozen = train.replicate(train.Frozen(vgg=vgg_params, teacher=teacher), mesh)

  saved = RunCheckpoints(workdir / "checkpoints", int(config.keep_checkpoints))
  state, resumed_from = saved.restore_latest(state)
  if resumed_from is not None:
    log(f"resumed from {saved.directory} at step {resumed_from} "
        f"(epoch {int(state.epoch)}, batch {int(state.position)})")
  config_json = config.to_json_best_effort(indent=2)
  (workdir / "config.json").write_text(config_json + "\n")

  cache = None
  if cfg.uses_teacher and config.teacher_cache:
    cache = distill.TeacherCache(dataset.num_patches, dataset.patch_size, mesh)
  step = int(state.step)
  train_step = train.make_train_step(cfg, mesh)
  writer = summary.MetricWriter(workdir)
  writer.config(config_json)
  interrupted = None
  history = []
  end = total_steps if stop_at_step is None else min(total_steps, stop_at_step)
  batches = dataset.iterate(
      batch_size, int(config.seed), {"epoch": int(state.epoch), "step": int(state.position)},
      num_epochs=int(config.num_epochs), sharding=NamedSharding(mesh, P("data")))
  bar = tqdm.tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
                  disable=not config.progress_bar)
  try:
    with interrupts.StopRequest() as stop:
      for batch, _ in batches:
        if step >= end or stop.signum is not None:
          break
        if cache is not None:
          batch = cache.add_to(batch, frozen.teacher)
        state, metrics = train_step(state, batch, frozen)
        step += 1
        history.append(metrics)
        bar.update(1)
        if step % int(config.log_every_steps) == 0 or step == end:
          m = _mean_metrics(history)
          history = []
          writer.scalars(step, m)
          writer.flush()
          bar.set_postfix(loss=f"{m['loss']:.4g}")
          (bar.write if config.progress_bar else log)(summary.format_metrics(step, total_steps, m))
        if step % int(config.checkpoint_every_steps) == 0:
          saved.save(step, state)
      interrupted = stop.signum
  finally:
    bar.close()
    writer.close()
  saved.save(step, state)
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
