"""Trains the rows of an ablation grid one after another and tables their validation scores.

  python bin/ablate.py --grid=configs/ablation_multidomain.py --workdir=runs/ablation \\
      --grid.data.data_dir=~/tfds --grid.teacher_weights=pretrained_models/teacher.model

A grid file has `get_grid()`, returning {row name: config}; `--grid.FIELD=VALUE` sets a field
in every row (where the data and the frozen networks are, say). Each row trains in
WORKDIR/<row> exactly as `bin/train.py` would; after each row WORKDIR/ablation.md (and
ablation.json) holds a table: the settings in which each row differs from the first, its last
validation's scores, the best of the first metric and its step, and the wall time. Rerunning
the same command resumes: finished rows are not trained again.
"""

import sys
from typing import Sequence

from mmdrfuse_jax.runtime import cli, config_flags


def _parser() -> cli.ArgumentParser:
  parser = cli.ArgumentParser(prog="mmdrfuse-ablate", description=__doc__)
  parser.add_argument("--grid", required=True, metavar="FILE",
                      help="grid file with get_grid(), e.g. configs/ablation_multidomain.py; "
                      "--grid.FIELD=VALUE overrides a field in every row")
  parser.add_argument("--workdir", required=True,
                      help="directory of the grid: a folder per row, and the table")
  parser.add_argument("--rows", default="",
                      help="comma-separated row names to train, in the grid's order "
                      "(default: all); the table also holds the rows trained before")
  parser.add_argument("--stop_at_step", type=int, metavar="N",
                      help="train each row to step N at most (rows compared at equal steps in "
                      "less time); rerun without it to go on")
  parser.add_argument("--verbose", action="store_true",
                      help="keep the libraries' own logs (orbax logs every save)")
  return parser


def _rows_to_train(args, rows) -> list[str]:
  """The names of the rows to train (`--rows`, default all), checked against the grid's."""
  if not args.rows:
    return list(rows)
  wanted = [n.strip() for n in args.rows.split(",") if n.strip()]
  unknown = [n for n in wanted if n not in rows]
  if unknown:
    raise config_flags.ConfigError(
        f"--rows: no row {', '.join(map(repr, unknown))} in {args.grid} "
        f"(rows: {', '.join(rows)})")
  return wanted


def main(argv: Sequence[str] | None = None) -> int:
  parsed = cli.parse_args(_parser(), argv, grids=("grid",))
  if isinstance(parsed, int):
    return parsed
  args, loaded = parsed
  rows = loaded["grid"]
  try:
    wanted = _rows_to_train(args, rows)
  except config_flags.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  # Imported once the flags parse.
  from absl import logging

  from mmdrfuse_jax.benchmarks import common
  from mmdrfuse_jax.runtime import backend, interrupts
  from mmdrfuse_jax.train import ablation, loop, run_spec

  if not args.verbose:
    logging.set_verbosity(logging.FATAL)  # Orbax logs every save at INFO (see tools/train.py).
    cli.ignore_closed_event_loop_reports()
  backend.report(print)
  try:
    result = ablation.run_grid(rows, args.workdir, device=common.device_description(),
                               train=wanted, stop_at_step=args.stop_at_step)
  except run_spec.ConfigError as e:  # Every row's settings are checked before any trains.
    print(f"error: {e}", file=sys.stderr)
    return 2
  except loop.TrainingError as e:
    cli.exit_after_error(str(e))
  print(f"table: {args.workdir}/{ablation.SUMMARY_MD}")
  if result.interrupted_by is not None:
    return interrupts.exit_code(result.interrupted_by)
  return 0


if __name__ == "__main__":
  sys.exit(main())
