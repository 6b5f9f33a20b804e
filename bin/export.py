#!/usr/bin/env python
"""Exports MMDRFuse weights as a StableHLO or ONNX file that runs without this project.

Runs `mmdrfuse_jax.tools.export` from a checkout (installed, the same tool is the
`mmdrfuse-export` command). Flags: `python bin/export.py --help`.
"""

import sys

from mmdrfuse_jax.tools.export import main

if __name__ == "__main__":
  sys.exit(main())
