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
model and writes WORKDIR/results.md, results.json and report_<test>.html. Every file it reads
(VGG-19 and teacher weights, test folders, references) is checked before the data are built.
Rerunning the same command continues where it stopped, also in a copy of WORKDIR elsewhere.
Both configs take overrides: --config.optim.lr=1e-3, --teacher_config.num_epochs=5.
"""

import sys
from typing import Sequence

from mmdrfuse_jax.runtime import cli


def _parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog="mmdrfuse-reproduce", description=__doc__)
  parser.add_argument("--config", required=True, metavar="FILE",
                      help="the student's training config (--config.FIELD=VALUE overrides)")
  parser.add_argument("--teacher_config", metavar="FILE",
                      help="the teacher's training config, to train one (else "
                      "--teacher_weights; --teacher_config.FIELD=VALUE overrides)")
  parser.add_argument("--workdir", required=True, help="where data, runs and results go")
  parser.add_argument("--dataset", required=True,
                      help="builder config of the training data (bin/prepare_data.py "
                      "--dataset), e.g. roadscene, llvip")
  parser.add_argument("--manual_dir", required=True, help="the folder holding the training pairs")
  parser.add_argument("--teacher_weights", default="",
                      help="a trained teacher (e.g. the published teacher.model): no teacher "
                      "stage")
  parser.add_argument("--test", action="append", required=True, metavar="NAME=IR_DIR,VIS_DIR",
                      help="a test set (repeatable)")
  parser.add_argument("--reference", action="append", default=[], metavar="NAME=WEIGHTS",
                      help="weights to compare with (repeatable); the table gives VIF and Qabf "
                      "as a share of the first")
  parser.add_argument("--metrics", help="comma-separated subset (default: all eleven)")
  parser.add_argument("--verbose", action="store_true",
                      help="keep the libraries' own logs (orbax logs every save)")
  return parser


def _teacher_given_once(args) -> str | None:
  if bool(args.teacher_weights) == (args.teacher_config is not None):
    return ("give either --teacher_config=configs/teacher.py (to train the teacher) or "
            "--teacher_weights=FILE (a trained teacher)")
  return None


def main(argv: Sequence[str] | None = None) -> int:
  parsed = cli.parse_args(_parser(), argv, configs=("config", "teacher_config"),
                          check=_teacher_given_once)
  if isinstance(parsed, int):
    return parsed
  args, configs = parsed
  from absl import logging

  from mmdrfuse_jax import reproduce
  from mmdrfuse_jax.evaluation import scoring
  from mmdrfuse_jax.runtime import backend, interrupts
  from mmdrfuse_jax.train import loop, run_spec

  if not args.verbose:
    logging.set_verbosity(logging.FATAL)  # Orbax logs every save at INFO.
    cli.ignore_closed_event_loop_reports()
  try:
    recipe = reproduce.Recipe(
        student=configs["config"],
        teacher=configs["teacher_config"],
        teacher_weights=args.teacher_weights, dataset=args.dataset,
        manual_dir=args.manual_dir, tests=[reproduce.parse_test(t) for t in args.test],
        references=[reproduce.parse_reference(r) for r in args.reference],
        metrics=scoring.parse_metric_names(args.metrics), argv=sys.argv)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  backend.report()
  try:
    with interrupts.StopRequest() as stop:
      outcome = reproduce.run(recipe, args.workdir, stop=stop)
  except (reproduce.InputError, run_spec.ConfigError) as e:  # Found before anything is written.
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (reproduce.ReproductionError, loop.TrainingError) as e:
    cli.exit_after_error(str(e))
  if not outcome.finished:
    print("stopped; rerun the same command to continue", file=sys.stderr)
    return interrupts.exit_code(outcome.interrupted_by) if outcome.interrupted_by else 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
