"""Validation metrics against training steps, for one run or several, as one SVG figure.

A run's validations (`config.validation`) are the `val/<metric>` rows of its
`WORKDIR/metrics.jsonl`. `read_validation` collects them; `plot` draws one panel per metric,
a line per run, and optional horizontal lines for reference scores (say, the published
student scored on the same pairs). matplotlib is imported only in `plot` (the `report`
extra).
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
from typing import Mapping, Sequence

from mmdrfuse_jax.errors import MMDRFuseError
from mmdrfuse_jax.io import files

Curve = list[tuple[int, float]]  # (step, value), by step


class CurvesError(MMDRFuseError, ValueError):
  """A run folder or a reference cannot be used; the message names it."""


def read_validation(workdir: str | os.PathLike) -> dict[str, Curve]:
  """The run's validation scores, metric -> [(step, value)] sorted by step.

  A step validated twice (rows of a resumed run) keeps its last row. Values that are not
  finite (a diverged run logs NaN) are left out of the curves.

  Raises:
    CurvesError: no `metrics.jsonl`, a file that is not UTF-8 text or holds a row that is not
      a metrics row (a step that is not a finite whole number), or no finite validation score.
  """
  path = pathlib.Path(workdir) / "metrics.jsonl"
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except OSError as e:
    raise CurvesError(f"{path}: cannot be read ({files.os_error_cause(e)})") from None
  except UnicodeDecodeError as e:
    raise CurvesError(f"{path}: not UTF-8 text (byte {e.start}); not a metrics log") from None
  by_metric: dict[str, dict[int, float]] = {}
  validated = False
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      step = row["step"]
      if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
        raise ValueError(step)
      step = int(step)
    except (ValueError, KeyError, TypeError, OverflowError):
      raise CurvesError(f"{path}, line {number}: not a metrics row") from None
    for key, value in row.items():
      if key.startswith("val/") and key != "val/seconds" and isinstance(value, (int, float)):
        validated = True
        if math.isfinite(value):
          by_metric.setdefault(key[len("val/"):], {})[step] = float(value)
  if not by_metric:
    if validated:
      raise CurvesError(f"{path}: holds no finite validation scores (every one is NaN or "
                        "infinite: did the run diverge?)")
    raise CurvesError(f"{path}: holds no validation scores (was config.validation set?)")
  return {name: sorted(points.items()) for name, points in by_metric.items()}


def run_files(workdir: str | os.PathLike) -> list[tuple[str, pathlib.Path]]:
  """The entries of a run folder, as (label, path) inputs for `files.refuse_overwrites`.

  A plot written over any of them (`metrics.jsonl`, `run.json`, weights, checkpoints) would
  destroy the run, so none may be an output.
  """
  folder = pathlib.Path(workdir)
  entries = sorted(folder.iterdir()) if folder.is_dir() else []
  return [("run folder", folder)] + [(f"run's own {p.name}", p) for p in entries]


def parse_reference(spec: str) -> tuple[str, dict[str, float]]:
  """`NAME=METRIC:VALUE,METRIC:VALUE` -> (NAME, {METRIC: VALUE}).

  Raises:
    CurvesError: the spec does not have that form.
  """
  error = CurvesError(f"--reference {spec!r}: expected NAME=METRIC:VALUE[,METRIC:VALUE...]")
  name, sep, scores = spec.partition("=")
  if not name.strip() or not sep:
    raise error
  parsed = {}
  for item in scores.split(","):
    metric, _, value = item.partition(":")
    try:
      parsed[metric.strip()] = float(value)
    except ValueError:
      raise error from None
    if not metric.strip():
      raise error
  return name.strip(), parsed


def plot(runs: Mapping[str, Mapping[str, Curve]], metrics: Sequence[str], *,
         references: Mapping[str, Mapping[str, float]] | None = None,
         title: str = "") -> bytes:
  """An SVG figure: one panel per metric, the runs' curves and the references' levels.

  Args:
    runs: run name -> `read_validation` of it.
    metrics: the panels, in order (a run without a metric has no line in its panel).
    references: name -> {metric: value}, drawn as dashed horizontal lines.
    title: the figure's title.

  Returns:
    The SVG file's bytes (no date in it: the same scores give the same file).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_svg import FigureCanvasSVG  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  references = references or {}
  fig = Figure(figsize=(3.4 * len(metrics), 3.0), dpi=100, layout="constrained")
  FigureCanvasSVG(fig)
  axes = fig.subplots(1, len(metrics), squeeze=False)[0]
  colors = [f"C{k}" for k in range(10)]
  for ax, metric in zip(axes, metrics):
    for k, (name, curves) in enumerate(runs.items()):
      points = curves.get(metric)
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, "o-", ms=3, lw=1.4, color=colors[k % 10], label=name)
    for k, (name, scores) in enumerate(references.items()):
      if metric in scores:
        ax.axhline(scores[metric], ls="--", lw=1.2, color=f"C{(len(runs) + k) % 10}",
                   label=name)
    ax.set_title(metric, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  for ax in axes[1:]:  # a run may lack the first panel's metric
    for h, label in zip(*ax.get_legend_handles_labels()):
      if label not in labels:
        handles.append(h)
        labels.append(label)
  fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4),
             fontsize=8, frameon=False)
  if title:
    fig.suptitle(title, fontsize=11)
  buf = io.BytesIO()
  with matplotlib.rc_context({"svg.hashsalt": "mmdrfuse"}):  # element ids: fixed, not random
    fig.savefig(buf, format="svg", metadata={"Date": None})
  return buf.getvalue()


def write(path: str | os.PathLike, svg: bytes) -> None:
  """Writes the figure through a temporary file, then renames."""
  with files.atomic_write(path, "wb") as f:
    f.write(svg)
