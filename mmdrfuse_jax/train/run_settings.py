"""The settings of a training run that no run can use, found before any work.

`check_config` refuses them with one line (`ConfigError`). The checks are those of
`run_spec.RunSpec.from_config`, which reads a config into the run spec; this module keeps the
names that code importing them from here uses (`TrainingError`, the base of every refusal of
a run's inputs, `ConfigError`, `uses_teacher_cache`), all defined in `run_spec.py`.
"""

from __future__ import annotations

import ml_collections

from mmdrfuse_jax.train.run_spec import (
  TEACHER_CACHE_CHOICES,
  ConfigError,
  RunSpec,
  TrainingError,
  uses_teacher_cache,
)

__all__ = ["TEACHER_CACHE_CHOICES", "ConfigError", "TrainingError", "check_config",
           "uses_teacher_cache"]


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one line) for settings no run can use (`RunSpec.from_config`)."""
  RunSpec.from_config(config)
