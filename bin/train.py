#!/usr/bin/env python
"""Trains the MMDRFuse teacher or student.

  python bin/train.py --config=configs/quickstart.py --workdir=/tmp/qs
  python bin/train.py --config=configs/student.py --workdir=runs/student --config.optim.lr=3e-4 ...

Rerunning with the same --workdir resumes from its latest checkpoint.
"""

import pathlib
import sys

# The configs import `configs.default`, which lives next to bin/ in the repository.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmdrfuse_jax import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and weights.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from mmdrfuse_jax import backend, interrupts, stages, trainer  # imported once flags parse

  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every save at INFO, and a failed save (a full disk) as dozens of ERROR
    # lines from its writer threads; the run reports such failures itself, in one line.
    logging.set_verbosity(logging.FATAL)
    cli.ignore_closed_event_loop_reports()

  try:
    config = _CONFIG.value
    config.get("model")  # The file is loaded lazily: a missing or broken one fails here.
  except Exception as e:  # The config file failed to load (absl parsed the flags lazily).
    print(f"error: {cli.config_error(e)}", file=sys.stderr)
    return 2
  backend.report()  # what jax runs on (a warning where an accelerator sits unused), in the log
  try:
    result = stages.run(config, _WORKDIR.value)
  except trainer.TrainingError as e:
    cli.exit_after_error(str(e))
  if result.interrupted_by is not None:
    return interrupts.exit_code(result.interrupted_by)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
