"""A training run as a sequence of stages: one model, or the teacher then its student.

A config with a `teacher_stage` sub-config (the quickstart) is a two-stage run: the teacher is
trained in `WORKDIR/teacher` from that sub-config, then the student in `WORKDIR/student`
distils from `WORKDIR/teacher/teacher.npz`. Both stages train on the run's `config.data`
(the teacher stage has no data settings of its own), and the run's `vgg_weights` (unless the
stage names its own), `validation`, `progress_bar` and `start_fresh` apply to both. Given
`config.teacher_weights`, the teacher stage is skipped and the student distils from that
teacher. Any other config is one stage in `WORKDIR`. Each stage resumes on its own, so
rerunning the same command continues where it stopped, also in a copy of `WORKDIR` elsewhere
(the stages record the paths inside `WORKDIR` relative to it).

Planning works on configs (each stage's config is what its run records); `run` then reads each
stage's config into its `run_spec.RunSpec` once, before any stage trains, and trains from the
specs.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable

import ml_collections

from mmdrfuse_jax.train import loop
from mmdrfuse_jax.train.run_spec import RunSpec


@dataclasses.dataclass(frozen=True)
class Stage:
  """One model trained in its own working directory."""

  name: str
  config: ml_collections.ConfigDict
  workdir: pathlib.Path


def plan(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> list[Stage]:
  """The stages `config` describes, with their configs and working directories."""
  workdir = pathlib.Path(workdir).expanduser()
  if config.get("teacher_stage") is None:  # Only a two-stage config (the quickstart) has one.
    return [Stage(str(config.model), config, workdir)]
  student = ml_collections.ConfigDict(config.to_dict())
  del student["teacher_stage"]
  if config.teacher_weights:  # A given teacher: distil from it, no teacher stage.
    return [Stage("student", student, workdir / "student")]
  teacher = ml_collections.ConfigDict(config.teacher_stage.to_dict())
  # Settings given for the whole run apply to the teacher stage too.
  teacher.data = ml_collections.ConfigDict(config.data.to_dict())
  if not teacher.vgg_weights:
    teacher.vgg_weights = config.vgg_weights
  teacher.validation = ml_collections.ConfigDict(config.validation.to_dict())
  teacher.progress_bar = config.progress_bar
  teacher.start_fresh = config.start_fresh
  teacher_dir = workdir / "teacher"
  student.teacher_weights = str(teacher_dir / f"{teacher.model}.npz")
  return [Stage("teacher", teacher, teacher_dir),
          Stage("student", student, workdir / "student")]


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
        log: Callable[[str], None] = print, stop_at_step: int | None = None) -> loop.RunResult:
  """Runs the stages of `config` in order; stops after a stage that did not finish.

  Args:
    config: the run's ml_collections config.
    workdir: the run's working directory.
    log: where progress lines go.
    stop_at_step: passed to every stage (each counts its own steps).

  Returns:
    The `loop.RunResult` of the last stage that ran.

  Raises:
    loop.TrainingError: a stage cannot run (one-line message); every stage's settings are
      read and checked (`loop.ConfigError`) before the first stage starts.
  """
  workdir = pathlib.Path(workdir).expanduser()
  stages = plan(config, workdir)
  specs = [RunSpec.from_config(stage.config) for stage in stages]  # Before any stage trains.
  for number, (stage, spec) in enumerate(zip(stages, specs), start=1):
    if len(stages) > 1:
      source = (f", distilled from {spec.frozen.teacher_weights}" if stage.name == "student"
                else "")
      log(f"== stage {number}/{len(stages)}: {stage.name}{source}")
    # The run's folder holds every stage (the student reads WORKDIR/teacher/teacher.npz): the
    # run record keeps such paths relative, so the run may be moved or copied as a whole.
    result = loop.train_model(spec, stage.workdir, log=log, stop_at_step=stop_at_step,
                              run_dir=workdir)
    if result.weights is None:
      break
  return result
