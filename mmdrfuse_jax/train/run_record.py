"""The run record (`WORKDIR/run.json`): which run a workdir belongs to.

A workdir belongs to one run: `claim_workdir` records the settings that shape it
(`IDENTITY_KEYS`) and refuses a rerun with others, naming each difference; `num_epochs` may
grow, and `start_fresh` moves the earlier run aside. Paths inside the run's folder are kept
relative to the workdir (format 2), so that a run may be moved or copied. A setting added to
the config after a run was recorded is taken, for that run, at the value that gives what the
run did before it existed (`ADDED_SETTINGS`), so that older runs still resume.

It reads the run's flattened settings (`run_spec.RunSpec.settings`), never the config.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Mapping

from mmdrfuse_jax.io import files
from mmdrfuse_jax.train.run_spec import TrainingError, flatten

# The settings that shape a run: checkpoints, the data order and the refresh memories depend
# on them, so a rerun in the same workdir must keep them. The others (logging, checkpoint
# frequency, progress bar, teacher cache, precision, validation) may change between reruns, and
# `num_epochs` may grow (the run continues); `start_fresh=True` moves the old run aside and
# starts over.
IDENTITY_KEYS = ("model", "seed", "data", "batch_size", "optim", "init", "loss", "refresh",
                 "vgg_weights", "allow_random_vgg", "random_vgg_seed", "teacher_weights")

# Under the keys above but free to change: where the refresh memories live and whether the
# patches are streamed change no result, and checkpoints of every placement restore into each
# other (`RunCheckpoints.restore_latest`).
NOT_IDENTITY = ("refresh.placement", "data.streaming")

# Settings that name a file or folder. In the run record one inside the run's folder is kept
# relative to the workdir, so that the run may be moved or copied (`claim_workdir`).
PATH_KEYS = ("data.data_dir", "vgg_weights", "teacher_weights")

# Settings under `IDENTITY_KEYS` added after run records began, each with the value that does
# what the versions before it did. A record without one (a run of such a version) holds that
# value: its run resumes under settings that keep it, and one that sets another is refused
# like any other change. These are facts about older versions, fixed for good: should a
# default in configs/default.py change, these stay (they are today's defaults, which keep the
# published recipe). A setting added from now on gets its entry here.
ADDED_SETTINGS: Mapping[str, Any] = {
    "data.holdout": 0.0,  # Everything trained.
    "data.augment.enabled": False,  # No augmentation: its spreads were not read.
    "data.augment.exposure": 1.0,
    "data.augment.gamma": 0.5,
    "data.augment.contrast": 0.3,
    "data.augment.per_patch": False,  # Drawn per epoch, step and row.
    "data.weights": "",  # One dataset, or in proportion to the patches.
    "optim.schedule": "constant",
    "optim.warmup_steps": 0,
    "optim.final_lr_fraction": 0.0,
    "init.conv1_bias": 0.0,  # Flax's default.
    "loss.perception": "vgg",
    "loss.w_alive": 0.0,  # No such term.
    "loss.alive_margin": 0.05,
}

# The run record's format: 2 keeps `PATH_KEYS` inside the run's folder relative to the workdir;
# records without one (older versions) hold them as given.
_RECORD_FORMAT = 2

def run_identity(settings: Mapping[str, Any]) -> dict[str, Any]:
  """The settings that a rerun in the same workdir must keep (dotted keys).

  Args:
    settings: a run's flattened settings (`RunSpec.settings` as a dict; a nested mapping, a
      config say, is flattened first).
  """
  return {k: v for k, v in flatten(dict(settings)).items()
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
  which also matches a path given exactly as it was). A setting the record lacks counts as
  its `ADDED_SETTINGS` value.
  """
  before = {**{k: v for k, v in ADDED_SETTINGS.items() if k in identity}, **before}
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

def claim_workdir(workdir: pathlib.Path, settings: Mapping[str, Any], start_fresh: bool,
                  log: Callable[[str], None], write: bool = True,
                  run_dir: pathlib.Path | None = None) -> None:
  """Records the run's settings in `workdir/run.json`, or checks a rerun keeps them.

  `settings` are the run's flattened settings (`RunSpec.settings` as a dict), of which the
  record keeps the identity (`run_identity`); `start_fresh` moves an earlier run aside.

  A run is held to its settings once it has a checkpoint; a run that stopped before its
  first one (a missing weights file, say) may be rerun with corrected settings. With
  `write=False` (every process but process 0 of a multi-process run) only the check is made:
  process 0 records the settings and moves an earlier run aside.

  Paths of the settings (`PATH_KEYS`) inside `run_dir` (default: `workdir`) are recorded
  relative to `workdir`, so that the run resumes once moved or copied as a whole (`run_dir`
  with it); an older version's record, which holds them as given, is read and, once the
  rerun is found to keep its settings, rewritten so; so is a record that lacks settings
  added since (`ADDED_SETTINGS`).

  Raises:
    TrainingError: the workdir holds a run with other settings.
  """
  if not write and start_fresh:
    return  # Process 0 moves the earlier run aside: nothing of it is to be checked.
  record = workdir / "run.json"
  identity = run_identity(settings)
  trained = (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir())
  if start_fresh and any(workdir.iterdir()):
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
    if not legacy and set(identity) <= set(before):
      return  # The record says all; else it is rewritten with the settings added since.
  elif trained and not record.is_file():
    log(f"warning: {workdir} has checkpoints but no run record (an older version's run); "
        "resuming without checking its settings")
  if not write:
    return
  recorded = _recorded_identity(identity, workdir, run_dir or workdir)
  with files.atomic_write(record, "w") as f:
    f.write(json.dumps({"format": _RECORD_FORMAT, "identity": recorded}, indent=2,
                       sort_keys=True, default=str) + "\n")
