"""What the command-line tools share: argparse with one-line errors, `--config` files with
overrides, the summary of a folder fusion.

Imports nothing heavy (no jax), so a tool can parse its flags before loading the library.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Any, Callable, NoReturn, Sequence

from mmdrfuse_jax.errors import MMDRFuseError
from mmdrfuse_jax.runtime import config_flags

WEIGHTS_HELP = "published .model/.pth, the project's .npz, or an orbax checkpoint folder"
MODEL_HELP = "the network --weights must hold; default: the one its layers are"


def add_weights_arguments(parser) -> None:
  """`--weights FILE` (required) and `--model student|teacher`, as the fusion scripts take them.

  `--model` defaults to None: `weight_files.load_params(args.weights, args.model)` then loads
  the network the file holds, and a `--model` given that the file is not is refused.
  """
  parser.add_argument("--weights", required=True, help=WEIGHTS_HELP)
  parser.add_argument("--model", choices=("student", "teacher"), default=None, help=MODEL_HELP)


def add_output_arguments(parser, unit: str = "image") -> None:
  """`--output minmax|clip` and `--color`, as the fusion tools take them (`unit`: "image" or
  "frame", for the help)."""
  parser.add_argument("--output", choices=("minmax", "clip"), default="minmax",
                      help=f"minmax: stretch each {unit} to 0..255 (published); clip: clip to "
                      "[0, 1]")
  parser.add_argument("--color", action="store_true",
                      help="fuse the luma and put back the chroma of the input that has colour "
                      "(the visible one's when both have; gray when neither has)")


class UsageError(MMDRFuseError, ValueError):
  """A command line that the tool cannot use; the message is one line."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse, raising `UsageError` instead of printing the usage and exiting.

  Prefixes of long options are not accepted (`--work` is not `--workdir`), so a new flag
  never changes what an old command line means.
  """

  def __init__(self, *args: Any, **kwargs: Any) -> None:
    kwargs.setdefault("allow_abbrev", False)
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message: str) -> NoReturn:
    raise UsageError(message)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *,
               configs: Sequence[str] = (), grids: Sequence[str] = (),
               check: Callable[[argparse.Namespace], str | None] | None = None,
               ) -> tuple[argparse.Namespace, dict[str, Any]] | int:
  """Parses `argv` (default: `sys.argv[1:]`), with config files and their overrides.

  Args:
    parser: the tool's parser; each name in `configs` and `grids` is one of its options (the
      file).
    argv: the arguments, without the program name.
    configs: options that name a config file and take `--NAME.field=value` overrides.
    grids: options that name a grid file (`get_grid()`: {row name: config}); an override
      `--NAME.field=value` sets the field in every row.
    check: called with the parsed flags before any config file loads; a message it returns
      is the error (flags that contradict each other, say).

  Returns:
    The arguments and each loaded config or grid (None where its option was not given); or the exit
    code, after printing one line (2: a bad command line, config file or override) or the
    help (0).
  """
  argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
  try:
    rest, overrides = config_flags.split_overrides(argv, (*configs, *grids))
    args, unexpected = parser.parse_known_args(rest)
    if unexpected:
      raise UsageError(f"unexpected arguments: {' '.join(unexpected)}")
    problem = check(args) if check is not None else None
    if problem:
      raise UsageError(problem)
    loaded: dict[str, Any] = {}
    for name in (*configs, *grids):
      spec = getattr(args, name)
      if spec is None:
        if overrides[name]:
          raise UsageError(f"--{name}.{overrides[name][0][0]} given without --{name}")
        loaded[name] = None
      elif name in configs:
        loaded[name] = config_flags.apply_overrides(
            config_flags.load_config(spec, flag=name), overrides[name], flag=name)
      else:
        loaded[name] = {row: config_flags.apply_overrides(config, overrides[name], flag=name)
                        for row, config in config_flags.load_grid(spec, flag=name).items()}
  except (UsageError, config_flags.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except SystemExit as e:  # --help
    return int(e.code or 0)
  return args, loaded


def ignore_closed_event_loop_reports() -> None:
  """Drops the "Event loop is closed" reports of tensorstore's threads after a failed write.

  When a checkpoint write fails (a full disk), tensorstore's I/O threads may still call back
  into orbax's already closed asyncio loop; Python reports each through
  `sys.unraisablehook`, which prints a traceback from those threads, even before the run's
  own one-line error. They are not the cause (the run names it) and not a bug of ours; every
  other report is kept.

  Also drops asyncio's "Task exception was never retrieved" reports of tensorstore errors
  (a status code such as `DATA_LOSS:` first): after one array of a damaged checkpoint fails
  to read, the reads of its sibling arrays fail the same way, and their tasks report it when
  they are collected, after the tool's one-line error.
  """
  previous = sys.unraisablehook

  def unraisablehook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    previous(unraisable)

  sys.unraisablehook = unraisablehook
  logging.getLogger("asyncio").addFilter(_drop_unretrieved_tensorstore_errors)


_TENSORSTORE_STATUS = re.compile(r"^[A-Z][A-Z_]+: ")


def _drop_unretrieved_tensorstore_errors(record: logging.LogRecord) -> bool:
  """False (drop) for asyncio's report of an unretrieved task's tensorstore error."""
  if not record.getMessage().startswith("Task exception was never retrieved"):
    return True
  error = record.exc_info[1] if record.exc_info else None
  return not (error is not None and _TENSORSTORE_STATUS.match(str(error)))


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


def run_until_stopped(run: Callable[[Any, Any], int], args: Any, *, at_once: str) -> int:
  """`run(args, stop)` under an `interrupts.StopRequest`: a first SIGINT/SIGTERM sets `stop`
  (the tool ends after its current unit of work), a second raises KeyboardInterrupt here,
  which prints `stopped at once by a second interrupt; <at_once>` and gives exit code 130."""
  from mmdrfuse_jax.runtime import interrupts  # pylint: disable=g-import-not-at-top

  try:
    with interrupts.StopRequest() as stop:
      return run(args, stop)
  except KeyboardInterrupt:  # A second signal: stopped at once (no file is half-written).
    print(f"stopped at once by a second interrupt; {at_once}", file=sys.stderr)
    return interrupts.SIGINT_EXIT_CODE


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
  from mmdrfuse_jax.runtime import interrupts  # pylint: disable=g-import-not-at-top

  skipped = earlier_problems + len(result.problems)
  if stop.signum is not None and result.not_started:
    print(f"stopped by {interrupts.signal_name(stop.signum)}: {result.written} image(s) written "
          f"to {out_dir} are complete, {result.not_started} pair(s) not fused", file=sys.stderr)
    return interrupts.exit_code(stop.signum)
  print(f"fused {result.written} pair(s) into {out_dir}"
        + (f"; {skipped} problem(s) reported" if skipped else ""))
  return 1 if skipped else 0
