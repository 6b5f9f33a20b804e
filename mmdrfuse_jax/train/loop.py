"""The run loop of one model: data, frozen networks, checkpoints, signals and logging.

`train_model(config, workdir)` trains `config.model` with `update.train_step`, resuming from the
latest checkpoint in `workdir`, and writes `workdir/<model>.npz` at the end. It reads the
config once, at the top, into a `run_spec.RunSpec` (or takes one built already) and passes the
spec or its parts down: nothing below `train_model` reads the config. The teacher-then-student
sequence of the quickstart is `stages.run`.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pathlib
from typing import TYPE_CHECKING, Any, Callable, cast

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmdrfuse_jax.io import files, imageio
from mmdrfuse_jax.models import vgg, weight_files
from mmdrfuse_jax.runtime import interrupts
from mmdrfuse_jax.train import distributed, refresh, summary, teacher_cache, update, validation
from mmdrfuse_jax.train.run_checkpoints import RunCheckpoints, kept_checkpoints
from mmdrfuse_jax.train.run_record import claim_workdir
from mmdrfuse_jax.train.run_spec import (
  ConfigError,
  DataSpec,
  FrozenSpec,
  RunSpec,
  TrainingError,
  as_spec,
  uses_teacher_cache,
)

if TYPE_CHECKING:
  from mmdrfuse_jax.data import pipeline

  # The training patches: one dataset (in memory or streamed), or a mixture of several.
  Patches = pipeline.PatchDataset | pipeline.StreamingPatchDataset | pipeline.PatchMixture


@dataclasses.dataclass
class RunResult:
  """What `train_model` did."""

  weights: pathlib.Path | None  # The trained model's weights file (None if interrupted).
  step: int  # The last completed step.
  total_steps: int
  interrupted_by: int | None = None  # The signal number that stopped the run early.
  nonfinite_skips: int = 0


# ------------------------------------------------------------------------------ run inputs


def _check_data_named(data: DataSpec) -> None:
  """Raises TrainingError when the run names no training data at all."""
  if not data.synthetic and (not data.datasets or not data.data_dir):
    raise TrainingError(
        "no training data: set --config.data.dataset=NAME and --config.data.data_dir=DIR of a "
        "dataset built with `python bin/prepare_data.py --dataset NAME --manual_dir FOLDER "
        "--data_dir DIR` (or use configs/quickstart.py)")


def load_dataset(run: RunSpec | ml_collections.ConfigDict) -> Patches:
  """The training patches a run names (built dataset, or procedural pairs), with the
  augmentation it asks for.

  Args:
    run: the run's spec, or its config (read into one first: `RunSpec.from_config`).
  """
  spec = as_spec(run)
  return _load_dataset(spec.data, spec.seed)


def _load_dataset(data: DataSpec, seed: int) -> Patches:
  dataset = _load_patches(data, seed)
  dataset.augmentation = data.augment.photometric()
  return dataset


def _load_patches(data: DataSpec, seed: int) -> Patches:
  from mmdrfuse_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  kwargs: dict[str, Any] = dict(patch_size=data.patch_size, patch_stride=data.patch_stride)
  if data.synthetic:
    return pipeline.PatchDataset.from_synthetic(
        data.synthetic_pairs, data.synthetic_height, data.synthetic_width, seed=seed, **kwargs)
  _check_data_named(data)
  from mmdrfuse_jax.data import sources as data_sources  # pylint: disable=g-import-not-at-top

  sources = []
  for name in data.datasets:
    try:
      dataset = pipeline.PatchDataset.from_tfds(os.path.expanduser(data.data_dir), name,
                                                data.split, streaming=data.streaming, **kwargs)
    except (data_sources.DataError, ValueError) as e:
      raise TrainingError(str(e)) from None
    if data.holdout:  # The validation side of the split (`data/holdout.py`) never trains.
      from mmdrfuse_jax.data import holdout  # pylint: disable=g-import-not-at-top

      dataset.exclude_images(holdout.held_out(dataset.stems, data.holdout))
    sources.append(dataset)
  if len(sources) == 1:
    return sources[0]
  try:
    return pipeline.PatchMixture(sources, data.weights, list(data.datasets))
  except ValueError as e:
    raise ConfigError(f"config.data.weights: {e}") from None


def load_vgg(frozen: FrozenSpec, log: Callable[[str], None]) -> Any:
  """The frozen VGG-19: converted weights, or (quickstart only) a seeded random one."""
  if frozen.vgg_weights:
    try:
      return vgg.load_params(os.path.expanduser(frozen.vgg_weights))
    except vgg.VGGWeightsError as e:
      raise TrainingError(str(e)) from None
  if frozen.allow_random_vgg:
    log(f"NOTE: no --config.vgg_weights given: using a RANDOM VGG-19 (seed "
        f"{frozen.random_vgg_seed}); perception losses are only structural stand-ins. For real "
        "training: " + vgg.HOW_TO_GET)
    return vgg.random_params(frozen.random_vgg_seed)
  raise TrainingError(
      f"no VGG-19 weights: set --config.vgg_weights=FILE.npz; to get one, {vgg.HOW_TO_GET}")


def load_teacher(frozen: FrozenSpec) -> Any:
  """The frozen teacher of a student run."""
  if not frozen.teacher_weights:
    raise TrainingError(
        "a student run needs its teacher: set --config.teacher_weights to the project's teacher "
        "weights (teacher.npz written by a configs/teacher.py run) or the published "
        "teacher.model")
  try:
    return weight_files.load_params(os.path.expanduser(frozen.teacher_weights), "teacher")
  except weight_files.WeightsError as e:
    raise TrainingError(str(e)) from None


def check_inputs(spec: RunSpec, *, teacher: bool = True,
                 log: Callable[[str], None] | None = None) -> None:
  """Reads the files a run needs but not its data, to fail before long work.

  The VGG-19 weights when a term needs them, a student's teacher (unless `teacher` is False:
  an earlier stage writes it), and the validation folders. The data are checked as they load
  (`load_dataset`); building them is the caller's.

  Raises:
    TrainingError: a file is missing or unusable (one line).
  """
  log = log or _quiet
  if spec.needs_vgg and (spec.frozen.vgg_weights or not spec.frozen.allow_random_vgg):
    load_vgg(spec.frozen, log)  # (A random VGG-19 is made, not read: nothing to check.)
  if teacher and spec.model == "student":
    load_teacher(spec.frozen)
  if spec.validation.source == "folders":
    try:  # Folders are only read: no workdir is written.
      validation.prepare_pairs(spec.validation, spec.data, spec.seed, pathlib.Path(), log)
    except (validation.ValidationError, imageio.ImageError) as e:
      raise TrainingError(str(e)) from None


# -------------------------------------------------------------------------------- the loop


def _patch_identity(spec: RunSpec) -> str:
  """What fixes the inputs of each patch id: runs that share it share teacher targets.

  Not the mixture's weights (they change how often a patch comes, not what it holds) nor
  streaming; the seed, since it draws each patch's augmentation.
  """
  return f"{dataclasses.replace(spec.data, weights=None, streaming='')!r} seed={spec.seed}"


def _mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  stacked = jax.device_get(history)
  return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


def _prepare_validation(spec: RunSpec, workdir: pathlib.Path, log: Callable[[str], None]
                        ) -> tuple[validation.Validator | None, validation.BestParams | None]:
  """The run's validator and best-parameter keeper (None when not configured)."""
  settings = spec.validation
  if not settings.enabled:
    return None, None
  try:
    # Process 0 writes the pairs that are not files yet (a split, procedural pairs); the other
    # processes read them once it has.
    triples = None
    if distributed.is_primary():
      triples = validation.prepare_pairs(settings, spec.data, spec.seed, workdir, log)
    distributed.barrier(f"mmdrfuse: validation pairs of {workdir}")
    if triples is None:
      triples = validation.prepare_pairs(settings, spec.data, spec.seed, workdir, log)
    validator = validation.Validator(triples, settings)
  except (validation.ValidationError, imageio.ImageError) as e:
    raise TrainingError(str(e)) from None
  when = (f"every {settings.every_steps} steps and at the end" if settings.every_steps
          else "at the end")
  log(f"validation: {len(triples)} pairs ({settings.source}), {', '.join(settings.names)}, "
      f"{when}")
  best = None
  if settings.best_metric:
    best = validation.BestParams(workdir, spec.model, settings.best_metric)
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


def train_model(config: RunSpec | ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                log: Callable[[str], None] = print, stop_at_step: int | None = None,
                run_dir: str | os.PathLike | None = None) -> RunResult:
  """Trains `config.model` in `workdir`, resuming from its latest checkpoint.

  Args:
    config: the run's ml_collections config (see configs/default.py), read and checked here,
      once (`run_spec.RunSpec.from_config`); or a `RunSpec` built from one already.
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
  spec = as_spec(config)  # The only read of the config: below, the spec and its parts.
  if not distributed.is_primary():
    log = _quiet  # Process 0 alone logs a multi-process run.
  try:
    return _train_model(spec, workdir, log, stop_at_step,
                        pathlib.Path(run_dir).expanduser() if run_dir is not None else workdir)
  except distributed.DistributedError as e:
    raise TrainingError(str(e)) from None
  except OSError as e:  # Disk full, permissions: the cause and the path, in one line.
    # Which checkpoints a rerun finds, if any: none when the workdir could not even be made.
    raise TrainingError(files.os_error_message(e, e.filename or workdir)
                        + kept_checkpoints(workdir / "checkpoints")) from None


def _quiet(line: str) -> None:
  del line


def _train_model(spec: RunSpec, workdir: pathlib.Path, log: Callable[[str], None],
                 stop_at_step: int | None, run_dir: pathlib.Path) -> RunResult:
  """`train_model` once the config is read into `spec`."""
  import tqdm  # pylint: disable=g-import-not-at-top

  # In a multi-process run process 0 writes every file but the checkpoints (which all write
  # together) and the others read what it wrote after a `distributed.barrier`.
  primary = distributed.is_primary()
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except FileExistsError:  # A file of that name; mkdir's own words would be "file exists".
    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(workdir)) from None
  claim_workdir(workdir, dict(spec.settings), spec.start_fresh, log, write=primary,
                run_dir=run_dir)
  if primary:
    # A run killed while writing one of these (kill -9) left a temporary file beside it.
    files.remove_stale_temporaries(workdir, ("run.json", "config.json", "metrics.jsonl",
                                             f"{spec.model}.npz"))
  distributed.barrier(f"mmdrfuse: {workdir} claimed")
  # The frozen networks' files before the data, whose loading may take minutes. No VGG-19
  # when no term that is on reads it (perception and the refresh losses off).
  _check_data_named(spec.data)
  vgg_params = load_vgg(spec.frozen, log) if spec.needs_vgg else None
  teacher = load_teacher(spec.frozen) if spec.model == "student" else None
  dataset = _load_dataset(spec.data, spec.seed)
  validator, best = _prepare_validation(spec, workdir, log)
  batch_size = spec.batch_size
  steps_per_epoch = dataset.steps_per_epoch(batch_size)
  if steps_per_epoch == 0:
    raise TrainingError(
        f"{dataset.num_patches} training patches do not make one batch of {batch_size}")
  total_steps = steps_per_epoch * spec.num_epochs
  cfg = spec.step_config(steps_per_epoch)
  mesh = update.make_mesh(batch_size)
  processes = jax.process_count()
  if len({d.process_index for d in mesh.devices.flat}) < processes:
    raise TrainingError(
        f"batch {batch_size} does not split over the {jax.device_count()} devices of the "
        f"{processes} processes (it splits over {mesh.devices.size}, leaving some process without "
        "a part); use a batch size that the device count divides")
  memory_bytes = refresh.bytes_per_sample(cfg.refresh, dataset.patch_size, dataset.patch_size)
  log(f"{spec.model}: {dataset.num_patches} patches, {steps_per_epoch} steps/epoch x "
      f"{spec.num_epochs} epochs, batch {batch_size} over {mesh.devices.size} device(s)"
      f"{f' of {processes} processes' if processes > 1 else ''}; "
      f"refresh memories {cfg.refresh.memory_dtype} {cfg.refresh.placement}, "
      f"{memory_bytes:,} bytes/sample; "
      f"precision {cfg.precision}")

  state = update.create_train_state(
      spec.model, spec.optim.optimizer(total_steps), jax.random.PRNGKey(spec.seed),
      dataset.num_patches, dataset.patch_size, cfg.refresh, teacher_params=teacher,
      precision=cfg.precision, mesh=mesh, conv1_bias=spec.init.conv1_bias)
  state = update.place_state(state, mesh, cfg.refresh.placement)
  frozen = update.replicate(update.Frozen(vgg=vgg_params, teacher=teacher), mesh)

  saved = RunCheckpoints(workdir / "checkpoints", spec.keep_checkpoints)
  state, resumed_from = saved.restore_latest(state, log)
  if resumed_from is not None:
    if resumed_from > total_steps:
      raise TrainingError(
          f"{saved.directory}: the run is at step {resumed_from}, past the {total_steps} steps "
          f"of num_epochs={spec.num_epochs}; give at least as many epochs as before")
    log(f"resumed from {saved.directory} at step {resumed_from} "
        f"(epoch {int(state.epoch)}, batch {int(state.position)})")
  if primary:
    with files.atomic_write(workdir / "config.json", "w") as f:
      f.write(spec.config_json + "\n")

  cache = None
  if cfg.uses_teacher and uses_teacher_cache(spec.teacher_cache,
                                             augmented=spec.data.augment.changes_every_epoch):
    cache = teacher_cache.TeacherCache(
        frozen.teacher, dataset.num_patches, dataset.patch_size, mesh, cfg.precision,
        directory=spec.teacher_cache_dir or None,
        data_label=_patch_identity(spec), log=log)
  elif spec.teacher_cache_dir and cfg.uses_teacher:
    log(f"config.teacher_cache_dir={spec.teacher_cache_dir!r} unused: the teacher runs in "
        f"every step (teacher_cache={spec.teacher_cache!r}"
        f"{', augmentation drawn every epoch' if spec.data.augment.changes_every_epoch else ''})")
  step = int(state.step)
  train_step = update.make_train_step(cfg, mesh)
  # Rows logged after the checkpoint we resume from are dropped (they will be logged again).
  writer = (summary.MetricWriter(workdir, purge_after_step=resumed_from) if primary
            else summary.NullWriter())
  writer.config(spec.config_json)
  interrupted = None
  history = []
  end = total_steps if stop_at_step is None else min(total_steps, stop_at_step)
  batches = dataset.iterate(
      batch_size, spec.seed, {"epoch": int(state.epoch), "step": int(state.position)},
      num_epochs=spec.num_epochs, sharding=NamedSharding(mesh, P("data")))
  bar = tqdm.tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
                  disable=not (spec.progress_bar and primary))
  # With the bar on, lines go above it.
  write = bar.write if spec.progress_bar else log
  try:
    with interrupts.StopRequest() as stop:
      for batch, _ in batches:
        # A stop request to any process stops all of them here, before the same step.
        if step >= end or distributed.agree_on_stop(stop.signum) is not None:
          break
        if cache is not None:
          batch = cache.add_to(batch)
        state, metrics = train_step(state, batch, frozen)
        step += 1
        history.append(metrics)
        bar.update(1)
        if step % spec.log_every_steps == 0 or step == end:
          m = _mean_metrics(history)
          history = []
          writer.scalars(step, m)
          writer.flush()
          bar.set_postfix(loss=f"{m['loss']:.4g}")
          write(summary.format_metrics(step, total_steps, m))
        # Before the checkpoint of this step: a run killed in between validates again on resume.
        if validator is not None and validator.settings.due(step, total_steps):
          _validate(validator, best, step, state.params, writer, write)
        if step % spec.checkpoint_every_steps == 0:
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
  weights = workdir / f"{spec.model}.npz"
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
