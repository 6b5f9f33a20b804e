#!/usr/bin/env python
"""Builds a fusion dataset from its downloaded folder and prints its image and patch counts.

Runs `mmdrfuse_jax.tools.prepare_data` from a checkout (installed, the same tool is the
`mmdrfuse-prepare-data` command). Flags: `python bin/prepare_data.py --help`.
"""

import sys

from mmdrfuse_jax.tools.prepare_data import main

if __name__ == "__main__":
  sys.exit(main())
