#!/usr/bin/env python
"""Scores fused images with the metrics of the published tables.

Runs `mmdrfuse_jax.tools.evaluate` from a checkout (installed, the same tool is the
`mmdrfuse-evaluate` command). Flags: `python bin/evaluate.py --help`.
"""

import sys

from mmdrfuse_jax.tools.evaluate import main

if __name__ == "__main__":
  sys.exit(main())
