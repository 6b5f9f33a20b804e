"""The ablation grid behind docs/domains.md (`mmdrfuse_jax.configs.ablation_multidomain`).

The grid itself is in the package (so that an installed wheel runs it too); this file is the
path that `--grid=configs/ablation_multidomain.py` names.
"""

from mmdrfuse_jax.configs.ablation_multidomain import get_grid

__all__ = ["get_grid"]
