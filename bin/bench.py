#!/usr/bin/env python
"""Benchmarks: `python bin/bench.py SUBCOMMAND --help`. The last line printed is JSON.

Runs `mmdrfuse_jax.tools.bench` from a checkout (installed, the same tool is the
`mmdrfuse-bench` command). Flags: `python bin/bench.py --help`.
"""

import sys

from mmdrfuse_jax.tools.bench import main

if __name__ == "__main__":
  sys.exit(main())
