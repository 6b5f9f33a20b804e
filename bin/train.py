#!/usr/bin/env python
"""Trains the MMDRFuse teacher or student.

  python bin/train.py --config=configs/quickstart.py --workdir=/tmp/qs
  python bin/train.py --config=configs/student.py --workdir=runs/student --config.optim.lr=3e-4 ...

Rerunning with the same --workdir resumes from its latest checkpoint.

Several processes (hosts, or one process per GPU) train as one when the same command runs on
each with the coordinator, the process count and its id (or under SLURM, Open MPI or on a Cloud
TPU slice, where JAX finds them):

  python bin/train.py --config=... --workdir=SHARED/run --coordinator_address=host0:1234 \
      --num_processes=2 --process_id=0     # and --process_id=1 on the other
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
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Train as one of several processes (jax.distributed): auto when a coordinator, process count "
    "or id is given or SLURM/Open MPI started several tasks; on: always (JAX detects what is not "
    "given, on a Cloud TPU slice too); off: one process.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (default: $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's id, 0..num_processes-1 (default: $JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Imported once the flags parse.
  from mmdrfuse_jax import backend, distributed, interrupts, stages, trainer

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
  try:  # Before anything uses jax's devices.
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value)
  except distributed.DistributedError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2 if isinstance(e, distributed.UsageError) else 1
  # Process 0 alone writes the log of a multi-process run (errors: every process, on stderr).
  log = print if distributed.is_primary() else (lambda line: None)
  backend.report(log)  # what jax runs on (a warning where an accelerator sits unused), in the log
  try:
    result = stages.run(config, _WORKDIR.value, log=log)
  except trainer.TrainingError as e:
    cli.exit_after_error(str(e))
  if result.interrupted_by is not None:
    return interrupts.exit_code(result.interrupted_by)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
