#!/usr/bin/env python
"""Fuses two videos frame by frame, or two folders of frames, with MMDRFuse weights.

Runs `mmdrfuse_jax.tools.fuse_video` from a checkout (installed, the same tool is the
`mmdrfuse-fuse-video` command). Flags: `python bin/fuse_video.py --help`.
"""

import sys

from mmdrfuse_jax.tools.fuse_video import main

if __name__ == "__main__":
  sys.exit(main())
