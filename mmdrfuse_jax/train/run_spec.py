"""A training run's settings, read from its config once: the run spec.

`RunSpec.from_config(config)` reads every setting of an ml_collections config, refuses the
settings no run can use with one line (`ConfigError`) and returns frozen, typed dataclasses.
A config starts from `mmdrfuse_jax.configs.default.get_config`, so every key exists and each
default is written once, there: nothing here supplies a value the config lacks (a missing key
is a `ConfigError` naming it).

`loop.train_model` builds the spec at the top of a run (or takes one built already, as
`stages.run` does) and passes it, or its parts, down: nothing below reads the config. The
spec also keeps what the run records of the config itself, computed once: its JSON
(`WORKDIR/config.json`, TensorBoard's Text tab) and its flattened settings (the run record's
identity, `run_record.py`).

`TrainingError` is the base of every refusal of a run's inputs; the loop (`loop.py`), the run
record (`run_record.py`) and the checkpoints (`run_checkpoints.py`) raise it too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import ml_collections
import optax

from mmdrfuse_jax.data import augment
from mmdrfuse_jax.errors import MMDRFuseError
from mmdrfuse_jax.evaluation import scoring
from mmdrfuse_jax.models import networks
from mmdrfuse_jax.models import precision as precision_lib
from mmdrfuse_jax.train import losses, refresh, update


class TrainingError(MMDRFuseError, RuntimeError):
  """A user-facing problem with a run's inputs (message is one line)."""


class ConfigError(TrainingError):
  """Settings no run can use, found before any work (`RunSpec.from_config`; one line)."""


# Where a student run gets its frozen teacher's targets (`config.teacher_cache`).
TEACHER_CACHE_CHOICES = ("auto", "host", "off")


def uses_teacher_cache(setting: str, backend: str | None = None, *,
                       augmented: bool = False) -> bool:
  """Whether a student run keeps its teacher's targets in host RAM (`config.teacher_cache`).

  Never where photometric augmentation changes the patches every epoch (`augmented`; see
  `AugmentSpec.changes_every_epoch`): a patch's teacher targets change with its inputs, and
  targets kept from an earlier epoch would not be those of the inputs the student sees. "auto"
  then computes them in the step; "host" is refused when the spec is read.
  """
  if augmented:
    return False
  if setting == "auto":
    return (backend or jax.default_backend()) == "cpu"
  return setting == "host"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """A config (or a nested mapping) as one dict of dotted keys: {"optim.lr": 1e-4, ...}."""
  if hasattr(tree, "to_dict"):
    tree = tree.to_dict()
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(flatten(value, f"{prefix}{key}."))
  return flat


# ----------------------------------------------------------------------------- the spec


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """`config.data.augment`: photometric augmentation of the training patches."""

  enabled: bool
  exposure: float
  gamma: float
  contrast: float
  per_patch: bool

  @property
  def changes_every_epoch(self) -> bool:
    """Whether a patch's inputs differ from epoch to epoch (augmentation drawn per step)."""
    return self.enabled and not self.per_patch

  def photometric(self) -> augment.Photometric | None:
    """The augmentation the pipeline applies (None when off)."""
    if not self.enabled:
      return None
    return augment.Photometric(self.exposure, self.gamma, self.contrast, self.per_patch)


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """`config.data`: the training patches (see configs/default.py for each field).

  Attributes:
    datasets: the built datasets trained on (`config.data.dataset`, split at its commas);
      empty when none is named.
    weights: their shares of every epoch (`config.data.weights`); None: in proportion to
      their patches.
  """

  datasets: tuple[str, ...]
  weights: tuple[float, ...] | None
  data_dir: str
  split: str
  holdout: float
  augment: AugmentSpec
  patch_size: int
  patch_stride: int
  synthetic_pairs: int
  synthetic_height: int
  synthetic_width: int
  streaming: str

  @property
  def synthetic(self) -> bool:
    """Whether the run trains on the package's procedural pairs."""
    return self.synthetic_pairs > 0


@dataclasses.dataclass(frozen=True)
class OptimSpec:
  """`config.optim`: Adam and its learning-rate schedule."""

  lr: float
  b1: float
  b2: float
  eps: float
  schedule: str
  warmup_steps: int
  final_lr_fraction: float

  def optimizer(self, total_steps: int) -> optax.GradientTransformation:
    """Adam with these settings for a run of `total_steps` steps (`update.make_optimizer`)."""
    return update.make_optimizer(self.lr, self.b1, self.b2, self.eps, schedule=self.schedule,
                                 warmup_steps=self.warmup_steps, total_steps=total_steps,
                                 final_lr_fraction=self.final_lr_fraction)


@dataclasses.dataclass(frozen=True)
class InitSpec:
  """`config.init`: how a fresh model starts."""

  conv1_bias: float


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """`config.loss`: the terms' weights and forms (the loss part of `update.StepConfig`)."""

  weights: losses.LossWeights
  gradient_form: str
  distill_normalize: str
  perception: str
  alive_margin: float


@dataclasses.dataclass(frozen=True)
class FrozenSpec:
  """The frozen networks' files: VGG-19 and, for a student, its teacher."""

  vgg_weights: str
  allow_random_vgg: bool
  random_vgg_seed: int
  teacher_weights: str


@dataclasses.dataclass(frozen=True)
class ValidationSpec:
  """`config.validation`, checked (see configs/default.py for the meaning of each field).

  Attributes:
    source: where the pairs come from: "folders" (`ir_dir` and `vis_dir`), "split" (a split
      of the run's built dataset), "synthetic" (procedural pairs) or "" (no validation).
    datasets: with source "split", the built datasets whose split is validated on (the run's
      own unless `config.validation.datasets` names others).
    names: the metrics scored (canonical names).
    best_metric: the canonical name of the metric whose best parameters are kept, or "".
  """

  source: str
  ir_dir: str
  vis_dir: str
  split: str
  datasets: tuple[str, ...]
  synthetic_pairs: int
  synthetic_height: int
  synthetic_width: int
  every_steps: int
  max_pairs: int
  names: tuple[str, ...]
  num_images: int
  best_metric: str

  @property
  def enabled(self) -> bool:
    return bool(self.source)

  def due(self, step: int, total_steps: int) -> bool:
    """Whether the run validates after `step`: every `every_steps` steps and at the end."""
    if not self.enabled:
      return False
    return step == total_steps or (self.every_steps > 0 and step % self.every_steps == 0)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """A run's settings, read and checked once (`from_config`); frozen and hashable.

  The fields mirror the config's (configs/default.py says what each means); the frozen
  networks' files are grouped in `frozen`, the loss in `loss`, and `refresh` is the step's
  own `refresh.RefreshConfig`.

  Attributes:
    config_json: the config as JSON, as the run writes it (`WORKDIR/config.json`, TensorBoard).
    settings: the config's flattened settings, sorted by key (`flatten`): the run record
      compares a rerun's with the recorded ones (`run_record.claim_workdir`).
  """

  model: str
  seed: int
  batch_size: int
  num_epochs: int
  data: DataSpec
  optim: OptimSpec
  init: InitSpec
  loss: LossSpec
  refresh: refresh.RefreshConfig
  precision: str
  frozen: FrozenSpec
  teacher_cache: str
  teacher_cache_dir: str
  validation: ValidationSpec
  log_every_steps: int
  checkpoint_every_steps: int
  keep_checkpoints: int
  progress_bar: bool
  start_fresh: bool
  config_json: str
  settings: tuple[tuple[str, Any], ...]

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> RunSpec:
    """Reads and checks every setting of `config` (see the module docstring).

    Raises:
      ConfigError: a setting no run can use, or one the config lacks (one line).
    """
    return _read(config)

  def step_config(self, steps_per_epoch: int) -> update.StepConfig:
    """The train step's static settings, for a dataset of `steps_per_epoch` batches."""
    return update.StepConfig(
        model=self.model, weights=self.loss.weights, refresh=self.refresh,
        gradient_form=self.loss.gradient_form, distill_normalize=self.loss.distill_normalize,
        steps_per_epoch=steps_per_epoch, precision=self.precision,
        perception=self.loss.perception, alive_margin=self.loss.alive_margin)

  @property
  def needs_vgg(self) -> bool:
    """Whether a loss term that is on reads VGG-19 (perception, or a refresh loss)."""
    return self.step_config(steps_per_epoch=1).output_taps > 0


def as_spec(run: RunSpec | ml_collections.ConfigDict) -> RunSpec:
  """`run` itself when it is a spec already, else its config read into one (`from_config`)."""
  return run if isinstance(run, RunSpec) else RunSpec.from_config(run)


# ------------------------------------------------------------------------ reading a config


def _real(value: Any) -> float | None:
  """`value` as a finite float, or None (not a number, a bool, NaN or infinite)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if math.isfinite(value) else None


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


class _Settings:
  """The flattened config, read by dotted key: each read names the key that is wrong.

  The readers convert as the run uses the value; the checking ones raise `ConfigError` with
  the one line the user sees.
  """

  def __init__(self, flat: dict[str, Any]):
    self._flat = flat

  def __call__(self, key: str) -> Any:
    """The raw value of `key`."""
    try:
      return self._flat[key]
    except KeyError:
      raise ConfigError(f"config.{key} is missing: a training config starts from "
                        "mmdrfuse_jax.configs.default.get_config(model), which sets every "
                        "key") from None

  def converted(self, key: str, kind: Callable[[Any], Any], what: str) -> Any:
    """`kind(value)`, or a ConfigError saying the value is not `what`."""
    value = self(key)
    try:
      return kind(value)
    except (TypeError, ValueError):
      raise ConfigError(f"config.{key} must be {what}, got {value!r}") from None

  def integer(self, key: str) -> int:
    return self.converted(key, int, "an integer")

  def number(self, key: str) -> float:
    return self.converted(key, float, "a number")

  def text(self, key: str) -> str:
    return str(self(key))

  def flag(self, key: str) -> bool:
    return bool(self(key))

  def choice(self, key: str, choices: tuple[str, ...]) -> str:
    value = self(key)
    if value not in choices:
      raise ConfigError(f"config.{key} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)

  def positive_int(self, key: str) -> int:
    value = self(key)
    if not _is_int(value) or value < 1:
      raise ConfigError(f"config.{key} must be a positive integer, got {value!r}")
    return int(value)

  def positive_number(self, key: str) -> float:
    # Adam's step size and eps: 0 or below would not train (below 0: gradient ascent), or
    # divide by 0, or flip the step's sign.
    real = _real(self(key))
    if real is None or real <= 0:
      raise ConfigError(f"config.{key} must be a positive number, got {self(key)!r}")
    return real

  def decay_rate(self, key: str) -> float:
    # Adam's decay rates: 1 or more never forgets (and divides by 0 in the bias correction).
    real = _real(self(key))
    if real is None or not 0 <= real < 1:
      raise ConfigError(f"config.{key} must be in [0, 1), got {self(key)!r}")
    return real


def _read(config: ml_collections.ConfigDict) -> RunSpec:
  """`RunSpec.from_config`. The checks run in the order they always have, so that a config
  with several mistakes is refused for the same one first."""
  flat = flatten(config)
  get = _Settings(flat)

  model = get("model")
  if model not in networks.MODELS:
    raise ConfigError(f"config.model must be one of {sorted(networks.MODELS)}, got {model!r}")
  holdout = _real(get("data.holdout"))
  if holdout is None or not 0.0 <= holdout < 1.0:
    raise ConfigError(f"config.data.holdout must be a fraction in [0, 1), got "
                      f"{get('data.holdout')!r}")
  batch_size = get.positive_int("batch_size")
  num_epochs = get.positive_int("num_epochs")
  log_every_steps = get.positive_int("log_every_steps")
  checkpoint_every_steps = get.positive_int("checkpoint_every_steps")
  keep_checkpoints = get.positive_int("keep_checkpoints")
  patch_size = get.positive_int("data.patch_size")
  patch_stride = get.positive_int("data.patch_stride")
  optim = _optim(get)
  loss = _loss(get, str(model))
  conv1_bias = _real(get("init.conv1_bias"))
  if conv1_bias is None:
    raise ConfigError(f"config.init.conv1_bias must be a finite number, got "
                      f"{get('init.conv1_bias')!r}")
  precision = get.choice("precision", precision_lib.MODES)
  teacher_cache = get.choice("teacher_cache", TEACHER_CACHE_CHOICES)
  refresh_config = _refresh(get)
  data = _data(get, holdout, patch_size, patch_stride)
  if teacher_cache == "host" and data.augment.changes_every_epoch:
    raise ConfigError("config.teacher_cache='host' keeps each patch's teacher targets from "
                      "the first epoch, but config.data.augment changes the patches every "
                      "epoch; use 'auto' or 'off' (the teacher then runs in every step), or "
                      "config.data.augment.per_patch=True")
  validation = _validation(get, data)
  return RunSpec(
      model=str(model), seed=get.integer("seed"), batch_size=batch_size, num_epochs=num_epochs,
      data=data, optim=optim, init=InitSpec(conv1_bias=conv1_bias), loss=loss,
      refresh=refresh_config, precision=precision,
      frozen=FrozenSpec(vgg_weights=get.text("vgg_weights"),
                        allow_random_vgg=get.flag("allow_random_vgg"),
                        random_vgg_seed=get.integer("random_vgg_seed"),
                        teacher_weights=get.text("teacher_weights")),
      teacher_cache=teacher_cache, teacher_cache_dir=get.text("teacher_cache_dir"),
      validation=validation, log_every_steps=log_every_steps,
      checkpoint_every_steps=checkpoint_every_steps, keep_checkpoints=keep_checkpoints,
      progress_bar=get.flag("progress_bar"), start_fresh=get.flag("start_fresh"),
      config_json=config.to_json_best_effort(indent=2), settings=tuple(sorted(flat.items())))


def _optim(get: _Settings) -> OptimSpec:
  lr, eps = get.positive_number("optim.lr"), get.positive_number("optim.eps")
  b1, b2 = get.decay_rate("optim.b1"), get.decay_rate("optim.b2")
  schedule = get.choice("optim.schedule", update.SCHEDULES)
  warmup = get("optim.warmup_steps")
  if not _is_int(warmup) or warmup < 0:
    raise ConfigError(f"config.optim.warmup_steps must be a non-negative integer, got {warmup!r}")
  final = _real(get("optim.final_lr_fraction"))
  if final is None or not 0.0 <= final <= 1.0:
    raise ConfigError(f"config.optim.final_lr_fraction must be in [0, 1], got "
                      f"{get('optim.final_lr_fraction')!r}")
  return OptimSpec(lr=lr, b1=b1, b2=b2, eps=eps, schedule=schedule, warmup_steps=int(warmup),
                   final_lr_fraction=final)


def _loss(get: _Settings, model: str) -> LossSpec:
  perception = get.choice("loss.perception", update.PERCEPTION_SPACES)
  if perception == "teacher" and model != "student":
    raise ConfigError("config.loss.perception=teacher is for students (a teacher run has no "
                      "teacher to see with); use vgg")
  weights = losses.LossWeights(**{f.name: get.number(f"loss.{f.name}")
                                  for f in dataclasses.fields(losses.LossWeights)})
  return LossSpec(weights=weights,
                  gradient_form=get.choice("loss.gradient_form", losses.GRADIENT_FORMS),
                  distill_normalize=get.choice("loss.distill_normalize",
                                               losses.DISTILL_NORMALIZATIONS),
                  perception=perception,
                  alive_margin=get.positive_number("loss.alive_margin"))


def _refresh(get: _Settings) -> refresh.RefreshConfig:
  placement = get.choice("refresh.placement", refresh.PLACEMENTS)
  if placement == "host" and not update.has_pinned_host():
    raise ConfigError(f"config.refresh.placement=host needs pinned host memory, which "
                      f"{jax.default_backend()} devices do not have; use sharded or replicated")
  return refresh.RefreshConfig(
      memories=tuple(kind.name for kind in refresh.MEMORY_KINDS
                     if get.flag(f"refresh.{kind.name}")),
      per_sample=get.flag("refresh.per_sample"),
      memory_dtype=get.choice("refresh.memory_dtype", refresh.MEMORY_DTYPES),
      weight_scale=get.number("refresh.weight_scale"), placement=placement)


def _data(get: _Settings, holdout: float, patch_size: int, patch_stride: int) -> DataSpec:
  from mmdrfuse_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  dataset, weights_text = get.text("data.dataset"), get.text("data.weights")
  synthetic_pairs = get.integer("data.synthetic_pairs")
  if synthetic_pairs > 0 and dataset:
    raise ConfigError(
        f"config.data names both a dataset ({get('data.dataset')!r}) and procedural pairs "
        f"(synthetic_pairs={get('data.synthetic_pairs')}); to train on the dataset add "
        "--config.data.synthetic_pairs=0")
  names: list[str] = []
  weights = None
  if dataset:
    try:
      names, weights = pipeline.mixture_spec(dataset, weights_text)
    except ValueError as e:
      raise ConfigError(f"config.data.dataset / config.data.weights: {e}") from None
  a = AugmentSpec(enabled=get.flag("data.augment.enabled"),
                  exposure=get.number("data.augment.exposure"),
                  gamma=get.number("data.augment.gamma"),
                  contrast=get.number("data.augment.contrast"),
                  per_patch=get.flag("data.augment.per_patch"))
  try:
    a.photometric()  # Checks the spreads of an augmentation that is on.
  except ValueError as e:
    raise ConfigError(f"config.data.augment: {e}") from None
  if isinstance(get("data.streaming"), bool):  # The pipeline's own True and False.
    streaming = "on" if get("data.streaming") else "off"
  else:
    streaming = get.choice("data.streaming", pipeline.STREAMING_CHOICES)
  return DataSpec(
      datasets=tuple(names), weights=None if weights is None else tuple(weights),
      data_dir=get.text("data.data_dir"), split=get.text("data.split"), holdout=holdout,
      augment=a, patch_size=patch_size, patch_stride=patch_stride,
      synthetic_pairs=synthetic_pairs, synthetic_height=get.integer("data.synthetic_height"),
      synthetic_width=get.integer("data.synthetic_width"), streaming=streaming)


def _validation(get: _Settings, data: DataSpec) -> ValidationSpec:
  """`config.validation`, checked against the run's data."""
  ir_dir, vis_dir = get.text("validation.ir_dir"), get.text("validation.vis_dir")
  split = get.text("validation.split")
  sources = []
  if ir_dir or vis_dir:
    if not (ir_dir and vis_dir):
      raise ConfigError("config.validation needs both ir_dir and vis_dir (or neither)")
    sources.append("folders")
  if split:
    if not (data.datasets and data.data_dir) or data.synthetic_pairs:
      raise ConfigError(
          f"config.validation.split={split!r} is a split of the run's built dataset, but the "
          "run trains on no built dataset (config.data.dataset and data_dir)")
    if split == "holdout" and not data.holdout > 0:
      raise ConfigError("config.validation.split='holdout' validates on the pairs that "
                        "config.data.holdout keeps out of training, but it is 0")
    sources.append("split")
  datasets = data.datasets
  if get.text("validation.datasets"):
    if not split:
      raise ConfigError("config.validation.datasets chooses the built datasets of "
                        "config.validation.split, which is not set")
    from mmdrfuse_jax.data import pipeline  # pylint: disable=g-import-not-at-top

    try:
      datasets = tuple(pipeline.mixture_spec(get.text("validation.datasets"))[0])
    except ValueError as e:
      raise ConfigError(f"config.validation.datasets: {e}") from None
  counts = {}
  for key in ("every_steps", "max_pairs", "num_images", "synthetic_pairs", "synthetic_height",
              "synthetic_width"):
    counts[key] = get(f"validation.{key}")
  if _is_int(counts["synthetic_pairs"]) and counts["synthetic_pairs"] > 0:
    sources.append("synthetic")
  if len(sources) > 1:
    raise ConfigError(f"config.validation names several sources ({', '.join(sources)}); "
                      "give one: ir_dir+vis_dir, split, or synthetic_pairs")
  for key, value in counts.items():
    if not _is_int(value) or value < 0:
      raise ConfigError(f"config.validation.{key} must be an integer >= 0, got {value!r}")
  try:
    names = scoring.parse_metric_names(get.text("validation.metrics"))
  except ValueError as e:
    raise ConfigError(f"config.validation.metrics: {e}") from None
  best_metric = get.text("validation.best_metric")
  best = ""
  if best_metric:
    best = {n.lower(): n for n in names}.get(best_metric.lower(), "")
    if not best:
      raise ConfigError(f"config.validation.best_metric={get('validation.best_metric')!r} is "
                        f"not one of the validation metrics ({', '.join(names)})")
  return ValidationSpec(
      source=sources[0] if sources else "", ir_dir=ir_dir, vis_dir=vis_dir, split=split,
      datasets=datasets if split else (), names=names, best_metric=best, **counts)
