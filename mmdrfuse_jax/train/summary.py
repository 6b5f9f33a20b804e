"""Training logs: TensorBoard event files (through tensorboardX) and a JSON-lines copy.

`tensorboardX` writes TensorBoard's event files without TensorFlow; `tensorboard --logdir
WORKDIR` reads them. Every logged row is also appended to `WORKDIR/metrics.jsonl` for scripts.
`format_metrics` is the one-line console form of a row.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Mapping

import numpy as np
import tensorboardX

from mmdrfuse_jax.io import files

# The loss terms in the order the console line shows them.
_CONSOLE_TERMS = ("l_int", "l_percep", "l_grad", "l_distill", "l_refresh", "l_alive")


class MetricWriter:
  """Scalars to TensorBoard and `metrics.jsonl`; the run's config as TensorBoard text.

  Args:
    logdir: the run's working directory.
    purge_after_step: for a run resumed from this step's checkpoint: rows of later steps,
      logged before the interruption, are dropped from `metrics.jsonl` and hidden from
      TensorBoard (its `purge_step`), since the resumed run logs those steps again.
  """

  def __init__(self, logdir: str | os.PathLike, purge_after_step: int | None = None):
    logdir = pathlib.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    jsonl = logdir / "metrics.jsonl"
    purge_step = None
    if purge_after_step is not None:
      purge_step = purge_after_step + 1
      _drop_rows_after(jsonl, purge_after_step)
    self._events = tensorboardX.SummaryWriter(logdir=str(logdir), purge_step=purge_step)
    self._jsonl_path = jsonl
    self._jsonl = open(jsonl, "a", encoding="utf-8")

  def config(self, config_json: str) -> None:
    """Records the run's config (JSON text), shown under TensorBoard's Text tab."""
    # Indented by four spaces: TensorBoard renders text as Markdown, this keeps it verbatim.
    self._events.add_text("config", "\n".join("    " + line for line in config_json.splitlines()))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    """Logs `values` (tag -> number) at `step`."""
    values = {k: float(v) for k, v in values.items()}
    for tag, value in values.items():
      self._events.add_scalar(tag, value, global_step=int(step))
    self._jsonl.write(json.dumps({"step": int(step), **values}, sort_keys=True) + "\n")

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Logs images (tag -> uint8 (H, W) gray or (H, W, 3) RGB) at `step` (TensorBoard only)."""
    for tag, image in images.items():
      self._events.add_image(tag, image, global_step=int(step),
                             dataformats="HW" if image.ndim == 2 else "HWC")

  def flush(self) -> None:
    """Writes what was logged to disk.

    Raises:
      OSError: naming `metrics.jsonl` or the event file (a full disk, for example).
    """
    self._events.flush()
    try:
      self._jsonl.flush()
    except OSError as e:  # The buffered file's error names no file.
      raise OSError(e.errno, e.strerror, str(self._jsonl_path)) from None

  def close(self) -> None:
    """Closes both outputs, even when the first fails; then raises the first error."""
    errors = []
    for part in (self._events, self._jsonl):
      try:
        part.close()
      except OSError as e:
        errors.append(e)
    if errors:
      first = errors[0]
      raise OSError(first.errno, first.strerror, first.filename or str(self._jsonl_path))


class NullWriter:
  """A `MetricWriter` that writes nothing: for every process but process 0 of a multi-process
  run, since process 0 alone writes the logs."""

  def config(self, config_json: str) -> None:
    del config_json

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    del step, values

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    del step, images

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def _drop_rows_after(jsonl: pathlib.Path, step: int) -> None:
  """Rewrites `jsonl` (atomically) without the rows of steps after `step`."""
  if not jsonl.is_file():
    return
  lines = jsonl.read_text(encoding="utf-8").splitlines(keepends=True)
  kept = [line for line in lines if _row_step(line) <= step]
  if len(kept) != len(lines):
    with files.atomic_write(jsonl, "w", encoding="utf-8") as f:
      f.writelines(kept)


def _row_step(line: str) -> float:
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return float("inf")  # A torn last line (the process was killed while writing): drop it.


def format_metrics(step: int, total: int, m: Mapping[str, float]) -> str:
  """A logged row as one console line: loss terms, refresh statistics, skipped steps."""
  terms = " ".join(f"{k[2:]} {m[k]:.4g}" for k in _CONSOLE_TERMS if k in m)
  parts = [f"step {step}/{total}", f"loss {m['loss']:.4g}", terms]
  kinds = sorted(k[len("refresh/"):-len("_gap")] for k in m
                 if k.startswith("refresh/") and k.endswith("_gap"))
  for name in kinds:
    parts.append(f"{name}: refreshed {m[f'refresh/{name}_refreshed']:.0%} "
                 f"loss-on {m[f'refresh/{name}_loss_on']:.0%} gap {m[f'refresh/{name}_gap']:+.3g}")
  if m.get("nonfinite", 0) > 0:
    parts.append(f"non-finite steps skipped {m['nonfinite']:.0%}")
  return " | ".join(parts)
