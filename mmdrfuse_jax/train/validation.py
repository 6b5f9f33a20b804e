"""Validation during training: fuse held-out pairs with the current parameters and score them.

`config.validation` (configs/default.py; read and checked into the run spec's
`run_spec.ValidationSpec`) names the pairs: two folders paired by stem, a split of the run's
built dataset (for example "test"), or the package's procedural pairs. Every
`every_steps` steps and at the end of training the run fuses them at full size exactly as
`bin/fuse.py` would (`fusion.Fuser`, min-max output) and scores them with the code of
`bin/evaluate.py` (`scoring.evaluate`, the published conventions). The means go to
TensorBoard and `metrics.jsonl` as `val/<metric>`, a few pairs go to TensorBoard as
infrared | visible | fused strips, and with `best_metric` the parameters of the best
validation so far are kept (`BestParams`).

Pairs that are not files (a dataset split, procedural pairs) are written once as PNG files to
`WORKDIR/validation_pairs/`, so that every source goes through the same file-based code as
`bin/evaluate.py`, and so that one can look at them.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from mmdrfuse_jax.errors import MMDRFuseError
from mmdrfuse_jax.evaluation import diagnostics, metrics, scoring
from mmdrfuse_jax.inference import fusion
from mmdrfuse_jax.io import imageio
from mmdrfuse_jax.models import networks, weight_files
from mmdrfuse_jax.train.run_spec import DataSpec, ValidationSpec

# The student's dead-unit share (`diagnostics.dead_unit_share`), logged beside the metrics.
DEAD_UNITS = "DeadUnits"
# Scores for which a smaller value is better (for `best_metric`, and for the best validation
# `train.ablation` tables); all others: larger.
LOWER_IS_BETTER = metrics.LOWER_IS_BETTER | {DEAD_UNITS}
# How the fused images of a validation are written: min-max stretched, as published.
OUTPUT = "minmax"


class ValidationError(MMDRFuseError, ValueError):
  """A user-facing problem with the validation pairs (one-line message)."""


def prepare_pairs(s: ValidationSpec, data: DataSpec, seed: int, workdir: pathlib.Path,
                  log: Callable[[str], None]) -> list[scoring.Triple]:
  """The validation pairs as files, sorted by stem, at most `max_pairs` of them.

  Args:
    s: the run's validation settings.
    data: the run's training data (a split of its built dataset, or the procedural pairs
      after its own).
    seed: the run's seed (of the procedural pairs).
    workdir: the run's folder (a split's or procedural pairs are written there).
    log: where warnings go.

  Raises:
    ValidationError: a folder is missing or holds no pair; the split is not built.
  """
  limit = s.max_pairs or None
  if s.source == "folders":
    try:
      triples, problems = scoring.pair_triples(os.path.expanduser(s.ir_dir),
                                                  os.path.expanduser(s.vis_dir))
    except imageio.ImageError as e:
      raise ValidationError(f"validation pairs: {e}") from None
    for problem in problems[:5]:
      log(f"warning: validation pairs: {problem}")
    if len(problems) > 5:
      log(f"warning: validation pairs: {len(problems) - 5} more problems")
  else:
    stems, irs, viss = _generated_pairs(s, data, seed, limit)
    folder = workdir / "validation_pairs"
    for stem, ir, vis in zip(stems, irs, viss):
      for sub, image in (("ir", ir), ("vi", vis)):
        path = folder / sub / f"{stem}.png"
        if not path.is_file():  # Written once; the pairs are fixed for the run.
          imageio.write_image_atomic(path, image)
    triples, _ = scoring.pair_triples(folder / "ir", folder / "vi")
    triples = [t for t in triples if t.name in set(stems)]
  usable = []
  for t in sorted(triples, key=lambda t: t.name)[:limit]:
    try:
      height, width = imageio.read_size(t.ir)
    except imageio.ImageError as e:
      log(f"warning: validation pairs: {e}; left out")
      continue
    if min(height, width) < metrics.MIN_SIZE:  # VIF's smallest image; evaluate refuses it.
      log(f"warning: validation pairs: {t.ir}: {width}x{height} pixels is too small to score "
          f"(at least {metrics.MIN_SIZE}x{metrics.MIN_SIZE}); left out")
      continue
    usable.append(t)
  if not usable:
    raise ValidationError(f"validation pairs ({s.source}): none that can be scored")
  return usable


def _generated_pairs(s: ValidationSpec, data: DataSpec, seed: int, limit: Optional[int]
                     ) -> tuple[list[str], Sequence[np.ndarray] | np.ndarray,
                                Sequence[np.ndarray] | np.ndarray]:
  """(stems, infrared, visible) of a dataset split or of procedural pairs.

  The images: lists of (H, W) arrays for a split, (N, H, W) arrays for procedural pairs.
  """
  from mmdrfuse_jax.data import (  # pylint: disable=g-import-not-at-top
      holdout,
      pipeline,
      sources,
      synthetic,
  )

  if s.source == "split":
    names = s.datasets
    try:
      split = data.split if s.split == "holdout" else s.split
      found: list[tuple[str, Any, int]] = []  # (stem, its dataset, its image id)
      for name in names:
        # Random access to the split's records, decoding only the pairs kept (a test split
        # can be larger than host RAM); a patch larger than any image: no patch index either.
        built = pipeline.StreamingPatchDataset.from_tfds(
            os.path.expanduser(data.data_dir), name, split, patch_size=1 << 30,
            patch_stride=1 << 30)
        ids: Sequence[int] = range(built.num_images)
        if s.split == "holdout":  # Exactly the pairs the training leaves out (loop.load_dataset).
          ids = holdout.held_out(built.stems, data.holdout)
        # A mixture's pairs are named as `PatchMixture` names them.
        found += [(built.stems[i] if len(names) == 1 else
                   pipeline.mixture_stem(name, built.stems[i]), built, i)
                  for i in ids]
      found = sorted(found, key=lambda f: f[0])[:limit]
      pairs = [built.image(i) for _, built, i in found]
    except (sources.DataError, ValueError) as e:
      raise ValidationError(f"validation split {s.split!r}: {e}") from None
    return [f[0] for f in found], [p[0] for p in pairs], [p[1] for p in pairs]
  # Procedural pairs after the training pairs of the same seed (pair i depends only on the
  # seed, i and the size), so that they are never training pairs.
  first = max(data.synthetic_pairs, 0)
  count = s.synthetic_pairs
  ir, vis = synthetic.make_pairs(first + count, s.synthetic_height, s.synthetic_width, seed=seed)
  return [f"synthetic_{seed}_{first + i:04d}" for i in range(count)], ir[first:], vis[first:]


@dataclasses.dataclass
class Result:
  """One validation: metric means, the strips to show, problems, and its wall time."""

  means: dict[str, float]  # Metrics without a defined mean are left out.
  strips: dict[str, np.ndarray]  # stem -> uint8 (H, 3W): infrared | visible | fused.
  problems: list[str]
  seconds: float

  def scalars(self) -> dict[str, float]:
    """The row logged to TensorBoard and metrics.jsonl."""
    return {**{f"val/{k}": v for k, v in self.means.items()}, "val/seconds": self.seconds}

  def describe(self, step: int, num_pairs: int) -> str:
    """One console line."""
    scores = " ".join(f"{k} {v:.4g}" for k, v in self.means.items())
    return f"validation at step {step}: {scores} ({num_pairs} pairs, {self.seconds:.2f} s)"


class Validator:
  """Fuses and scores the validation pairs with given parameters.

  Args:
    triples: the pairs (from `prepare_pairs`).
    s: the settings.
  """

  def __init__(self, triples: Sequence[scoring.Triple], s: ValidationSpec):
    self.triples = list(triples)
    self.settings = s
    self._sources = {}  # stem -> (infrared, visible) gray uint8, for the strips.
    for t in self.triples[:s.num_images]:
      self._sources[t.name] = tuple(imageio.to_8bit(imageio.to_gray_published(
          imageio.read_image(path))) for path in (t.ir, t.vis))

  def __call__(self, params: Any) -> Result:
    """Validates `params` (a student or teacher tree, on any device)."""
    start = time.perf_counter()
    params = jax.device_get(params)
    fuser = fusion.Fuser(params, output=OUTPUT)
    fuse_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] = fuser.fuse_images
    dead_units: Optional[list[float]] = None
    if networks.model_of(params) == "student":
      fuse_fn, dead_units = _counting_dead_units(fuser, params)
    # Floor (collapsed dark regions) always: a metric can rise while dark regions go flat.
    names = tuple(dict.fromkeys(self.settings.names + ("Floor",)))
    result = scoring.evaluate(self.triples, names=names, fuse_fn=fuse_fn,
                              keep_fused=self._sources)
    strips = {}
    for name, (ir, vis) in self._sources.items():
      if name in result.fused:  # Else the pair could not be fused (one of `problems`).
        fused = imageio.to_8bit(result.fused[name])
        strips[name] = np.concatenate([ir, vis, fused], axis=1)
    means = {k: v for k, v in result.means().items() if v is not None}
    if dead_units is not None:
      means[DEAD_UNITS] = dead_units[0] / dead_units[1] if dead_units[1] else float("nan")
    return Result(means, strips, result.problems, time.perf_counter() - start)


def _counting_dead_units(fuser: fusion.Fuser, params: Any
                         ) -> tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], list[float]]:
  """`fuser.fuse_images`, also adding up the student's dead pixels
  (`diagnostics.dead_unit_share`) of every pair it fuses: the diagnostic reads the images the
  scoring reads, once. Returns the function and its running [dead, total] pixel counts."""
  counts = [0.0, 0.0]

  def fuse_images(ir: np.ndarray, vis: np.ndarray) -> np.ndarray:
    fused = fuser.fuse_images(ir, vis)  # Raises for a pair it cannot fuse: nothing counted.
    gray = [imageio.to_unit_float(imageio.to_gray_published(x))[None, ..., None]
            for x in (ir, vis)]
    counts[0] += float(diagnostics.dead_unit_share(params, *gray)) * gray[0].size
    counts[1] += gray[0].size
    return fused

  return fuse_images, counts


class BestParams:
  """The parameters of the best validation so far, by one metric.

  Kept with an orbax `CheckpointManager` in `WORKDIR/best_<metric>/` (the parameters and the
  metric's value; one checkpoint, the best), and exported as `WORKDIR/<model>_best_<metric>.npz`
  for `bin/fuse.py`. A rerun of the run finds the best so far in the manager's metrics.
  """

  def __init__(self, workdir: pathlib.Path, model: str, metric: str):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    self._ocp = ocp
    self.metric = metric
    self.weights = workdir / f"{model}_best_{metric}.npz"
    self._lower = metric in LOWER_IS_BETTER
    self._manager = ocp.CheckpointManager(
        (workdir / f"best_{metric}").resolve(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m[metric], best_mode="min" if self._lower else "max",
            create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True))

  def best(self) -> Optional[tuple[int, float]]:
    """(step, value) of the best validation kept, or None."""
    step = self._manager.best_step()
    if step is None:
      return None
    return step, float(self._manager.metrics(step)[self.metric])

  def offer(self, step: int, params: Any, means: dict[str, float]) -> bool:
    """Keeps `params` when their value of the metric beats the best so far; returns whether."""
    value = means.get(self.metric)
    if value is None:  # Undefined on every pair: nothing to compare.
      return False
    best = self.best()
    if best is not None and (step <= best[0] or not (value < best[1] if self._lower
                                                     else value > best[1])):
      return False
    params = jax.device_get(params)
    self._manager.save(step, args=self._ocp.args.StandardSave(params),
                       metrics={self.metric: float(value)}, force=True)
    self._manager.wait_until_finished()
    self.export()
    return True

  def export(self) -> Optional[pathlib.Path]:
    """Writes the best parameters kept to `self.weights` (atomically); None when none is kept.

    In a run of several processes every one calls it (and `offer`: orbax saves together), and
    process 0 alone writes the file.
    """
    best = self.best()
    if best is None:
      return None
    params = self._manager.restore(best[0])
    if jax.process_index() == 0:
      weight_files.save_params(self.weights, params)
    return self.weights
