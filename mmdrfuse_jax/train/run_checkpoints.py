"""The run's orbax checkpoints (`WORKDIR/checkpoints`): save, restore, skip damaged ones.

The layout is documented in docs/train.md ("Reading a checkpoint without this project").
"""

from __future__ import annotations

import os
import pathlib
import re
import time
from typing import Callable

import jax
import jax.numpy as jnp

from mmdrfuse_jax.io import files
from mmdrfuse_jax.train import distributed, refresh, update
from mmdrfuse_jax.train.run_spec import TrainingError


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
                          f"({_save_error_cause(e)}){kept_checkpoints(self.directory, step)}"
                          ) from None

def kept_checkpoints(directory: pathlib.Path, before_step: int | None = None) -> str:
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
