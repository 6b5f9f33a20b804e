"""Quickstart: teacher, then the student distilled from it, on procedural pairs, in minutes.

The config itself is `mmdrfuse_jax.configs.quickstart` (in the package, so that an installed wheel
trains too); this file is the path that `--config=configs/quickstart.py` names.
"""

from mmdrfuse_jax.configs.quickstart import get_config

__all__ = ["get_config"]
