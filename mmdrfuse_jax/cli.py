"""What the `bin/` scripts share: one-line errors for flags and config files, the summary of
a folder fusion.

Imports nothing heavy (no jax), so a script can parse its flags before loading the library.
"""

from __future__ import annotations

import re
import sys
from typing import NoReturn

from absl import flags

WEIGHTS_HELP = "published .model/.pth, the project's .npz, or an orbax checkpoint folder"


def add_weights_arguments(parser) -> None:
  """`--weights FILE` (required) and `--model student|teacher`, as the fusion scripts take them."""
  parser.add_argument("--weights", required=True, help=WEIGHTS_HELP)
  parser.add_argument("--model", choices=("student", "teacher"), default="student")


def config_error(e: Exception, flag: str = "config") -> str:
  """One line for a config file or `--<flag>.x` override that cannot be used."""
  text = " ".join(str(e).replace("\\n", " ").split()).strip("'\"")
  suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if suggestion:
    return (f"--{flag}: no field {suggestion.group(2)!r} in the config; did you mean "
            f"{suggestion.group(1)!r}?")
  missing = re.search(r"Attempted \[.*?\]: (\S+) \[Errno 2\]", text)
  if missing:
    return f"--{flag}={missing.group(1)}: no such config file"
  return f"--{flag}: {text[:300]}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a bad flag, config file or override as one line and exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except Exception as e:  # config_flags raises many types for a file or override it rejects.
    print(f"error: {config_error(e)}", file=sys.stderr)
  sys.exit(2)


def ignore_closed_event_loop_reports() -> None:
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


def exit_after_error(message: str) -> NoReturn:
  """Prints `error: message` and leaves at once with exit code 1.

  After a failed write (a full disk), the writer threads of orbax, tensorstore and
  tensorboardX would print tracebacks while the interpreter shuts down, retrying writes that
  cannot succeed. Everything that could be saved is saved: leave without them.
  """
  import os  # pylint: disable=g-import-not-at-top

  print(f"error: {message}", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1)


def finish_folder_fusion(result, earlier_problems: int, out_dir, stop) -> int:
  """Prints how a folder fusion ended (`batch_fuse.fuse_pairs`' result); returns the exit code.

  Args:
    result: the `batch_fuse.BatchResult`.
    earlier_problems: problems reported before fusing (pairs without a partner, say).
    out_dir: the output folder.
    stop: the run's `interrupts.StopRequest`.

  Returns:
    128 + signal when a stop left pairs unfused, 1 when any problem was reported, else 0.
  """
  from mmdrfuse_jax import interrupts  # pylint: disable=g-import-not-at-top

  skipped = earlier_problems + len(result.problems)
  if stop.signum is not None and result.not_started:
    print(f"stopped by {interrupts.signal_name(stop.signum)}: {result.written} image(s) written "
          f"to {out_dir} are complete, {result.not_started} pair(s) not fused", file=sys.stderr)
    return interrupts.exit_code(stop.signum)
  print(f"fused {result.written} pair(s) into {out_dir}"
        + (f"; {skipped} problem(s) reported" if skipped else ""))
  return 1 if skipped else 0
