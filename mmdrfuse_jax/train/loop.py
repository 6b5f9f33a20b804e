"""The run loop of one model: data, frozen networks, checkpoints, signals and logging.

`train_model(config, workdir)` trains `config.model` with `update.train_step`, resuming from the
latest checkpoint in `workdir`, and writes `workdir/<model>.npz` at the end. The
teacher-then-student sequence of the quickstart is `stages.run`.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pathlib
from typing import Any, Callable, cast

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmdrfuse_jax.io import files, imageio
from mmdrfuse_jax.models import vgg, weight_files
from mmdrfuse_jax.runtime import interrupts
from mmdrfuse_jax.train import distill, distributed, refresh, summary, update, validation
from mmdrfuse_jax.train.run_checkpoints import RunCheckpoints, kept_checkpoints
from mmdrfuse_jax.train.run_record import claim_workdir
from mmdrfuse_jax.train.run_settings import (
  ConfigError,
  TrainingError,
  check_config,
  uses_teacher_cache,
)


@dataclasses.dataclass
class RunResult:
  """What `train_model` did."""

  weights: pathlib.Path | None  # The trained model's weights file (None if interrupted).
  step: int  # The last completed step.
  total_steps: int
  interrupted_by: int | None = None  # The signal number that stopped the run early.
  nonfinite_skips: int = 0


# ------------------------------------------------------------------------------ run inputs


def _check_data_named(config: Any) -> None:
  """Raises TrainingError when the config names no training data at all."""
  d = config.data
  if int(d.synthetic_pairs) <= 0 and (not d.dataset or not d.data_dir):
    raise TrainingError(
        "no training data: set --config.data.dataset=NAME and --config.data.data_dir=DIR of a "
        "dataset built with `python bin/prepare_data.py --dataset NAME --manual_dir FOLDER "
        "--data_dir DIR` (or use configs/quickstart.py)")


def load_dataset(config: Any):
  """The training patches the config names (built dataset, or procedural pairs), with the
  augmentation it asks for."""
  dataset = _load_patches(config)
  a = config.data.get("augment")
  if a is not None and a.enabled:
    from mmdrfuse_jax.data import augment  # pylint: disable=g-import-not-at-top

    try:
      dataset.augmentation = augment.Photometric(float(a.exposure), float(a.gamma),
                                                 float(a.contrast))
    except ValueError as e:
      raise ConfigError(f"config.data.augment: {e}") from None
  return dataset


def _load_patches(config: Any):
  from mmdrfuse_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  d = config.data
  kwargs: dict[str, Any] = dict(patch_size=int(d.patch_size), patch_stride=int(d.patch_stride))
  if int(d.synthetic_pairs) > 0:
    return pipeline.PatchDataset.from_synthetic(
        int(d.synthetic_pairs), int(d.synthetic_height), int(d.synthetic_width),
        seed=int(config.seed), **kwargs)
  _check_data_named(config)
  from mmdrfuse_jax.data import sources as data_sources  # pylint: disable=g-import-not-at-top

  try:
    names, weights = pipeline.mixture_spec(d.dataset, d.get("weights", ""))
  except ValueError as e:
    raise ConfigError(f"config.data.dataset / config.data.weights: {e}") from None
  fraction = float(d.get("holdout", 0.0))
  sources = []
  for name in names:
    try:
      dataset = pipeline.PatchDataset.from_tfds(os.path.expanduser(d.data_dir), name, d.split,
                                                streaming=d.get("streaming", "auto"), **kwargs)
    except (data_sources.DataError, ValueError) as e:
      raise TrainingError(str(e)) from None
    if fraction:  # The validation side of the split (`data/holdout.py`) never trains.
      from mmdrfuse_jax.data import holdout  # pylint: disable=g-import-not-at-top

      dataset.exclude_images(holdout.held_out(dataset.stems, fraction))
    sources.append(dataset)
  if len(sources) == 1:
    return sources[0]
  try:
    return pipeline.PatchMixture(sources, weights, names)
  except ValueError as e:
    raise ConfigError(f"config.data.weights: {e}") from None


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
    return weight_files.load_params(os.path.expanduser(config.teacher_weights), "teacher")
  except weight_files.WeightsError as e:
    raise TrainingError(str(e)) from None


def needs_vgg(config: Any) -> bool:
  """Whether a loss term that is on reads VGG-19 (perception, or a refresh loss)."""
  return update.StepConfig.from_config(config, steps_per_epoch=1).output_taps > 0


def check_inputs(config: Any, *, teacher: bool = True,
                 log: Callable[[str], None] | None = None) -> None:
  """Reads the files a run of `config` needs but not its data, to fail before long work.

  The VGG-19 weights when a term needs them, a student's teacher (unless `teacher` is False:
  an earlier stage writes it), and the validation folders. The data are checked as they load
  (`load_dataset`); building them is the caller's.

  Raises:
    TrainingError: a file is missing or unusable (one line).
  """
  log = log or _quiet
  if needs_vgg(config) and (config.vgg_weights or not config.allow_random_vgg):
    load_vgg(config, log)  # (A random VGG-19 is made, not read: nothing to check.)
  if teacher and config.model == "student":
    load_teacher(config)
  settings = validation.settings(config)
  if settings.source == "folders":
    try:  # Folders are only read: no workdir is written.
      validation.prepare_pairs(config, settings, pathlib.Path(), log)
    except (validation.ValidationError, imageio.ImageError) as e:
      raise TrainingError(str(e)) from None


# -------------------------------------------------------------------------------- the loop


def _mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  stacked = jax.device_get(history)
  return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


def _prepare_validation(config: Any, workdir: pathlib.Path, log: Callable[[str], None]
                        ) -> tuple[validation.Validator | None, validation.BestParams | None]:
  """The run's validator and best-parameter keeper (None when not configured)."""
  settings = validation.settings(config)
  if not settings.enabled:
    return None, None
  try:
    # Process 0 writes the pairs that are not files yet (a split, procedural pairs); the other
    # processes read them once it has.
    triples = None
    if distributed.is_primary():
      triples = validation.prepare_pairs(config, settings, workdir, log)
    distributed.barrier(f"mmdrfuse: validation pairs of {workdir}")
    if triples is None:
      triples = validation.prepare_pairs(config, settings, workdir, log)
    validator = validation.Validator(triples, settings)
  except (validation.ValidationError, imageio.ImageError) as e:
    raise TrainingError(str(e)) from None
  when = (f"every {settings.every_steps} steps and at the end" if settings.every_steps
          else "at the end")
  log(f"validation: {len(triples)} pairs ({settings.source}), {', '.join(settings.names)}, "
      f"{when}")
  best = None
  if settings.best_metric:
    best = validation.BestParams(workdir, str(config.model), settings.best_metric)
  return validator, best


def _validate(validator: validation.Validator, best: validation.BestParams | None, step: int,
              params: Any, writer: summary.MetricWriter | summary.NullWriter,
              log: Callable[[str], None]) -> None:
  """Validates `params` after `step`: logs the means and strips, keeps the best."""
  result = validator(params)
  for problem in result.problems:
    log(f"warning: validation: {problem}")
  writer.scalars(step, result.scalars())
  writer.images(step, {f"val/images/{stem}": strip for stem, strip in result.strips.items()})
  writer.flush()
  line = result.describe(step, len(validator.triples))
  if best is not None and best.offer(step, params, result.means):
    line += f"; best {best.metric} so far, kept"
  log(line)


def train_model(config: Any, workdir: str | os.PathLike, *, log: Callable[[str], None] = print,
                stop_at_step: int | None = None,
                run_dir: str | os.PathLike | None = None) -> RunResult:
  """Trains `config.model` in `workdir`, resuming from its latest checkpoint.

  Args:
    config: the run's ml_collections config (see configs/default.py).
    workdir: where checkpoints, logs and the final weights (`<model>.npz`) go.
    log: where progress lines go.
    stop_at_step: stop (with a checkpoint) once this step is reached, as if interrupted.
    run_dir: the folder that holds the whole run, `workdir` and what it reads from the run's
      other stages (default: `workdir`). The run record keeps the files and folders of the
      settings found inside it relative to `workdir`, so the run resumes once moved or copied
      with this folder.

  Returns:
    A `RunResult`.

  Raises:
    TrainingError: unusable settings (ConfigError); missing or unusable data, VGG or teacher
      weights; a workdir holding a run with other settings; damaged checkpoints; a full disk
      (one-line message, saying which checkpoints a rerun resumes from, if any).
  """
  workdir = pathlib.Path(workdir).expanduser()
  check_config(config)
  if not distributed.is_primary():
    log = _quiet  # Process 0 alone logs a multi-process run.
  try:
    return _train_model(config, workdir, log, stop_at_step,
                        pathlib.Path(run_dir).expanduser() if run_dir is not None else workdir)
  except distributed.DistributedError as e:
    raise TrainingError(str(e)) from None
  except OSError as e:  # Disk full, permissions: the cause and the path, in one line.
    # Which checkpoints a rerun finds, if any: none when the workdir could not even be made.
    raise TrainingError(files.os_error_message(e, e.filename or workdir)
                        + kept_checkpoints(workdir / "checkpoints")) from None


def _quiet(line: str) -> None:
  del line


def _train_model(config: Any, workdir: pathlib.Path, log: Callable[[str], None],
                 stop_at_step: int | None, run_dir: pathlib.Path) -> RunResult:
  """`train_model` after the config checks."""
  import tqdm  # pylint: disable=g-import-not-at-top

  # In a multi-process run process 0 writes every file but the checkpoints (which all write
  # together) and the others read what it wrote after a `distributed.barrier`.
  primary = distributed.is_primary()
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except FileExistsError:  # A file of that name; mkdir's own words would be "file exists".
    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(workdir)) from None
  claim_workdir(workdir, config, log, write=primary, run_dir=run_dir)
  if primary:
    # A run killed while writing one of these (kill -9) left a temporary file beside it.
    files.remove_stale_temporaries(workdir, ("run.json", "config.json", "metrics.jsonl",
                                             f"{config.model}.npz"))
  distributed.barrier(f"mmdrfuse: {workdir} claimed")
  # The frozen networks' files before the data, whose loading may take minutes. No VGG-19
  # when no term that is on reads it (perception and the refresh losses off).
  _check_data_named(config)
  vgg_params = load_vgg(config, log) if needs_vgg(config) else None
  teacher = load_teacher(config) if config.model == "student" else None
  dataset = load_dataset(config)
  validator, best = _prepare_validation(config, workdir, log)
  batch_size = int(config.batch_size)
  steps_per_epoch = dataset.steps_per_epoch(batch_size)
  if steps_per_epoch == 0:
    raise TrainingError(
        f"{dataset.num_patches} training patches do not make one batch of {batch_size}")
  total_steps = steps_per_epoch * int(config.num_epochs)
  cfg = update.StepConfig.from_config(config, steps_per_epoch)
  mesh = update.make_mesh(batch_size)
  processes = jax.process_count()
  if len({d.process_index for d in mesh.devices.flat}) < processes:
    raise TrainingError(
        f"batch {batch_size} does not split over the {jax.device_count()} devices of the "
        f"{processes} processes (it splits over {mesh.devices.size}, leaving some process without "
        "a part); use a batch size that the device count divides")
  memory_bytes = refresh.bytes_per_sample(cfg.refresh, dataset.patch_size, dataset.patch_size)
  log(f"{config.model}: {dataset.num_patches} patches, {steps_per_epoch} steps/epoch x "
      f"{config.num_epochs} epochs, batch {batch_size} over {mesh.devices.size} device(s)"
      f"{f' of {processes} processes' if processes > 1 else ''}; "
      f"refresh memories {cfg.refresh.memory_dtype} {cfg.refresh.placement}, "
      f"{memory_bytes:,} bytes/sample; "
      f"precision {cfg.precision}")

  o = config.optim
  state = update.create_train_state(
      config.model,
      update.make_optimizer(float(o.lr), float(o.b1), float(o.b2), float(o.eps),
                            schedule=o.get("schedule", "constant"),
                            warmup_steps=int(o.get("warmup_steps", 0)), total_steps=total_steps,
                            final_lr_fraction=float(o.get("final_lr_fraction", 0.0))),
      jax.random.PRNGKey(int(config.seed)), dataset.num_patches, dataset.patch_size,
      cfg.refresh, teacher_params=teacher, precision=cfg.precision, mesh=mesh,
      conv1_bias=float(config.get("init", {}).get("conv1_bias", 0.0)))
  state = update.place_state(state, mesh, cfg.refresh.placement)
  frozen = update.replicate(update.Frozen(vgg=vgg_params, teacher=teacher), mesh)

  saved = RunCheckpoints(workdir / "checkpoints", int(config.keep_checkpoints))
  state, resumed_from = saved.restore_latest(state, log)
  if resumed_from is not None:
    if resumed_from > total_steps:
      raise TrainingError(
          f"{saved.directory}: the run is at step {resumed_from}, past the {total_steps} steps "
          f"of num_epochs={config.num_epochs}; give at least as many epochs as before")
    log(f"resumed from {saved.directory} at step {resumed_from} "
        f"(epoch {int(state.epoch)}, batch {int(state.position)})")
  config_json = config.to_json_best_effort(indent=2)
  if primary:
    with files.atomic_write(workdir / "config.json", "w") as f:
      f.write(config_json + "\n")

  cache = None
  if cfg.uses_teacher and uses_teacher_cache(config.teacher_cache):
    cache = distill.TeacherCache(dataset.num_patches, dataset.patch_size, mesh, cfg.precision)
  step = int(state.step)
  train_step = update.make_train_step(cfg, mesh)
  # Rows logged after the checkpoint we resume from are dropped (they will be logged again).
  writer = (summary.MetricWriter(workdir, purge_after_step=resumed_from) if primary
            else summary.NullWriter())
  writer.config(config_json)
  interrupted = None
  history = []
  end = total_steps if stop_at_step is None else min(total_steps, stop_at_step)
  batches = dataset.iterate(
      batch_size, int(config.seed), {"epoch": int(state.epoch), "step": int(state.position)},
      num_epochs=int(config.num_epochs), sharding=NamedSharding(mesh, P("data")))
  bar = tqdm.tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
                  disable=not (config.progress_bar and primary))
  try:
    with interrupts.StopRequest() as stop:
      for batch, _ in batches:
        # A stop request to any process stops all of them here, before the same step.
        if step >= end or distributed.agree_on_stop(stop.signum) is not None:
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
        # Before the checkpoint of this step: a run killed in between validates again on resume.
        if validator is not None and validator.settings.due(step, total_steps):
          _validate(validator, best, step, state.params, writer,
                    bar.write if config.progress_bar else log)
        if step % int(config.checkpoint_every_steps) == 0:
          saved.save(step, state)
      # Again, for every process alike: the loop may have ended with its last batch.
      interrupted = distributed.agree_on_stop(stop.signum)
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
  if primary:
    weight_files.save_params(weights, jax.device_get(state.params))
  # Whatever comes next (a student stage reading this teacher) reads the file on every process.
  distributed.barrier(f"mmdrfuse: {weights} written")
  log(f"done: {total_steps} steps; weights written to {weights}")
  if best is not None and best.export() is not None:  # Again: a kill may have come between.
    # export() wrote a file, so a best is kept: best() is not None.
    step_best, value = cast(tuple[int, float], best.best())
    log(f"best validation {best.metric} {value:.4g} at step {step_best}: {best.weights}")
  return RunResult(weights, step, total_steps, None, skips)
