#!/usr/bin/env python
"""Plots the validation scores of training runs against their steps, as one SVG file.

Runs `mmdrfuse_jax.tools.plot_validation` from a checkout (installed, the same tool is the
`mmdrfuse-plot-validation` command). Flags: `python bin/plot_validation.py --help`.
"""

import sys

from mmdrfuse_jax.tools.plot_validation import main

if __name__ == "__main__":
  sys.exit(main())
