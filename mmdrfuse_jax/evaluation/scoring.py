"""Scoring fused images against their sources, the way the published tables were computed.

Images are read as the field's common Python evaluator reads them (SPEC section 6,
`imageio.to_gray_evaluation`): an 8-bit file becomes float, colour becomes gray
`round(0.299 R + 0.587 G + 0.114 B)` computed in float32 with NumPy's rounding (half to
even), and a gray file gives its own values. 16-bit files are brought to the same 0..255
scale: gray `round(v / 257)` (65535 -> 255), colour `round(0.299 R + 0.587 G + 0.114 B)` of
the channels divided by 257, so their scores compare with 8-bit ones and the histogram
metrics keep 256 levels.

Undefined values: a metric without a finite value for an image (CC or SCD of a constant
image, a 0/0 correlation, which the field's evaluator also gives as NaN; PSNR of a fused
image whose maximum is 0 (-inf) or that equals both sources (+inf)) is *undefined* for that
image: `None` in the rows, an empty field in the per-image CSV, `null` in JSON. Means are
taken over the images where the metric is defined, and `EvaluationResult.undefined()` counts
the others; the printed tables show those counts. Finite values are never changed.

Compilation: images are placed top-left on zero canvases ("buckets") and scored with their
true size (see `metrics`), so a folder of many sizes compiles a handful of times, not once
per size. A bucket is shared when its area is at most `max_waste` times an image's own.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import os
import pathlib
from typing import Callable, Collection, Optional, Sequence

import jax
import numpy as np

from mmdrfuse_jax.evaluation import metrics
from mmdrfuse_jax.io import files, imageio
from mmdrfuse_jax.runtime import interrupts

ImageError = imageio.ImageError
FuseFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def read_for_evaluation(path: str | os.PathLike) -> np.ndarray:
  """Reads an image file as float32 gray (H, W) on 0..255 (SPEC 6).

  Raises:
    ImageError: the file is missing or unreadable.
  """
  return imageio.to_gray_evaluation(imageio.read_image(path))


@dataclasses.dataclass(frozen=True)
class Triple:
  """One image to score. `fused` is None when it is computed from the sources (`fuse_fn`)."""

  name: str
  ir: pathlib.Path
  vis: pathlib.Path
  fused: Optional[pathlib.Path] = None


@dataclasses.dataclass
class EvaluationResult:
  """Per-image scores and the problems of the images that could not be scored.

  Attributes:
    names: the metrics computed, in column order.
    rows: (image name, {metric: value}) in the order of the input triples; a value is None
      where the metric is undefined for that image (not finite, see the module docstring).
    problems: one-line messages naming the file and the problem.
    stopped_by: the signal number when a stop request ended the evaluation early (the rows
      then hold only the images scored before it), else None.
    fused: image name -> the fused image `fuse_fn` returned, for the names asked for with
      `evaluate(keep_fused=...)`.
  """

  names: tuple[str, ...]
  rows: list[tuple[str, dict[str, Optional[float]]]]
  problems: list[str]
  stopped_by: Optional[int] = None
  fused: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def means(self) -> dict[str, Optional[float]]:
    """Mean of every metric over the images where it is defined (None where there is none)."""
    means = {}
    for n in self.names:
      values = [v for _, r in self.rows if (v := r[n]) is not None]
      means[n] = float(np.mean(values)) if values else None
    return means

  def undefined(self) -> dict[str, int]:
    """For every metric, the number of scored images where it is undefined."""
    return {n: sum(r[n] is None for _, r in self.rows) for n in self.names}


def defined(value) -> Optional[float]:
  """A metric value as a float, or None when it is not finite (undefined)."""
  value = float(value)
  return value if math.isfinite(value) else None


def pair_triples(ir_dir, vis_dir, fused_dir=None) -> tuple[list[Triple], list[str]]:
  """Pairs the folders by file stem (fused first when given).

  Raises:
    ImageError: a folder is missing or holds no image.
  """
  if fused_dir is None:
    pairing = imageio.pair_folders([ir_dir, vis_dir])
    triples = [Triple(stem, ir, vis) for stem, (ir, vis) in pairing.pairs]
  else:
    pairing = imageio.pair_folders([fused_dir, ir_dir, vis_dir])
    triples = [Triple(stem, ir, vis, fused) for stem, (fused, ir, vis) in pairing.pairs]
  return triples, list(pairing.problems)


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def assign_buckets(sizes: Sequence[tuple[int, int]], *, multiple: int = 32,
                   max_waste: float = 3.0) -> list[tuple[int, int]]:
  """A canvas shape for each image size, sharing canvases to limit compilations.

  Larger images are placed first; an image joins an existing canvas that holds it when the
  canvas's area is at most `max_waste` times its own, else it opens a new canvas (its size
  rounded up to `multiple`). With `max_waste` <= 1 and `multiple` 1 every size is exact.
  """
  canvases: list[tuple[int, int]] = []
  chosen: dict[tuple[int, int], tuple[int, int]] = {}
  for h, w in sorted(set(sizes), key=lambda s: (-s[0] * s[1], s)):
    for ch, cw in canvases:
      if ch >= h and cw >= w and ch * cw <= max_waste * h * w:
        chosen[(h, w)] = (ch, cw)
        break
    else:
      canvas = (_round_up(h, multiple), _round_up(w, multiple))
      canvases.append(canvas)
      chosen[(h, w)] = canvas
  return [chosen[s] for s in sizes]


def _load(triple: Triple, fuse_fn: Optional[FuseFn], save_dir: Optional[pathlib.Path],
          problems: list[str], keep: Optional[dict[str, np.ndarray]] = None):
  """The triple's three float gray images; raises ImageError naming the file.

  A fused image that cannot be saved to `save_dir` is reported in `problems` and still scored.
  A fused image computed here is also put in `keep` (by name) when `keep` is given.
  """
  ir_raw = imageio.read_image(triple.ir)
  vis_raw = imageio.read_image(triple.vis)
  imageio.check_same_size([triple.ir, triple.vis], [ir_raw, vis_raw], ("infrared", "visible"))
  if triple.fused is not None:
    fused_raw = imageio.read_image(triple.fused)
    imageio.check_same_size([triple.fused, triple.ir, triple.vis], [fused_raw, ir_raw, vis_raw],
                            ("fused", "infrared", "visible"))
  else:
    if fuse_fn is None:
      raise TypeError(f"{triple.ir}: no fused image given and no fuse_fn to compute it")
    try:
      fused_raw = fuse_fn(ir_raw, vis_raw)
    except ValueError as e:
      raise ImageError(f"{triple.ir}: cannot fuse ({e})") from None
    if keep is not None:
      keep[triple.name] = fused_raw
    if save_dir is not None:
      path = save_dir / f"{triple.name}.png"
      try:
        imageio.write_image_atomic(path, fused_raw)
      except OSError as e:
        reason = ("a folder of that name is in the way" if path.is_dir()
                  else files.os_error_cause(e))
        problems.append(f"{path}: cannot save the fused image ({reason}); it is still scored")
  return tuple(imageio.to_gray_evaluation(raw) for raw in (fused_raw, ir_raw, vis_raw))


def evaluate(triples: Sequence[Triple], *, names: Sequence[str] = metrics.METRIC_NAMES,
             ssim_data_range: float = 2.0, mi_base: Optional[float] = None,
             fuse_fn: Optional[FuseFn] = None, save_fused: Optional[str | os.PathLike] = None,
             batch_size: int = 1, bucket_multiple: int = 32, max_waste: float = 3.0,
             progress: bool = False, stop: Optional[interrupts.StopRequest] = None,
             keep_fused: Collection[str] = ()) -> EvaluationResult:
  """Scores image triples; files that cannot be used are reported, the rest scored.

  Args:
    triples: the images; those without `fused` are fused with `fuse_fn(ir, vis)` (arrays as
      `imageio.read_image` returns them, returning the integer image that would be written).
    names: metrics to compute (see `metrics.ALL_NAMES`).
    ssim_data_range, mi_base: metric conventions (see `metrics.all_metrics`).
    fuse_fn: in-memory fusion for triples without a fused file.
    save_fused: folder where fused images from `fuse_fn` are also written (<name>.png).
    batch_size: images scored per call (the last batch is padded with a repeat); vmapped,
      or image by image for large canvases (see `metrics.all_metrics`).
    bucket_multiple, max_waste: canvas sharing (see `assign_buckets`).
    progress: show a tqdm progress bar.
    stop: checked before each batch; once its `signum` is set, the evaluation ends early
      (`EvaluationResult.stopped_by`).
    keep_fused: names of triples whose images `fuse_fn` computes are also returned, in
      `EvaluationResult.fused` (e.g. to show them without fusing them again).

  Returns:
    An EvaluationResult, rows in the order of `triples`; undefined values are None.
  """
  names = tuple(names)
  unknown = [n for n in names if n not in metrics.ALL_NAMES]
  if unknown:
    raise ValueError(f"unknown metrics {', '.join(unknown)}; "
                     f"choose from {', '.join(metrics.ALL_NAMES)}")
  save_dir = pathlib.Path(save_fused) if save_fused is not None else None
  problems: list[str] = []
  kept: dict[str, np.ndarray] = {}

  # Sizes from the file headers only, so that images are decoded one batch at a time.
  sized: list[tuple[Triple, tuple[int, int]]] = []
  for t in triples:
    try:
      size = imageio.read_size(t.ir)
    except ImageError as e:
      problems.append(str(e))
      continue
    if min(size) < metrics.MIN_SIZE:
      problems.append(f"{t.ir}: image of {size[1]}x{size[0]} pixels is too small to score "
                      f"(at least {metrics.MIN_SIZE}x{metrics.MIN_SIZE}, for VIF)")
      continue
    sized.append((t, size))
  canvases = assign_buckets([s for _, s in sized], multiple=bucket_multiple, max_waste=max_waste)
  groups: dict[tuple[int, int], list[Triple]] = {}
  for (t, _), canvas in zip(sized, canvases):
    groups.setdefault(canvas, []).append(t)

  # Each metric of metrics.all_metrics is compiled with these as static arguments: one
  # compile per canvas shape.
  fn = functools.partial(metrics.all_metrics, names=names, ssim_data_range=float(ssim_data_range),
                         mi_base=mi_base)
  scores: dict[str, dict[str, Optional[float]]] = {}
  stopped_by = None
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(sized), unit="image", desc="evaluating")
  try:
    for (ch, cw), group in groups.items():
      for start in range(0, len(group), batch_size):
        if stop is not None and stop.signum is not None:
          stopped_by = stop.signum
          break
        batch, arrays = [], []
        for t in group[start:start + batch_size]:
          try:
            images = _load(t, fuse_fn, save_dir, problems,
                           kept if t.name in keep_fused else None)
          except ImageError as e:
            problems.append(str(e))
          else:
            if images[0].shape[0] > ch or images[0].shape[1] > cw:
              problems.append(f"{t.ir}: header and pixel sizes disagree")
            else:
              batch.append(t)
              arrays.append(images)
          if bar is not None:
            bar.update(1)
        if not batch:
          continue
        stacks = [np.zeros((batch_size, ch, cw), np.float32) for _ in range(3)]
        sizes = np.zeros((batch_size, 2), np.int32)
        for i in range(batch_size):
          images = arrays[min(i, len(arrays) - 1)]
          h, w = images[0].shape
          for stack, image in zip(stacks, images):
            stack[i, :h, :w] = image
          sizes[i] = (h, w)
        fused_stack, ir_stack, vis_stack = stacks
        if batch_size == 1:  # the unbatched program is faster than a vmap over one image
          out = jax.device_get(fn(fused_stack[0], ir_stack[0], vis_stack[0], sizes[0]))
          out = {k: v[None] for k, v in out.items()}
        else:
          out = jax.device_get(fn(fused_stack, ir_stack, vis_stack, sizes))
        for i, t in enumerate(batch):
          scores[t.name] = {n: defined(out[n][i]) for n in names}
      if stopped_by is not None:
        break
  finally:
    if bar is not None:
      bar.close()
  rows = [(t.name, scores[t.name]) for t, _ in sized if t.name in scores]
  return EvaluationResult(names=names, rows=rows, problems=problems, stopped_by=stopped_by,
                          fused=kept)


# ---------------------------------------------------------------------------------------------
# Output.


def _field(value: Optional[float], fmt: str = ".6f") -> str:
  """A value for CSV output: empty where undefined."""
  return "" if value is None else format(value, fmt)


def write_csv_atomic(path: str | os.PathLike, result: EvaluationResult) -> None:
  """Writes `name,<metrics...>` per image through a temporary file, then renames.

  Undefined values are empty fields.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with files.atomic_write(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("name",) + result.names)
    for name, row in result.rows:
      writer.writerow([name] + [_field(row[n]) for n in result.names])


def format_means(result: EvaluationResult, fmt: str = "table", label: str = "mean") -> str:
  """The mean scores in the papers' layout (one row, metrics as columns).

  Means are over the images where each metric is defined. When a metric is undefined for
  some image, a second row (label "undefined") gives the number of such images per metric;
  a metric undefined for every image has no mean ("n/a"; an empty CSV field).

  Args:
    fmt: "table" (aligned text, 2 decimals as in the papers), "markdown", "csv" or "json"
      (the last two at full precision). JSON is always valid JSON:
      `{"images": n, "means": {...}, "undefined": {...}}`, `null` for a missing mean.
  """
  means = result.means()
  undefined = result.undefined()
  n = len(result.rows)
  if fmt == "json":
    return json.dumps({"images": n, "means": means, "undefined": undefined}, sort_keys=False,
                      allow_nan=False)
  extra = any(undefined.values())
  if fmt == "csv":
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("name",) + result.names)
    writer.writerow([label] + [_field(means[k]) for k in result.names])
    if extra:
      writer.writerow(["undefined"] + [undefined[k] for k in result.names])
    return buf.getvalue().rstrip("\n")
  head = [""] + list(result.names)
  rows = [[f"{label} ({n} images)"] + ["n/a" if means[k] is None else f"{means[k]:.2f}"
                                       for k in result.names]]
  if extra:
    rows.append(["undefined (images)"] + [str(undefined[k]) for k in result.names])
  if fmt == "markdown":
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(vals) + " |" for vals in rows])
  if fmt != "table":
    raise ValueError(f"unknown format {fmt!r}; choose table, markdown, csv or json")
  widths = [max(len(c) for c in column) for column in zip(head, *rows)]

  def line(cells):
    return "  ".join(c.rjust(wd) if i else c.ljust(wd)
                     for i, (c, wd) in enumerate(zip(cells, widths)))

  return "\n".join(line(cells) for cells in [head] + rows)


FORMATS = ("table", "markdown", "csv", "json")


def parse_metric_names(text: Optional[str], *,
                       choices: Sequence[str] = metrics.ALL_NAMES) -> tuple[str, ...]:
  """'EN,SD,...' (case-insensitive) -> canonical names; None -> all published metrics.

  `choices`: the names allowed (default: every metric `all_metrics` computes; a training
  run's validation also logs diagnostics such as DeadUnits).
  """
  if not text:
    return metrics.METRIC_NAMES
  canon = {n.lower(): n for n in choices}
  out = []
  for part in text.split(","):
    key = part.strip().lower()
    if key not in canon:
      raise ValueError(f"unknown metric {part.strip()!r}; "
                       f"choose from {', '.join(choices)}")
    if canon[key] not in out:
      out.append(canon[key])
  return tuple(out)
