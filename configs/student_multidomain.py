"""A student for every domain (`mmdrfuse_jax.configs.student_multidomain`).

The config itself is in the package (so that an installed wheel trains too); this file is the
path that `--config=configs/student_multidomain.py` names.
"""

from mmdrfuse_jax.configs.student_multidomain import get_config

__all__ = ["get_config"]
