"""Ablation grids: runs that differ in a few settings, trained alike, and one table of them.

A grid file has `get_grid()`, which returns {row name: config} (for example
`configs/ablation_multidomain.py`, the grid behind docs/domains.md). `run_grid` trains the
rows one after another, each in `WORKDIR/<row>` as `bin/train.py` would, and after each row
rewrites `WORKDIR/ablation.json` and `WORKDIR/ablation.md`: for every row, the settings in
which it differs from the first row, its last validation's scores, the best score of the
first metric with its step, the steps it trained and the wall time of its training.

A rerun with the same WORKDIR resumes: finished rows are summarised again without training,
an interrupted row continues from its checkpoint, and the wall times add up. The scores are
those of each run's own validation (`config.validation`): give every row the same pairs
(`validation.ir_dir`/`vis_dir`, or `split="holdout"` with the same `validation.datasets`)
and the same number of steps, or the table compares unlike things; `run_grid` warns where
the rows' step counts differ.

Rows that keep their teacher's targets (`config.teacher_cache`, on a CPU) share them in
`WORKDIR/teacher_targets` unless they name another `teacher_cache_dir`: rows on the same
patches and teacher compute them once between them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from mmdrfuse_jax.evaluation import curves
from mmdrfuse_jax.io import files
from mmdrfuse_jax.train import loop, stages, validation
from mmdrfuse_jax.train.run_spec import ConfigError, RunSpec, flatten

SUMMARY_JSON = "ablation.json"
SUMMARY_MD = "ablation.md"
TEACHER_TARGETS = "teacher_targets"
_SCHEMA = 1


@dataclasses.dataclass(frozen=True)
class RowResult:
  """One row of the table.

  Attributes:
    name: the row's name (its folder under the grid's workdir).
    changes: the settings in which the row's config differs from the first row's (dotted
      keys; the first row's own are empty).
    step: the last validated step, or None where the run has no validation yet.
    scores: the metric means of that validation.
    best: metric -> (step, value) of its best validation (smaller is better for the scores
      in `validation.LOWER_IS_BETTER`: Floor, DeadUnits, ...).
    finished: whether the run trained all its steps.
    wall_s: seconds spent training the row, summed over the invocations that trained it.
  """

  name: str
  changes: dict[str, Any]
  step: int | None
  scores: dict[str, float]
  best: dict[str, tuple[int, float]]
  finished: bool
  wall_s: float


@dataclasses.dataclass(frozen=True)
class GridResult:
  """What `run_grid` did: the rows summarised so far, and the signal that stopped it, if any."""

  rows: list[RowResult]
  interrupted_by: int | None = None


def config_changes(base: ml_collections.ConfigDict,
                   config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The settings of `config` that differ from (or are not in) `base`, as dotted keys."""
  base_flat, flat = flatten(base), flatten(config)
  return {k: v for k, v in sorted(flat.items()) if k not in base_flat or base_flat[k] != v}


def summarize(name: str, changes: Mapping[str, Any], run_dir: pathlib.Path, *, finished: bool,
              wall_s: float) -> RowResult:
  """A row's result from what its run wrote (`metrics.jsonl`); no validation yet: no scores."""
  try:
    by_metric = curves.read_validation(run_dir)
  except curves.CurvesError:
    by_metric = {}
  step = max((c[-1][0] for c in by_metric.values() if c), default=None)
  scores = {m: dict(c)[step] for m, c in by_metric.items() if step is not None and step in dict(c)}
  best = {}
  for metric, curve in by_metric.items():
    pick = min if metric in validation.LOWER_IS_BETTER else max
    best_step, best_value = pick(curve, key=lambda point: point[1])
    best[metric] = (best_step, best_value)
  return RowResult(name=name, changes=dict(changes), step=step, scores=scores, best=best,
                   finished=finished, wall_s=wall_s)


def to_markdown(results: Sequence[RowResult], *, device: str, date: str,
                order: Sequence[str] = ()) -> str:
  """The table: a row per run, its changes, last validation, best first metric, wall time.

  Args:
    results: the rows.
    device: what they trained on.
    date: when.
    order: metrics in the order of their columns (the config's validation metrics); the
      first one's best is shown too. Others the runs logged (`DeadUnits`) follow, by name.
  """
  logged = sorted({m for r in results for m in r.scores})
  names = [m for m in order if m in logged] + [m for m in logged if m not in order]
  lead = names[0] if names else None
  head = ["Row", "Changes against the first row", "Step", *names]
  if lead:
    head.append(f"Best {lead} (step)")
  head.append("Wall")
  lines = [f"Ablation on {device}, {date}. Scores: each run's last validation.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    changes = ", ".join(f"`{k}={_text(v)}`" for k, v in r.changes.items()) or "(first row)"
    cells = [r.name, changes, "" if r.step is None else f"{r.step:,}"]
    cells += [_number(r.scores[m]) if m in r.scores else "" for m in names]
    if lead:
      cells.append(f"{_number(r.best[lead][1])} ({r.best[lead][0]:,})" if lead in r.best else "")
    wall = f"{r.wall_s / 60:.1f} min" if r.wall_s else ""
    cells.append(wall if r.finished else f"{wall} (unfinished)".strip())
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def run_grid(rows: Mapping[str, ml_collections.ConfigDict], workdir: str | pathlib.Path, *,
             device: str, train: Sequence[str] | None = None,
             stop_at_step: int | None = None,
             log: Callable[[str], None] = print) -> GridResult:
  """Trains rows in `workdir/<row>` (resuming), rewriting the table after each.

  Args:
    rows: the whole grid, {row name: config}, in order; the first is the one the others are
      compared with.
    workdir: the grid's folder.
    device: what the rows train on, named in the table ("cpu (2 cores)", "cuda: NVIDIA H200").
    train: the rows to train now (default: all). The table also holds the other rows that
      have a folder, from what they wrote earlier.
    stop_at_step: train each row up to this step only (with a checkpoint, resumable): rows
      compared at equal steps in less time. Their wall times then say "unfinished".
    log: where progress lines go (each run's own log lines too).

  Returns:
    The table's rows (also written to `workdir/ablation.json` and `ablation.md`), and the
    signal that stopped a row, if one did (the rows after it did not start).

  Raises:
    run_spec.ConfigError: a row's settings are not valid (every row's are checked before any
      row trains, so that a mistake in the last row does not waste the first ones).
    loop.TrainingError: a row cannot run.
  """
  workdir = pathlib.Path(workdir).expanduser()
  if not rows:
    raise loop.TrainingError("the grid has no rows")
  # Rows that keep their teacher's targets share them in the grid's folder unless they name
  # their own (copies: the caller's rows stay as given).
  shared_targets = str(workdir / TEACHER_TARGETS)
  rows = dict(rows)
  for name, config in rows.items():
    if "teacher_cache_dir" in config and not config.teacher_cache_dir:
      rows[name] = copy.deepcopy(config)
      rows[name].teacher_cache_dir = shared_targets
  names = list(rows)
  base = rows[names[0]]
  to_train = names if train is None else [n for n in names if n in set(train)]
  plans = {name: stages.plan(rows[name], workdir / name) for name in names}
  # Every row's settings, before any work; the first row's too, whose validation names the
  # table's columns.
  for name in [n for n in names if n in set(to_train) or n == names[0]]:
    plan = plans[name]
    for stage in plan:
      try:
        RunSpec.from_config(stage.config)
      except ConfigError as e:
        raise ConfigError(f"row {name}: {e}") from None
  order = RunSpec.from_config(plans[names[0]][-1].config).validation.names
  walls = _earlier_walls(workdir)
  results: dict[str, RowResult] = {}
  for name in names:  # Rows trained earlier, as they are now.
    run_dir = plans[name][-1].workdir  # The last stage's run holds the validations.
    if name not in to_train and run_dir.is_dir():
      model = str(plans[name][-1].config.model)
      results[name] = summarize(name, config_changes(base, rows[name]), run_dir,
                                finished=(run_dir / f"{model}.npz").is_file(),
                                wall_s=walls.get(name, 0.0))
  interrupted_by = None
  for number, name in enumerate(to_train, 1):
    config = rows[name]
    run_dir = plans[name][-1].workdir
    log(f"== row {number}/{len(to_train)}: {name}")
    start = time.perf_counter()
    result = stages.run(config, workdir / name, log=log, stop_at_step=stop_at_step)
    walls[name] = walls.get(name, 0.0) + time.perf_counter() - start
    finished = result.weights is not None and result.step == result.total_steps
    results[name] = summarize(name, config_changes(base, config), run_dir, finished=finished,
                              wall_s=walls[name])
    _write(workdir, [results[n] for n in names if n in results], device, order)
    if result.interrupted_by is not None:
      interrupted_by = result.interrupted_by
      log(f"stopped in row {name}; rerun the same command to go on")
      break
  steps = {r.step for r in results.values() if r.finished}
  if len(steps) > 1:
    log("warning: the finished rows end at different steps "
        f"({', '.join(f'{r.name}: {r.step}' for r in results.values() if r.finished)}); "
        "compare them at equal steps")
  return GridResult([results[n] for n in names if n in results], interrupted_by)


def _earlier_walls(workdir: pathlib.Path) -> dict[str, float]:
  """Each row's training seconds from an earlier invocation's summary (none: empty)."""
  try:
    earlier = json.loads((workdir / SUMMARY_JSON).read_text(encoding="utf-8"))
    return {row["name"]: float(row["wall_s"]) for row in earlier["rows"]}
  except (OSError, ValueError, KeyError, TypeError):
    return {}


def _write(workdir: pathlib.Path, results: Sequence[RowResult], device: str,
           order: Sequence[str]) -> None:
  date = time.strftime("%Y-%m-%d")
  payload = {"schema": _SCHEMA, "device": device, "date": date,
             "rows": [dataclasses.asdict(r) for r in results]}
  with files.atomic_write(workdir / SUMMARY_JSON, "w", encoding="utf-8") as f:
    f.write(json.dumps(payload, indent=1, default=str) + "\n")
  with files.atomic_write(workdir / SUMMARY_MD, "w", encoding="utf-8") as f:
    f.write(to_markdown(results, device=device, date=date, order=order))


def _number(value: float) -> str:
  if not math.isfinite(value):
    return str(value)
  return f"{value:.3g}" if abs(value) < 1e-3 and value else f"{value:.3f}"


def _text(value: Any) -> str:
  return json.dumps(value) if not isinstance(value, str) else value
