"""Teacher training as in the published code (SPEC sections 3-5).

The config itself is `mmdrfuse_jax.configs.teacher` (in the package, so that an installed wheel
trains too); this file is the path that `--config=configs/teacher.py` names.
"""

from mmdrfuse_jax.configs.teacher import get_config

__all__ = ["get_config"]
