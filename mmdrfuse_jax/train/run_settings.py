"""The settings of a training run that no run can use, found before any work.

`check_config` refuses them with one line (`ConfigError`); `TrainingError` is the base of every
refusal of a run's inputs. The loop (`loop.py`), the run record (`run_record.py`) and the
checkpoints (`run_checkpoints.py`) raise it.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from mmdrfuse_jax.errors import MMDRFuseError
from mmdrfuse_jax.models import networks
from mmdrfuse_jax.models import precision as precision_lib
from mmdrfuse_jax.train import refresh, update, validation


class TrainingError(MMDRFuseError, RuntimeError):
  """A user-facing problem with a run's inputs (message is one line)."""

class ConfigError(TrainingError):
  """Settings no run can use, found before any work (`check_config`; message is one line)."""

_POSITIVE_INTS = ("batch_size", "num_epochs", "log_every_steps", "checkpoint_every_steps",
                  "keep_checkpoints", "data.patch_size", "data.patch_stride")

# Adam's settings: a step size of 0 or below would not train (below 0: gradient ascent), decay
# rates of 1 or more never forget (and divide by 0 in the bias correction), an eps of 0 or
# below divides by 0 or flips the step's sign.
_POSITIVE_FLOATS = ("optim.lr", "optim.eps")

_DECAY_RATES = ("optim.b1", "optim.b2")

def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if hasattr(tree, "to_dict"):
    tree = tree.to_dict()
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(flatten(value, f"{prefix}{key}."))
  return flat

def _real(value: Any) -> float | None:
  """`value` as a finite float, or None (not a number, a bool, NaN or infinite)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if math.isfinite(value) else None

def check_config(config: Any) -> None:
  """Raises ConfigError (one line) for settings no run can use."""
  if config.model not in networks.MODELS:
    raise ConfigError(
        f"config.model must be one of {sorted(networks.MODELS)}, got {config.model!r}")
  flat = flatten(config)
  holdout = _real(flat.get("data.holdout", 0.0))
  if holdout is None or not 0.0 <= holdout < 1.0:
    raise ConfigError(f"config.data.holdout must be a fraction in [0, 1), got "
                      f"{flat.get('data.holdout')!r}")
  for key in _POSITIVE_INTS:
    value = flat[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"config.{key} must be a positive integer, got {value!r}")
  for key in _POSITIVE_FLOATS:
    real = _real(flat[key])
    if real is None or real <= 0:
      raise ConfigError(f"config.{key} must be a positive number, got {flat[key]!r}")
  for key in _DECAY_RATES:
    real = _real(flat[key])
    if real is None or not 0 <= real < 1:
      raise ConfigError(f"config.{key} must be in [0, 1), got {flat[key]!r}")
  if flat.get("optim.schedule", "constant") not in update.SCHEDULES:
    raise ConfigError(f"config.optim.schedule must be one of {', '.join(update.SCHEDULES)}, "
                      f"got {flat['optim.schedule']!r}")
  warmup = flat.get("optim.warmup_steps", 0)
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
    raise ConfigError(f"config.optim.warmup_steps must be a non-negative integer, got {warmup!r}")
  final = _real(flat.get("optim.final_lr_fraction", 0.0))
  if final is None or not 0.0 <= final <= 1.0:
    raise ConfigError(f"config.optim.final_lr_fraction must be in [0, 1], got "
                      f"{flat.get('optim.final_lr_fraction')!r}")
  perception = flat.get("loss.perception", "vgg")
  if perception not in update.PERCEPTION_SPACES:
    raise ConfigError(f"config.loss.perception must be one of "
                      f"{', '.join(update.PERCEPTION_SPACES)}, got {perception!r}")
  if perception == "teacher" and config.model != "student":
    raise ConfigError("config.loss.perception=teacher is for students (a teacher run has no "
                      "teacher to see with); use vgg")
  bias = _real(flat.get("init.conv1_bias", 0.0))
  if bias is None:
    raise ConfigError(f"config.init.conv1_bias must be a finite number, got "
                      f"{flat.get('init.conv1_bias')!r}")
  if config.get("precision", "exact") not in precision_lib.MODES:
    raise ConfigError(f"config.precision must be one of {', '.join(precision_lib.MODES)}, "
                      f"got {config.precision!r}")
  if config.get("teacher_cache", "auto") not in TEACHER_CACHE_CHOICES:
    raise ConfigError(f"config.teacher_cache must be one of {', '.join(TEACHER_CACHE_CHOICES)}"
                      f", got {config.teacher_cache!r}")
  placement = config.refresh.get("placement", "replicated")
  if placement not in refresh.PLACEMENTS:
    raise ConfigError(f"config.refresh.placement must be one of {', '.join(refresh.PLACEMENTS)}"
                      f", got {placement!r}")
  if placement == "host" and not update.has_pinned_host():
    raise ConfigError(f"config.refresh.placement=host needs pinned host memory, which "
                      f"{jax.default_backend()} devices do not have; use sharded or replicated")
  if int(config.data.synthetic_pairs) > 0 and config.data.dataset:
    raise ConfigError(
        f"config.data names both a dataset ({config.data.dataset!r}) and procedural pairs "
        f"(synthetic_pairs={config.data.synthetic_pairs}); to train on the dataset add "
        "--config.data.synthetic_pairs=0")
  try:
    validation.settings(config)
  except validation.ValidationError as e:
    raise ConfigError(str(e)) from None

TEACHER_CACHE_CHOICES = ("auto", "host", "off")

def uses_teacher_cache(setting: str, backend: str | None = None) -> bool:
  """Whether a student run keeps its teacher's targets in host RAM (`config.teacher_cache`)."""
  if setting == "auto":
    return (backend or jax.default_backend()) == "cpu"
  return setting == "host"
