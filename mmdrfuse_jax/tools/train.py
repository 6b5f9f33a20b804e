"""Trains the MMDRFuse teacher or student.

  python bin/train.py --config=configs/quickstart.py --workdir=/tmp/qs
  python bin/train.py --config=configs/student.py --workdir=runs/student --config.optim.lr=3e-4 ...

Rerunning with the same --workdir resumes from its latest checkpoint.

Several processes (hosts, or one process per GPU) train as one when the same command runs on
each with the coordinator, the process count and its id (or under SLURM, Open MPI or on a Cloud
TPU slice, where JAX finds them):

  python bin/train.py --config=... --workdir=SHARED/run --coordinator_address=host0:1234 \\
      --num_processes=2 --process_id=0     # and --process_id=1 on the other
"""

import sys
from typing import Sequence

from mmdrfuse_jax.runtime import cli


def _parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog="mmdrfuse-train", description=__doc__)
  parser.add_argument("--config", required=True, metavar="FILE",
                      help="training config file (FILE or FILE:arg), e.g. configs/student.py; "
                      "--config.FIELD=VALUE overrides a field")
  parser.add_argument("--workdir", required=True,
                      help="directory for checkpoints, logs and weights")
  parser.add_argument(
      "--distributed", choices=("auto", "on", "off"), default="auto",
      help="train as one of several processes (jax.distributed): auto when a coordinator, "
      "process count or id is given or SLURM/Open MPI started several tasks; on: always (JAX "
      "detects what is not given, on a Cloud TPU slice too); off: one process")
  parser.add_argument("--coordinator_address", metavar="HOST:PORT",
                      help="process 0's address (default: $JAX_COORDINATOR_ADDRESS)")
  parser.add_argument("--num_processes", type=int,
                      help="number of processes (default: $JAX_NUM_PROCESSES)")
  parser.add_argument("--process_id", type=int,
                      help="this process's id, 0..num_processes-1 (default: $JAX_PROCESS_ID)")
  parser.add_argument("--verbose", action="store_true",
                      help="keep the libraries' own logs (orbax logs every save)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parsed = cli.parse_args(_parser(), argv, configs=("config",))
  if isinstance(parsed, int):
    return parsed
  args, configs = parsed
  config = configs["config"]
  # Imported once the flags parse.
  from absl import logging

  from mmdrfuse_jax.runtime import backend, interrupts
  from mmdrfuse_jax.train import distributed, loop, run_spec, stages

  if not args.verbose:
    # Orbax logs every save at INFO, and a failed save (a full disk) as dozens of ERROR
    # lines from its writer threads; the run reports such failures itself, in one line.
    logging.set_verbosity(logging.FATAL)
    cli.ignore_closed_event_loop_reports()
  try:  # Before anything uses jax's devices.
    distributed.initialize(args.distributed, args.coordinator_address, args.num_processes,
                           args.process_id)
  except distributed.DistributedError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2 if isinstance(e, distributed.UsageError) else 1
  # Process 0 alone writes the log of a multi-process run (errors: every process, on stderr).
  log = print if distributed.is_primary() else (lambda line: None)
  backend.report(log)  # what jax runs on (a warning where an accelerator sits unused), in the log
  try:
    result = stages.run(config, args.workdir, log=log)
  except run_spec.ConfigError as e:  # Every stage's settings are checked before any work.
    print(f"error: {e}", file=sys.stderr)
    return 2
  except loop.TrainingError as e:
    cli.exit_after_error(str(e))
  if result.interrupted_by is not None:
    return interrupts.exit_code(result.interrupted_by)
  return 0


if __name__ == "__main__":
  sys.exit(main())
