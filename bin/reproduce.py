#!/usr/bin/env python
"""Reproduces the published student end to end, then compares it with reference weights.

Runs `mmdrfuse_jax.tools.reproduce` from a checkout (installed, the same tool is the
`mmdrfuse-reproduce` command). Flags: `python bin/reproduce.py --help`.
"""

import sys

from mmdrfuse_jax.tools.reproduce import main

if __name__ == "__main__":
  sys.exit(main())
