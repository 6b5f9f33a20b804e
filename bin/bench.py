#!/usr/bin/env python
"""Benchmarks: `python bin/bench.py SUBCOMMAND --help`. The last line printed is JSON."""

import argparse
import sys

from mmdrfuse_jax import backend
from mmdrfuse_jax.benchmarks import (
    common,
    infer,
    metrics,
    pipeline,
    precision_error,
    suite,
    train_step,
)

# Each module has add_parser(subparsers) that registers its subcommand with a `run` default.
BENCHMARKS = [infer, pipeline, metrics, train_step, precision_error, suite]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  subparsers = parser.add_subparsers(dest="command", required=True)
  for module in BENCHMARKS:
    module.add_parser(subparsers)
  args = parser.parse_args(argv)
  backend.report(backend.stderr_log)  # stderr: the last line of stdout stays the JSON
  common.print_result(args.run(args))
  return 0


if __name__ == "__main__":
  sys.exit(main())
