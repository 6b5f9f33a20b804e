#!/usr/bin/env python
"""Reproduces the published student end to end, then compares it with reference weights.

  python bin/reproduce.py --workdir=runs/repro \\
      --dataset=roadscene --manual_dir=RoadScene_train \\
      --teacher_weights=pretrained_models/teacher.model \\
      --config=configs/student.py --config.vgg_weights=vgg19.npz \\
      --test=RoadScene_test=RoadScene_test/ir,RoadScene_test/vi \\
      --test=MRI_PET=MRI_PET/PET,MRI_PET/MRI \\
      --reference=published=pretrained_models/student.model

Builds the training data, trains the teacher with --teacher_config=configs/teacher.py or takes
--teacher_weights, distils the student with --config, then fuses every --test set with every
model and writes WORKDIR/results.md, results.json and report_<test>.html. Rerunning the same
command continues where it stopped. Both configs take overrides: --config.optim.lr=1e-3,
--teacher_config.num_epochs=5.
"""

import pathlib
import sys

# The configs import `configs.default`, which lives next to bin/ in the repository.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmdrfuse_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The student's training config.",
                                          lock_config=True)
_TEACHER_CONFIG = config_flags.DEFINE_config_file(
    "teacher_config", None, "The teacher's training config, to train one (else "
    "--teacher_weights).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where data, runs and results go.")
_DATASET = flags.DEFINE_string("dataset", None, "Builder config of the training data "
                               "(bin/prepare_data.py --dataset), e.g. roadscene, llvip.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "The folder holding the training pairs.")
_TEACHER_WEIGHTS = flags.DEFINE_string(
    "teacher_weights", "", "A trained teacher (e.g. the published teacher.model): no teacher "
    "stage.")
_TESTS = flags.DEFINE_multi_string("test", None, "NAME=IR_DIR,VIS_DIR: a test set (repeatable).")
_REFERENCES = flags.DEFINE_multi_string(
    "reference", [], "NAME=WEIGHTS: weights to compare with (repeatable); the table gives "
    "VIF and Qabf as a share of the first.")
_METRICS = flags.DEFINE_string("metrics", None, "Comma-separated subset (default: all eleven).")
flags.mark_flags_as_required(["config", "workdir", "dataset", "manual_dir", "test"])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from mmdrfuse_jax import (  # imported once flags parse
    backend,
    evaluation,
    interrupts,
    reproduce,
    trainer,
  )

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.FATAL)  # Orbax logs every save at INFO.
    cli.ignore_closed_event_loop_reports()
  if bool(_TEACHER_WEIGHTS.value) == (_TEACHER_CONFIG.value is not None):
    print("error: give either --teacher_config=configs/teacher.py (to train the teacher) or "
          "--teacher_weights=FILE (a trained teacher)", file=sys.stderr)
    return 2
  configs = {"teacher_config": None}
  for flag, holder in (("config", _CONFIG), ("teacher_config", _TEACHER_CONFIG)):
    if flag == "teacher_config" and _TEACHER_WEIGHTS.value:
      continue
    try:
      configs[flag] = holder.value
      configs[flag].get("model")  # Loaded lazily: a missing or broken file fails here.
    except Exception as e:  # The config file failed to load.
      print(f"error: {cli.config_error(e, flag)}", file=sys.stderr)
      return 2
  try:
    recipe = reproduce.Recipe(
        student=configs["config"],
        teacher=configs["teacher_config"],
        teacher_weights=_TEACHER_WEIGHTS.value, dataset=_DATASET.value,
        manual_dir=_MANUAL_DIR.value, tests=[reproduce.parse_test(t) for t in _TESTS.value],
        references=[reproduce.parse_reference(r) for r in _REFERENCES.value],
        metrics=evaluation.parse_metric_names(_METRICS.value), argv=sys.argv)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  backend.report()
  try:
    with interrupts.StopRequest() as stop:
      outcome = reproduce.run(recipe, _WORKDIR.value, stop=stop)
  except (reproduce.ReproductionError, trainer.TrainingError) as e:
    cli.exit_after_error(str(e))
  if not outcome.finished:
    print("stopped; rerun the same command to continue", file=sys.stderr)
    return interrupts.exit_code(outcome.interrupted_by) if outcome.interrupted_by else 1
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
