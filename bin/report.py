#!/usr/bin/env python
"""Writes one self-contained HTML page comparing fusion methods on the same image pairs.

Runs `mmdrfuse_jax.tools.report` from a checkout (installed, the same tool is the
`mmdrfuse-report` command). Flags: `python bin/report.py --help`.
"""

import sys

from mmdrfuse_jax.tools.report import main

if __name__ == "__main__":
  sys.exit(main())
