"""mmdrfuse_jax: MMDRFuse (ACM MM 2024) distilled image fusion in JAX/Flax.

The names below are the front door; each lives in the subpackage that says what it is:

- `mmdrfuse_jax.models`: the student and teacher networks, VGG-19, weight files;
- `mmdrfuse_jax.inference`: `fuse`, `Fuser`, folders, video, ONNX/StableHLO export;
- `mmdrfuse_jax.evaluation`: the field's metrics, folder scoring, the comparison report;
- `mmdrfuse_jax.data`: TFDS builders and the patch pipelines;
- `mmdrfuse_jax.train`: losses, dynamic refresh, distillation, the jitted update, the run loop;
- `mmdrfuse_jax.configs`: the training configs (`get_config()` files);
- `mmdrfuse_jax.io` and `mmdrfuse_jax.runtime`: files, images, signals, backends.

Importing the package imports no JAX: each name is loaded when first used, so command-line
tools start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# name -> the module that defines it.
_LAZY = {
    # Networks and weight files.
    "Student": "mmdrfuse_jax.models.networks",
    "Teacher": "mmdrfuse_jax.models.networks",
    "get_model": "mmdrfuse_jax.models.networks",
    "init_params": "mmdrfuse_jax.models.networks",
    "count_params": "mmdrfuse_jax.models.networks",
    "load_params": "mmdrfuse_jax.models.weight_files",
    "save_params": "mmdrfuse_jax.models.weight_files",
    # Fusion and export.
    "fuse": "mmdrfuse_jax.inference.fusion",
    "fuse_levels": "mmdrfuse_jax.inference.fusion",
    "Fuser": "mmdrfuse_jax.inference.fusion",
    "quantize": "mmdrfuse_jax.inference.fusion",
    "export_onnx": "mmdrfuse_jax.inference.export",
    "export_stablehlo": "mmdrfuse_jax.inference.export",
    # Evaluation.
    "all_metrics": "mmdrfuse_jax.evaluation.metrics",
    "evaluate": "mmdrfuse_jax.evaluation.scoring",
    # Training.
    "TrainState": "mmdrfuse_jax.train.update",
    "train_model": "mmdrfuse_jax.train.loop",
    # Errors.
    "MMDRFuseError": "mmdrfuse_jax.errors",
}

__all__ = [
    "__version__",
    "MMDRFuseError",
    "Fuser",
    "Student",
    "Teacher",
    "TrainState",
    "all_metrics",
    "count_params",
    "evaluate",
    "export_onnx",
    "export_stablehlo",
    "fuse",
    "fuse_levels",
    "get_model",
    "init_params",
    "load_params",
    "quantize",
    "save_params",
    "train_model",
]

if TYPE_CHECKING:  # What a type checker and an IDE see; at run time __getattr__ loads them.
  from mmdrfuse_jax.errors import MMDRFuseError
  from mmdrfuse_jax.evaluation.metrics import all_metrics
  from mmdrfuse_jax.evaluation.scoring import evaluate
  from mmdrfuse_jax.inference.export import export_onnx, export_stablehlo
  from mmdrfuse_jax.inference.fusion import Fuser, fuse, fuse_levels, quantize
  from mmdrfuse_jax.models.networks import Student, Teacher, count_params, get_model, init_params
  from mmdrfuse_jax.models.weight_files import load_params, save_params
  from mmdrfuse_jax.train.loop import train_model
  from mmdrfuse_jax.train.update import TrainState


def __getattr__(name: str) -> Any:
  module = _LAZY.get(name)
  if module is None:
    raise AttributeError(f"module 'mmdrfuse_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value  # Later lookups skip __getattr__.
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
