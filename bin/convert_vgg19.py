#!/usr/bin/env python
"""Converts torchvision's VGG-19 weights to the project's format (no PyTorch needed).

Runs `mmdrfuse_jax.tools.convert_vgg19` from a checkout (installed, the same tool is the
`mmdrfuse-convert-vgg19` command). Flags: `python bin/convert_vgg19.py --help`.
"""

import sys

from mmdrfuse_jax.tools.convert_vgg19 import main

if __name__ == "__main__":
  sys.exit(main())
