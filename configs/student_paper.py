"""Student distillation with the settings stated in the paper instead of the code's.

The config itself is `mmdrfuse_jax.configs.student_paper` (in the package, so that an
installed wheel trains too); this file is the path that `--config=configs/student_paper.py`
names.
"""

from mmdrfuse_jax.configs.student_paper import get_config

__all__ = ["get_config"]
