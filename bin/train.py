#!/usr/bin/env python
"""Trains the MMDRFuse teacher or student.

Runs `mmdrfuse_jax.tools.train` from a checkout (installed, the same tool is the
`mmdrfuse-train` command). Flags: `python bin/train.py --help`.
"""

import sys

from mmdrfuse_jax.tools.train import main

if __name__ == "__main__":
  sys.exit(main())
