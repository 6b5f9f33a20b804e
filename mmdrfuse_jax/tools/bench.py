"""Benchmarks: `python bin/bench.py SUBCOMMAND --help`. The last line printed is JSON.

SIGINT/SIGTERM stop a benchmark at once with one line (exit 130/143); `suite` keeps the
results it had written.
"""

import argparse
import sys

from mmdrfuse_jax.benchmarks import (
  common,
  infer,
  memory_write,
  metrics,
  pipeline,
  precision_error,
  suite,
  torch_baseline,
  train_step,
  video,
)
from mmdrfuse_jax.runtime import backend, interrupts

# Each module has add_parser(subparsers) that registers its subcommand with a `run` default.
BENCHMARKS = [infer, pipeline, metrics, train_step, memory_write, precision_error, video,
              torch_baseline, suite]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  subparsers = parser.add_subparsers(dest="command", required=True)
  for module in BENCHMARKS:
    module.add_parser(subparsers)
  args = parser.parse_args(argv)
  backend.report(backend.stderr_log)  # stderr: the last line of stdout stays the JSON
  try:
    with interrupts.raise_on_signals():
      result = args.run(args)
  except interrupts.Interrupted as e:
    print(f"stopped by {interrupts.signal_name(e.signum)}: {args.command} not finished",
          file=sys.stderr)
    return interrupts.exit_code(e.signum)
  common.print_result(result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
