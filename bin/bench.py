#!/usr/bin/env python
"""Benchmarks: `python bin/bench.py SUBCOMMAND --help`. The last line printed is JSON."""

import argparse
import sys

from mmdrfuse_jax.benchmarks import common, infer, metrics, pipeline, train_step

# Each module has add_parser(subparsers) that registers its subcommand with a `run` default.
BENCHMARKS = [infer, pipeline, metrics, train_step]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  subparsers = parser.add_subparsers(dest="command", required=True)
  for module in BENCHMARKS:
    module.add_parser(subparsers)
  args = parser.parse_args(argv)
  common.print_result(args.run(args))
  return 0


if __name__ == "__main__":
  sys.exit(main())
