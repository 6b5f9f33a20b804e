#!/usr/bin/env python
"""Trains the rows of an ablation grid and tables their validation scores.

Runs `mmdrfuse_jax.tools.ablate` from a checkout (installed, the same tool is the
`mmdrfuse-ablate` command). Flags: `python bin/ablate.py --help`.
"""

import sys

from mmdrfuse_jax.tools.ablate import main

if __name__ == "__main__":
  sys.exit(main())
