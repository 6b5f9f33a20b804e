#!/usr/bin/env python
"""Trains the MMDRFuse teacher or student.

  python bin/train.py --config=configs/quickstart.py --workdir=/tmp/qs
  python bin/train.py --config=configs/student.py --workdir=runs/student --config.optim.lr=3e-4 ...

Rerunning with the same --workdir resumes from its latest checkpoint.
"""

import os
import pathlib
import re
import sys

# The configs import `configs.default`, which lives next to bin/ in the repository.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and weights.")
flags.mark_flags_as_required(["config", "workdir"])


def _config_error(e: Exception) -> str:
  """One line for a config file or `--config.x` override that cannot be used."""
  text = " ".join(str(e).replace("\\n", " ").split()).strip("'\"")
  suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if suggestion:
    return (f"--config: no field {suggestion.group(2)!r} in the config; did you mean "
            f"{suggestion.group(1)!r}?")
  missing = re.search(r"Attempted \[.*?\]: (\S+) \[Errno 2\]", text)
  if missing:
    return f"--config={missing.group(1)}: no such config file"
  return f"--config: {text[:300]}"


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a bad flag, config file or override as one line and exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except Exception as e:  # config_flags raises many types for a file or override it rejects.
    print(f"error: {_config_error(e)}", file=sys.stderr)
  sys.exit(2)


def _ignore_closed_event_loop_reports() -> None:
  """Drops the "Event loop is closed" reports of tensorstore's threads after a failed write.

  When a checkpoint write fails (a full disk), tensorstore's I/O threads may still call back
  into orbax's already closed asyncio loop; Python reports each through
  `sys.unraisablehook`, which prints a traceback from those threads, even before the run's
  own one-line error. They are not the cause (the run names it) and not a bug of ours; every
  other report is kept.
  """
  previous = sys.unraisablehook

  def unraisablehook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    previous(unraisable)

  sys.unraisablehook = unraisablehook


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from mmdrfuse_jax import backend, interrupts, stages, trainer  # imported once flags parse

  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every save at INFO, and a failed save (a full disk) as dozens of ERROR
    # lines from its writer threads; the run reports such failures itself, in one line.
    logging.set_verbosity(logging.FATAL)
    _ignore_closed_event_loop_reports()

  try:
    config = _CONFIG.value
    config.get("model")  # The file is loaded lazily: a missing or broken one fails here.
  except Exception as e:  # The config file failed to load (absl parsed the flags lazily).
    print(f"error: {_config_error(e)}", file=sys.stderr)
    return 2
  backend.report()  # what jax runs on (a warning where an accelerator sits unused), in the log
  try:
    result = stages.run(config, _WORKDIR.value)
  except trainer.TrainingError as e:
    print(f"error: {e}", file=sys.stderr)
    # After a failed write (a full disk), the writer threads of orbax, tensorstore and
    # tensorboardX would print tracebacks while the interpreter shuts down, retrying writes
    # that cannot succeed. Everything that could be saved is saved: leave without them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  if result.interrupted_by is not None:
    return interrupts.exit_code(result.interrupted_by)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
