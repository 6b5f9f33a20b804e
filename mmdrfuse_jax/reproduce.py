"""The reproduction recipe: data, teacher, student, then one scored comparison.

`run(recipe, workdir)` runs, in `workdir`:

1. **data**: the training dataset is built by `prepare.prepare` into `WORKDIR/data` (reused
   while its source folder is unchanged);
2. **teacher**: trained with the teacher config into `WORKDIR/teacher`, unless a teacher's
   weights are given (the published `teacher.model`, say);
3. **student**: distilled from that teacher with the student config into `WORKDIR/student`;
4. **comparison**: on every test set, every method (this run's student, its teacher when
   trained here, and each reference, e.g. the published student) fuses the pairs into
   `WORKDIR/fused/<test>/<method>/` as `bin/fuse.py` would, and `comparison.compare` scores all
   of them on the same images with the published conventions. The means go to
   `WORKDIR/results.md` and `WORKDIR/results.json` (with the command, the steps and the wall
   time of each stage), and each test set gets the visual report `WORKDIR/report_<test>.html`.

Every stage checkpoints or is idempotent: rerunning the same command continues where it
stopped (training resumes from its latest checkpoint; a built dataset is reused; the
comparison is redone, it takes seconds to minutes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Callable, Optional, Sequence

import ml_collections

from mmdrfuse_jax.errors import MMDRFuseError
from mmdrfuse_jax.evaluation import comparison, report, scoring
from mmdrfuse_jax.inference import batch_fuse, fusion
from mmdrfuse_jax.io import files, imageio
from mmdrfuse_jax.models import weight_files
from mmdrfuse_jax.runtime import interrupts
from mmdrfuse_jax.train import loop
from mmdrfuse_jax.train.run_spec import RunSpec


class ReproductionError(MMDRFuseError, ValueError):
  """A user-facing problem with the recipe (one-line message)."""


class InputError(ReproductionError):
  """A file the recipe needs is missing or unusable, found before any work (`check_inputs`)."""


@dataclasses.dataclass(frozen=True)
class TestSet:
  """Pairs to score: two folders paired by file stem."""

  name: str
  ir: pathlib.Path
  vis: pathlib.Path


@dataclasses.dataclass(frozen=True)
class Reference:
  """Weights to compare with (for example the published student)."""

  name: str
  weights: pathlib.Path


@dataclasses.dataclass
class Recipe:
  """What to run.

  Attributes:
    student: the student's training config (configs/student.py and overrides).
    teacher: the teacher's training config, or None when `teacher_weights` is given.
    teacher_weights: a given teacher ("" when the recipe trains one).
    dataset: the builder config of the training data (e.g. "roadscene").
    manual_dir: the folder holding the training pairs.
    tests: the test sets.
    references: the weights to compare with.
    metrics: the metrics of the table.
    argv: the command, recorded in results.json.
  """

  student: ml_collections.ConfigDict
  teacher: Optional[ml_collections.ConfigDict]
  teacher_weights: str
  dataset: str
  manual_dir: str
  tests: Sequence[TestSet]
  references: Sequence[Reference] = ()
  metrics: Sequence[str] = scoring.metrics.METRIC_NAMES
  argv: Sequence[str] = ()


def parse_test(spec: str) -> TestSet:
  """`NAME=IR_DIR,VIS_DIR` -> TestSet (checked: both folders exist)."""
  name, sep, rest = spec.partition("=")
  folders = rest.split(",")
  if not sep or not name or len(folders) != 2 or not all(folders):
    raise ReproductionError(f"--test {spec!r}: expected NAME=IR_DIR,VIS_DIR")
  _check_name(name, "--test")
  for folder in folders:
    if not pathlib.Path(folder).expanduser().is_dir():
      raise ReproductionError(f"--test {name}: {folder}: no such folder")
  return TestSet(name, *(pathlib.Path(f).expanduser() for f in folders))


def parse_reference(spec: str) -> Reference:
  """`NAME=WEIGHTS` -> Reference (checked: the file exists)."""
  name, sep, path = spec.partition("=")
  if not sep or not name or not path:
    raise ReproductionError(f"--reference {spec!r}: expected NAME=WEIGHTS")
  _check_name(name, "--reference")
  if not pathlib.Path(path).expanduser().exists():
    raise ReproductionError(f"--reference {name}: {path}: no such weights file")
  return Reference(name, pathlib.Path(path).expanduser())


def _check_name(name: str, option: str) -> None:
  # Names become folder and file names.
  if not name.replace("_", "").replace("-", "").isalnum():
    raise ReproductionError(f"{option} name {name!r}: use letters, digits, '-' and '_' only")


def load_any_params(path: pathlib.Path) -> dict:
  """A student's or a teacher's parameters, whichever the file holds."""
  try:
    return weight_files.load_params(path, "student")
  except weight_files.WeightsError as as_student:
    try:
      return weight_files.load_params(path, "teacher")
    except weight_files.WeightsError:
      raise ReproductionError(str(as_student)) from None


def check_inputs(recipe: Recipe, student: RunSpec, teacher: Optional[RunSpec]) -> None:
  """Reads every file the recipe will need but its training pairs, before any long work.

  The VGG-19 weights of each stage with a term that reads them, the given teacher, the
  validation folders, the pairs of every test set and the weights of every reference. The
  training pairs are checked by `prepare.prepare`, before it builds anything.

  Args:
    recipe: the recipe.
    student: the student stage's spec (the recipe's config, with its data settings and its
      teacher's weights).
    teacher: the teacher stage's spec, or None when the recipe's teacher is given.

  Raises:
    InputError: a file is missing or unusable (one line naming it).
  """
  stages = [("student", student)] if teacher is None else [("teacher", teacher),
                                                           ("student", student)]
  for name, spec in stages:
    try:
      # A student after a teacher stage distils from the weights that stage writes.
      loop.check_inputs(spec, teacher=teacher is None)
    except loop.TrainingError as e:
      raise InputError(f"{name}: {e}") from None
  for test in recipe.tests:
    try:
      pairs = imageio.pair_folders([test.ir, test.vis]).pairs
    except imageio.ImageError as e:
      raise InputError(f"--test {test.name}: {e}") from None
    if not pairs:
      raise InputError(f"--test {test.name}: no pairs in {test.ir} and {test.vis}")
  for reference in recipe.references:
    try:
      load_any_params(reference.weights)
    except ReproductionError as e:
      raise InputError(f"--reference {reference.name}: {e}") from None


# ----------------------------------------------------------------------------------- stages


@dataclasses.dataclass
class Outcome:
  """What `run` did: finished, or where it stopped."""

  finished: bool
  interrupted_by: Optional[int] = None
  results: Optional[pathlib.Path] = None


class _StageTimes:
  """Wall time and steps per stage, summed over the invocations that ran it (a JSON file)."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.stages = json.loads(path.read_text()) if path.is_file() else {}

  def add(self, stage: str, seconds: float, **info) -> None:
    entry = self.stages.setdefault(stage, {"wall_seconds": 0.0})
    entry["wall_seconds"] = round(entry["wall_seconds"] + seconds, 1)
    entry.update(info)
    with files.atomic_write(self.path, "w") as f:
      f.write(json.dumps(self.stages, indent=2, sort_keys=True) + "\n")


def run(recipe: Recipe, workdir: str | os.PathLike, *, log: Callable[[str], None] = print,
        stop: Optional[interrupts.StopRequest] = None) -> Outcome:
  """Runs (or continues) the recipe in `workdir`.

  Raises:
    loop.ConfigError, InputError: unusable settings, or a file the recipe needs is missing or
      unusable; found before anything is written.
    ReproductionError, loop.TrainingError: a stage cannot run (one-line message).
  """
  workdir = pathlib.Path(workdir).expanduser()
  data_dir = workdir / "data"
  teacher_config = None if recipe.teacher is None else _with_data(recipe.teacher,
                                                                  recipe.dataset, data_dir)
  student_config = _with_data(recipe.student, recipe.dataset, data_dir)
  # The student distils from the given teacher, or from the weights the teacher stage writes.
  student_config.teacher_weights = (
      recipe.teacher_weights if teacher_config is None
      else str(workdir / "teacher" / f"{teacher_config.model}.npz"))
  # Every stage's settings, read and checked once, before any work.
  teacher = None if teacher_config is None else RunSpec.from_config(teacher_config)
  student = RunSpec.from_config(student_config)
  # And every file they read, before hours of building data and training a teacher.
  check_inputs(recipe, student, teacher)
  workdir.mkdir(parents=True, exist_ok=True)
  times = _StageTimes(workdir / "stage_times.json")

  start = time.perf_counter()
  log(f"== data: {recipe.dataset} from {recipe.manual_dir}")
  from mmdrfuse_jax.data import prepare, sources  # pylint: disable=g-import-not-at-top

  try:
    built = prepare.prepare(recipe.dataset, recipe.manual_dir, data_dir, report=log)
  except (sources.DataError, prepare.BuildError, ValueError) as e:
    raise ReproductionError(f"data: {e}") from None
  times.add("data", time.perf_counter() - start,
            images={k: len(v) for k, v in built.images.items()})

  if teacher is not None:
    result = _train("teacher", teacher, workdir, times, log)
    if result.weights is None:
      return Outcome(False, result.interrupted_by)
  result = _train("student", student, workdir, times, log)
  if result.weights is None:
    return Outcome(False, result.interrupted_by)

  methods = [Reference("student", result.weights)]
  if teacher is not None:
    methods.append(Reference("teacher", pathlib.Path(student.frozen.teacher_weights)))
  methods += list(recipe.references)
  start = time.perf_counter()
  tables = {}
  # One fuser per method for every test set: loaded once, and its compiled sizes reused.
  fusers = {m.name: fusion.Fuser(load_any_params(m.weights)) for m in methods}
  for test in recipe.tests:
    log(f"== comparison on {test.name}: {', '.join(m.name for m in methods)}")
    compared = _compare(test, methods, fusers, recipe.metrics, workdir, log, stop)
    if compared is None:
      return Outcome(False, stop.signum if stop is not None else None)
    tables[test.name] = compared
  times.add("comparison", time.perf_counter() - start)
  path = write_results(workdir, recipe, tables, times.stages)
  log(f"wrote {path} and {path.with_suffix('.json')}")
  return Outcome(True, None, path)


def _with_data(config: ml_collections.ConfigDict, dataset: str, data_dir: pathlib.Path
               ) -> ml_collections.ConfigDict:
  """A copy of a stage's `config` that trains on the recipe's built dataset."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.dataset = dataset
  config.data.data_dir = str(data_dir)
  config.data.synthetic_pairs = 0
  return config


def _train(name: str, spec: RunSpec, workdir: pathlib.Path, times: _StageTimes,
           log: Callable[[str], None]) -> loop.RunResult:
  """Trains stage `name` in `workdir/name`."""
  log(f"== {name}: {workdir / name}")
  start = time.perf_counter()
  # The recipe's folder holds its data and every stage: the run records keep such paths
  # relative, so the recipe resumes once moved or copied as a whole.
  result = loop.train_model(spec, workdir / name, log=log, run_dir=workdir)
  times.add(name, time.perf_counter() - start, steps=result.step, total_steps=result.total_steps)
  return result


def _compare(test: TestSet, methods: Sequence[Reference], fusers: dict[str, fusion.Fuser],
             names: Sequence[str], workdir: pathlib.Path, log: Callable[[str], None],
             stop: Optional[interrupts.StopRequest]) -> Optional[comparison.Comparison]:
  """Fuses the test pairs with every method (`fusers` by name), scores them, writes the
  visual report."""
  try:
    pairing = imageio.pair_folders([test.ir, test.vis])
  except imageio.ImageError as e:  # Checked before the work; changed since.
    raise ReproductionError(f"--test {test.name}: {e}") from None
  for problem in pairing.problems:
    log(f"warning: {test.name}: {problem}")
  if not pairing.pairs:
    raise ReproductionError(f"--test {test.name}: no pairs in {test.ir} and {test.vis}")
  folders = []
  for method in methods:
    out = workdir / "fused" / test.name / method.name
    done = batch_fuse.fuse_pairs(fusers[method.name], pairing.pairs, out, progress=False,
                                 report=log, stop=stop)
    if done.not_started:
      return None
    folders.append(comparison.Method(method.name, out))
  images, problems = comparison.pair_images(test.ir, test.vis, folders)
  compared = comparison.compare(images, folders, names=names, stop=stop, problems=problems)
  if compared.stopped_by is not None:
    return None
  try:
    page = report.build_html(compared, title=f"Reproduction: {test.name}",
                             sources=(str(test.ir), str(test.vis)), stop=stop)
  except report.Stopped:
    return None
  report.write_atomic(workdir / f"report_{test.name}.html", page)
  return compared


# ---------------------------------------------------------------------------------- results


def results_rows(tables: dict[str, comparison.Comparison]) -> list[dict[str, Any]]:
  """One row per (test, method): the metric means and the number of images."""
  rows = []
  for test, compared in tables.items():
    for method in compared.methods:
      means = compared.results[method.name].means()
      rows.append({"test": test, "method": method.name, "images": len(compared.images),
                   **{n: means[n] for n in compared.names}})
  return rows


def write_results(workdir: pathlib.Path, recipe: Recipe, tables: dict[str, comparison.Comparison],
                  stages: dict[str, Any]) -> pathlib.Path:
  """Writes results.md and results.json (atomically); returns the markdown's path."""
  rows = results_rows(tables)
  names = list(recipe.metrics)
  reference = recipe.references[0].name if recipe.references else None
  ratio_names = [n for n in ("VIF", "Qabf") if n in names] if reference else []
  for row in rows:  # This run's models as a share of the first reference, per test set.
    ref = next(r for r in rows if r["test"] == row["test"] and r["method"] == reference) \
        if reference else None
    for n in ratio_names:
      if ref is not None and ref[n] and row[n] is not None:
        row[f"{n} / {reference}"] = row[n] / ref[n]
      else:
        row[f"{n} / {reference}"] = None
  columns = ["test", "method", "images", *names, *(f"{n} / {reference}" for n in ratio_names)]
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    cells = []
    for c in columns:
      v = row[c]
      cells.append(f"{v:.4f}" if isinstance(v, float) else ("n/a" if v is None else str(v)))
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Stages (wall time summed over the invocations that ran them):", ""]
  for stage, info in stages.items():
    extra = ", ".join(f"{k} {v}" for k, v in info.items() if k != "wall_seconds")
    lines.append(f"- {stage}: {info['wall_seconds'] / 60:.1f} min" + (f" ({extra})" if extra
                                                                     else ""))
  if recipe.argv:
    lines += ["", "Command:", "", "```", " ".join(recipe.argv), "```"]
  md = workdir / "results.md"
  with files.atomic_write(md, "w") as f:
    f.write("\n".join(lines) + "\n")
  record = {"rows": rows, "stages": stages, "command": list(recipe.argv),
            "metric_conventions": "bin/evaluate.py's defaults (the published tables' conventions)"}
  with files.atomic_write(md.with_suffix(".json"), "w") as f:
    f.write(json.dumps(record, indent=2) + "\n")
  return md
