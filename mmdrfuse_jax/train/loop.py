"""The run loop of one model: data, frozen networks, checkpoints, signals and logging.

`train_model(config, workdir)` trains `config.model` with `update.train_step`, resuming from the
latest checkpoint in `workdir`, and writes `workdir/<model>.npz` at the end. The
teacher-then-student sequence of the quickstart is `stages.run`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import pathlib
import re
import shutil
import time
from typing import Any, Callable, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmdrfuse_jax.errors import MMDRFuseError
from mmdrfuse_jax.io import files, imageio
from mmdrfuse_jax.models import networks, vgg, weight_files
from mmdrfuse_jax.models import precision as precision_lib
from mmdrfuse_jax.runtime import interrupts
from mmdrfuse_jax.train import distill, distributed, refresh, summary, update, validation


class TrainingError(MMDRFuseError, RuntimeError):
  """A user-facing problem with a run's inputs (message is one line)."""


class ConfigError(TrainingError):
  """Settings no run can use, found before any work (`check_config`; message is one line)."""


@dataclasses.dataclass
class RunResult:
  """What `train_model` did."""

  weights: pathlib.Path | None  # The trained model's weights file (None if interrupted).
  step: int  # The last completed step.
  total_steps: int
  interrupted_by: int | None = None  # The signal number that stopped the run early.
  nonfinite_skips: int = 0


# ------------------------------------------------------------------------- run settings

# The settings that shape a run: checkpoints, the data order and the refresh memories depend
# on them, so a rerun in the same workdir must keep them. The others (logging, checkpoint
# frequency, progress bar, teacher cache) may change between reruns, and `num_epochs` may
# grow (the run continues); `start_fresh=True` moves the old run aside and starts over.
IDENTITY_KEYS = ("model", "seed", "data", "batch_size", "optim", "loss", "refresh",
                 "vgg_weights", "allow_random_vgg", "random_vgg_seed", "teacher_weights")
# Under the keys above but free to change: where the refresh memories live and whether the
# patches are streamed change no result, and checkpoints of every placement restore into each
# other (`RunCheckpoints.restore_latest`).
NOT_IDENTITY = ("refresh.placement", "data.streaming")
_POSITIVE_INTS = ("batch_size", "num_epochs", "log_every_steps", "checkpoint_every_steps",
                  "keep_checkpoints", "data.patch_size", "data.patch_stride")
# Adam's settings: a step size of 0 or below would not train (below 0: gradient ascent), decay
# rates of 1 or more never forget (and divide by 0 in the bias correction), an eps of 0 or
# below divides by 0 or flips the step's sign.
_POSITIVE_FLOATS = ("optim.lr", "optim.eps")
_DECAY_RATES = ("optim.b1", "optim.b2")
# Settings that name a file or folder. In the run record one inside the run's folder is kept
# relative to the workdir, so that the run may be moved or copied (`_claim_workdir`).
PATH_KEYS = ("data.data_dir", "vgg_weights", "teacher_weights")
# The run record's format: 2 keeps `PATH_KEYS` inside the run's folder relative to the workdir;
# records without one (older versions) hold them as given.
_RECORD_FORMAT = 2


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if hasattr(tree, "to_dict"):
    tree = tree.to_dict()
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(_flatten(value, f"{prefix}{key}."))
  return flat


def _real(value: Any) -> float | None:
  """`value` as a finite float, or None (not a number, a bool, NaN or infinite)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if math.isfinite(value) else None


def check_config(config: Any) -> None:
  """Raises ConfigError (one line) for settings no run can use."""
  if config.model not in networks.MODELS:
    raise ConfigError(
        f"config.model must be one of {sorted(networks.MODELS)}, got {config.model!r}")
  flat = _flatten(config)
  for key in _POSITIVE_INTS:
    value = flat[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"config.{key} must be a positive integer, got {value!r}")
  for key in _POSITIVE_FLOATS:
    real = _real(flat[key])
    if real is None or real <= 0:
      raise ConfigError(f"config.{key} must be a positive number, got {flat[key]!r}")
  for key in _DECAY_RATES:
    real = _real(flat[key])
    if real is None or not 0 <= real < 1:
      raise ConfigError(f"config.{key} must be in [0, 1), got {flat[key]!r}")
  if config.get("precision", "exact") not in precision_lib.MODES:
    raise ConfigError(f"config.precision must be one of {', '.join(precision_lib.MODES)}, "
                      f"got {config.precision!r}")
  if config.get("teacher_cache", "auto") not in TEACHER_CACHE_CHOICES:
    raise ConfigError(f"config.teacher_cache must be one of {', '.join(TEACHER_CACHE_CHOICES)}"
                      f", got {config.teacher_cache!r}")
  placement = config.refresh.get("placement", "replicated")
  if placement not in refresh.PLACEMENTS:
    raise ConfigError(f"config.refresh.placement must be one of {', '.join(refresh.PLACEMENTS)}"
                      f", got {placement!r}")
  if placement == "host" and not update.has_pinned_host():
    raise ConfigError(f"config.refresh.placement=host needs pinned host memory, which "
                      f"{jax.default_backend()} devices do not have; use sharded or replicated")
  if int(config.data.synthetic_pairs) > 0 and config.data.dataset:
    raise ConfigError(
        f"config.data names both a dataset ({config.data.dataset!r}) and procedural pairs "
        f"(synthetic_pairs={config.data.synthetic_pairs}); to train on the dataset add "
        "--config.data.synthetic_pairs=0")
  try:
    validation.settings(config)
  except validation.ValidationError as e:
    raise ConfigError(str(e)) from None


TEACHER_CACHE_CHOICES = ("auto", "host", "off")


def uses_teacher_cache(setting: str, backend: str | None = None) -> bool:
  """Whether a student run keeps its teacher's targets in host RAM (`config.teacher_cache`)."""
  if setting == "auto":
    return (backend or jax.default_backend()) == "cpu"
  return setting == "host"


def run_identity(config: Any) -> dict[str, Any]:
  """The settings of `config` that a rerun in the same workdir must keep (dotted keys)."""
  return {k: v for k, v in _flatten(config).items()
          if k.split(".")[0] in IDENTITY_KEYS and k not in NOT_IDENTITY}


def _absolute(path: str) -> str:
  """`path` (`~` expanded, relative to the current folder) as an absolute, normalised path."""
  return os.path.abspath(os.path.expanduser(path))


def _recorded_identity(identity: dict[str, Any], workdir: pathlib.Path,
                       run_dir: pathlib.Path) -> dict[str, Any]:
  """`identity` as the run record keeps it: a `PATH_KEYS` path inside `run_dir` relative to
  `workdir` ("../teacher/teacher.npz"), any other absolute."""
  recorded = dict(identity)
  root, here = _absolute(os.fspath(run_dir)), _absolute(os.fspath(workdir))
  for key in PATH_KEYS:
    value = identity.get(key)
    if isinstance(value, str) and value:
      path = _absolute(value)
      inside = os.path.commonpath([path, root]) == root
      recorded[key] = os.path.relpath(path, here) if inside else path
  return recorded


def _identity_changes(before: dict[str, Any], identity: dict[str, Any], workdir: pathlib.Path,
                      legacy: bool) -> list[str]:
  """The settings of `identity` that differ from a run record's (`before`), one line each.

  Paths are compared as absolute paths: a relative one of the record is relative to `workdir`
  (to the current folder of the run that wrote it in an older version's record, `legacy`,
  which also matches a path given exactly as it was).
  """
  changed = []
  for key in sorted(set(before) | set(identity)):
    old, new = before.get(key, "(unset)"), identity.get(key, "(unset)")
    if key in PATH_KEYS and isinstance(old, str) and isinstance(new, str) and old and new:
      if legacy and old == new:
        continue
      old = _absolute(old) if legacy else os.path.normpath(os.path.join(
          _absolute(os.fspath(workdir)), old))
      new = _absolute(new)
    if old != new:
      changed.append(f"{key}: {old!r} -> {new!r}")
  return changed


def _claim_workdir(workdir: pathlib.Path, config: Any, log: Callable[[str], None],
                   write: bool = True, run_dir: pathlib.Path | None = None) -> None:
  """Records the run's settings in `workdir/run.json`, or checks a rerun keeps them.

  A run is held to its settings once it has a checkpoint; a run that stopped before its
  first one (a missing weights file, say) may be rerun with corrected settings. With
  `write=False` (every process but process 0 of a multi-process run) only the check is made:
  process 0 records the settings and moves an earlier run aside.

  Paths of the settings (`PATH_KEYS`) inside `run_dir` (default: `workdir`) are recorded
  relative to `workdir`, so that the run resumes once moved or copied as a whole (`run_dir`
  with it); an older version's record, which holds them as given, is read and, once the
  rerun is found to keep its settings, rewritten so.

  Raises:
    TrainingError: the workdir holds a run with other settings.
  """
  if not write and config.get("start_fresh", False):
    return  # Process 0 moves the earlier run aside: nothing of it is to be checked.
  record = workdir / "run.json"
  identity = run_identity(config)
  trained = (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir())
  if config.get("start_fresh", False) and any(workdir.iterdir()):
    aside = workdir / f"replaced-{time.strftime('%Y%m%dT%H%M%S')}"
    aside.mkdir()
    for entry in list(workdir.iterdir()):
      if entry != aside and not entry.name.startswith("replaced-"):
        shutil.move(str(entry), aside / entry.name)
    log(f"start_fresh: the earlier run in {workdir} was moved to {aside}")
  elif record.is_file() and trained:  # Before the first checkpoint, settings may change.
    try:
      saved = json.loads(record.read_text())
      before = saved["identity"]
      if not isinstance(before, dict):
        raise TypeError(f"its identity is a {type(before).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise TrainingError(f"{record}: unreadable run record ({type(e).__name__}: {e}); "
                          "use another --workdir or --config.start_fresh=True") from None
    legacy = "format" not in saved
    changed = _identity_changes(before, identity, workdir, legacy)
    if changed:
      raise TrainingError(
          f"{workdir} holds a run with other settings ({'; '.join(changed)}); use another "
          "--workdir, or --config.start_fresh=True to move that run aside and start over")
    if not legacy:
      return
  elif trained and not record.is_file():
    log(f"warning: {workdir} has checkpoints but no run record (an older version's run); "
        "resuming without checking its settings")
  if not write:
    return
  recorded = _recorded_identity(identity, workdir, run_dir or workdir)
  with files.atomic_write(record, "w") as f:
    f.write(json.dumps({"format": _RECORD_FORMAT, "identity": recorded}, indent=2,
                       sort_keys=True, default=str) + "\n")


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
  """The training patches the config names (built dataset, or procedural pairs)."""
  from mmdrfuse_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  d = config.data
  kwargs: dict[str, Any] = dict(patch_size=int(d.patch_size), patch_stride=int(d.patch_stride))
  if int(d.synthetic_pairs) > 0:
    return pipeline.PatchDataset.from_synthetic(
        int(d.synthetic_pairs), int(d.synthetic_height), int(d.synthetic_width),
        seed=int(config.seed), **kwargs)
  _check_data_named(config)
  from mmdrfuse_jax.data import builders  # pylint: disable=g-import-not-at-top

  try:
    return pipeline.PatchDataset.from_tfds(os.path.expanduser(d.data_dir), d.dataset, d.split,
                                           streaming=d.get("streaming", "auto"), **kwargs)
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


# ----------------------------------------------------------------------------- checkpoints


class RunCheckpoints:
  """The run's orbax checkpoints (`workdir/checkpoints`): the last few train states."""

  def __init__(self, directory: pathlib.Path, keep: int):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    self._ocp = ocp
    self.directory = directory
    self._keep = keep
    self._manager = self._open()

  def _open(self):
    return self._ocp.CheckpointManager(
        self.directory.resolve(),
        options=self._ocp.CheckpointManagerOptions(
            max_to_keep=self._keep, create=True, enable_async_checkpointing=False,
            cleanup_tmp_directories=True),
        item_handlers=self._ocp.StandardCheckpointHandler())  # Reads `item_metadata` too.

  def restore_latest(self, like: update.TrainState, log: Callable[[str], None]
                     ) -> tuple[update.TrainState, int | None]:
    """The newest saved state that restores (shaped and placed like `like`), and its step.

    A checkpoint that does not restore (truncated, missing metadata, empty) is moved to
    `damaged_checkpoints/` beside `checkpoints/`, never deleted, and the next older one is
    tried. Returns `(like, None)` when there is no checkpoint.

    Raises:
      TrainingError: checkpoints exist but none restores.
    """
    abstract = jax.tree_util.tree_map(self._ocp.utils.to_shape_dtype_struct, like)
    failures = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        saved = self._saved_memory(step)  # The metadata, read once for both checks.
        legacy = _bfloat16_memories(saved, like)
        target = abstract.replace(memory={
            key: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16, sharding=a.sharding)
            if key in legacy else a for key, a in abstract.memory.items()})
        restored = self._manager.restore(step, args=self._ocp.args.StandardRestore(
            target, strict=_same_memory_slots(saved, like)))
        if legacy:
          restored = restored.replace(memory={
              key: refresh.bfloat16_bits(m) if key in legacy else m
              for key, m in restored.memory.items()})
      except Exception as e:  # Orbax raises many types for a damaged checkpoint.
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        failures.append(f"step {step} ({reason})")
        # Every process fails on the same files; process 0 moves them, the others wait.
        moved = self._quarantine(step) if distributed.is_primary() else None
        distributed.barrier(f"mmdrfuse: checkpoint {step} moved aside")
        log(f"warning: checkpoint at step {step} in {self.directory} does not restore "
            f"({reason}); moved to {moved}, trying an older one")
        # A fresh manager: a failed restore can leave the old one's view of the steps wrong.
        self._manager = self._open()
        continue
      return restored, step
    if failures:
      raise TrainingError(
          f"{self.directory}: no checkpoint restores, all are damaged ({'; '.join(failures)}); "
          "use another --workdir, or --config.start_fresh=True to start over")
    return like, None

  def _saved_memory(self, step: int) -> dict:
    """Checkpoint `step`'s refresh memory metadata by key ({} when unreadable)."""
    try:
      saved = self._manager.item_metadata(step)
    except Exception:  # Damaged metadata: the restore itself says why.
      return {}
    saved = getattr(saved, "tree", saved)
    memory = saved.get("memory") if isinstance(saved, dict) else None
    return memory if isinstance(memory, dict) else {}

  def _quarantine(self, step: int) -> pathlib.Path:
    damaged = self.directory.parent / "damaged_checkpoints"
    damaged.mkdir(exist_ok=True)
    target = damaged / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
    (self.directory / str(step)).rename(target)
    return target

  def save(self, step: int, state: update.TrainState) -> None:
    """Saves `state` as `step` (once: a step already saved is not written again).

    Raises:
      TrainingError: the checkpoint cannot be written (disk full, permissions).
    """
    if self._manager.latest_step() == step:
      return
    try:
      self._manager.save(step, args=self._ocp.args.StandardSave(state), force=True)
      self._manager.wait_until_finished()
    except Exception as e:  # OSError, or orbax/tensorstore errors wrapping one.
      raise TrainingError(f"{self.directory}: cannot save the checkpoint of step {step} "
                          f"({_save_error_cause(e)}){_kept_checkpoints(self.directory, step)}"
                          ) from None


def _kept_checkpoints(directory: pathlib.Path, before_step: int | None = None) -> str:
  """What a run that failed leaves a rerun, as the end of its error line.

  Names the latest committed checkpoint in `directory` (below `before_step`: the one whose
  save failed is not), or says that none was written; nothing when `directory` cannot be
  listed, since then it is not known.
  """
  try:
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()]
  except (FileNotFoundError, NotADirectoryError):
    steps = []
  except OSError:
    return ""
  steps = [s for s in steps if before_step is None or s < before_step]
  if not steps:
    return "; no checkpoint was written"
  return (f"; the checkpoints written so far are kept (the latest: step {max(steps)}) and a "
          "rerun resumes from it")


def _bfloat16_memories(saved: dict, like: update.TrainState) -> set[str]:
  """Memories a checkpoint (`saved`: its memory metadata) holds as bfloat16 arrays where
  `like` holds their bits.

  Checkpoints from before "bfloat16" memories were kept as uint16 bits (`refresh.py`): orbax
  would convert their values, so they are restored as bfloat16 and reinterpreted.
  """
  return {key for key, value in like.memory.items()
          if value.dtype == jnp.uint16 and key in saved
          and str(getattr(saved[key], "dtype", "")) == "bfloat16"}


def _same_memory_slots(saved: dict, like: update.TrainState) -> bool:
  """Whether a checkpoint (`saved`: its memory metadata) has as many refresh memory slots as
  `like`.

  The slot count depends on the placement and the device count (`update.memory_slots`), and
  the padding slots are never read: a checkpoint with another count restores with them
  padded or truncated (not strict). Every other shape is fixed by the run's settings.
  """
  if not like.memory or not saved:
    return True  # Nothing to pad, or unreadable metadata: the strict restore says why.
  return all(getattr(saved.get(key), "shape", None) == value.shape
             for key, value in like.memory.items())


def _save_error_cause(error: Exception) -> str:
  """The cause of a failed checkpoint save in a few words ("no space left on device")."""
  if isinstance(error, OSError):
    return files.os_error_cause(error)
  # Orbax's tensorstore writer reports a system error as text: `... [os_error_code='28']`.
  code = re.search(r"os_error_code='?(\d+)", str(error))
  if code:
    return files.os_error_cause(OSError(int(code.group(1)), os.strerror(int(code.group(1)))))
  return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


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
                        + _kept_checkpoints(workdir / "checkpoints")) from None


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
  _claim_workdir(workdir, config, log, write=primary, run_dir=run_dir)
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
      config.model, update.make_optimizer(float(o.lr), float(o.b1), float(o.b2), float(o.eps)),
      jax.random.PRNGKey(int(config.seed)), dataset.num_patches, dataset.patch_size,
      cfg.refresh, teacher_params=teacher, precision=cfg.precision, mesh=mesh)
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
