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

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and weights.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from mmdrfuse_jax import stages, trainer  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.

  try:
    result = stages.run(_CONFIG.value, _WORKDIR.value)
  except trainer.TrainingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if result.interrupted_by is not None:
    return 128 + result.interrupted_by
  return 0


if __name__ == "__main__":
  app.run(main)
