#!/usr/bin/env python
"""Fuses infrared/visible (or PET/SPECT/CT + MRI) image pairs with MMDRFuse weights.

Runs `mmdrfuse_jax.tools.fuse` from a checkout (installed, the same tool is the
`mmdrfuse-fuse` command). Flags: `python bin/fuse.py --help`.
"""

import sys

from mmdrfuse_jax.tools.fuse import main

if __name__ == "__main__":
  sys.exit(main())
