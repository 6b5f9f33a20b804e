"""The run spec: the config read once, every default from the config, nothing below reading it.

Also the run record's side of it: a workdir recorded before settings were added resumes.
"""

import ast
import dataclasses
import json
import pathlib

import pytest

from mmdrfuse_jax.configs import default
from mmdrfuse_jax.train import loop, run_record, run_spec, stages, update

PACKAGE = pathlib.Path(run_spec.__file__).resolve().parents[1]


def _flat(config):
  return run_spec.flatten(config)


def _set(config, key, value):
  *parents, name = key.split(".")
  for parent in parents:
    config = config[parent]
  config[name] = value


# ---------------------------------------------------------------- every default from the config


@pytest.mark.parametrize("model", ["student", "teacher"])
def test_a_setting_the_config_lacks_is_refused_not_defaulted(model):
  """Every key of configs/default.py is read from the config: without it, a one-line
  ConfigError names it (no default written a second time in the code)."""
  keys = sorted(_flat(default.get_config(model)))
  assert len(keys) > 60
  for key in keys:
    config = default.get_config(model)
    *parents, name = key.split(".")
    group = config
    for parent in parents:
      group = group[parent]
    del group[name]
    with pytest.raises(run_spec.ConfigError) as info:
      run_spec.RunSpec.from_config(config)
    assert str(info.value).startswith(f"config.{key} is missing"), (key, str(info.value))
    assert "\n" not in str(info.value)


# A valid value other than the default, for each setting that is not a number or a switch.
_OTHER_TEXT = {
    "model": "teacher", "data.dataset": "llvip", "data.weights": "1,3",
    "data.data_dir": "/elsewhere", "data.split": "val", "data.streaming": "on",
    "optim.schedule": "cosine", "loss.gradient_form": "paper", "loss.distill_normalize": "sample",
    "loss.perception": "teacher", "refresh.memory_dtype": "uint8", "refresh.placement": "sharded",
    "precision": "bfloat16", "vgg_weights": "/vgg.npz", "teacher_weights": "/teacher.npz",
    "teacher_cache": "off", "teacher_cache_dir": "/targets", "validation.ir_dir": "/ir2",
    "validation.vis_dir": "/vi2",
    "validation.split": "test", "validation.metrics": "VIF,SSIM", "validation.best_metric": "SSIM",
    "validation.datasets": "msrs,tno",
}
# Settings that others must accompany to stay valid.
_ALONG = {
    "data.synthetic_pairs": {"data.dataset": ""},
    "validation.split": {"validation.ir_dir": "", "validation.vis_dir": ""},
    "validation.datasets": {"validation.ir_dir": "", "validation.vis_dir": "",
                            "validation.split": "test"},
    "validation.synthetic_pairs": {"validation.ir_dir": "", "validation.vis_dir": ""},
}
# Where the spec keeps a setting, where it is not at the setting's own dotted path.
_FIELD = {
    "data.dataset": "data.datasets", "refresh.ssim": "refresh.memories",
    "refresh.gmsd": "refresh.memories", "validation.metrics": "validation.names",
    **{k: f"frozen.{k}" for k in ("vgg_weights", "allow_random_vgg", "random_vgg_seed",
                                  "teacher_weights")},
    **{f"loss.{f.name}": f"loss.weights.{f.name}"
       for f in dataclasses.fields(run_spec.losses.LossWeights)},
}


def _other(key, value):
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):
    return value / 2 if value else 0.5
  assert key in _OTHER_TEXT, f"{key}: a new setting; give it another valid value in _OTHER_TEXT"
  return _OTHER_TEXT[key]


def _field(spec, key):
  value = spec
  for name in _FIELD.get(key, key).split("."):
    value = getattr(value, name)
  return value


def _base():
  """The student's defaults where every setting counts: two built datasets, folders to validate."""
  config = default.get_config("student")
  config.data.dataset, config.data.data_dir = "msrs,llvip", "/data"
  config.validation.ir_dir, config.validation.vis_dir = "/ir", "/vi"
  return config


def test_changing_a_default_changes_the_spec():
  """Each setting of configs/default.py, changed in a copy of the config, changes the spec
  field that holds it: the spec reads its value from the config, for every key."""
  base = run_spec.RunSpec.from_config(_base())
  for key, value in _flat(_base()).items():
    config = _base()
    _set(config, key, _other(key, value))
    for along, along_value in _ALONG.get(key, {}).items():
      _set(config, along, along_value)
    spec = run_spec.RunSpec.from_config(config)
    assert _field(spec, key) != _field(base, key), key
    assert dict(spec.settings)[key] == _other(key, value), key


def test_the_spec_holds_the_configs_values():
  config = default.get_config("student")
  config.data.synthetic_pairs = 3
  config.data.augment.enabled = True
  config.optim.schedule, config.optim.warmup_steps = "cosine", 7
  config.init.conv1_bias = 0.25
  config.loss.perception = "teacher"
  config.precision = "default"
  config.validation.synthetic_pairs, config.validation.metrics = 2, "vif,ssim"
  config.validation.best_metric = "ssim"
  spec = run_spec.RunSpec.from_config(config)
  assert spec.data.synthetic and spec.data.datasets == () and spec.data.weights is None
  assert spec.data.augment.photometric() is not None
  assert (spec.optim.schedule, spec.optim.warmup_steps, spec.init.conv1_bias) == ("cosine", 7, 0.25)
  assert spec.validation.source == "synthetic" and spec.validation.names == ("VIF", "SSIM")
  assert spec.validation.best_metric == "SSIM"
  step = spec.step_config(5)
  assert (step.perception, step.precision, step.steps_per_epoch) == ("teacher", "default", 5)
  assert step.weights == run_spec.losses.PUBLISHED_WEIGHTS["student"]
  # What the run records of the config: its JSON and its settings, as they were.
  assert json.loads(spec.config_json) == json.loads(config.to_json_best_effort())
  assert dict(spec.settings) == _flat(config)
  config.data.synthetic_pairs = 0
  config.data.dataset, config.data.weights = "msrs, llvip", "1,2"
  assert run_spec.RunSpec.from_config(config).data.datasets == ("msrs", "llvip")
  assert run_spec.RunSpec.from_config(config).data.weights == (1.0, 2.0)


def test_the_spec_is_frozen_and_hashable():
  spec = run_spec.RunSpec.from_config(default.get_config("student"))
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.seed = 1
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.optim.lr = 1.0
  again = run_spec.RunSpec.from_config(default.get_config("student"))
  assert spec == again and hash(spec) == hash(again)
  # The step's settings are the jitted step's static argument and its cache key.
  assert hash(spec.step_config(4)) == hash(again.step_config(4))
  assert spec.step_config(4) == again.step_config(4) != spec.step_config(5)
  assert run_spec.as_spec(spec) is spec


@pytest.mark.parametrize("key, value, expected", [
    ("data.streaming", "sometimes", "config.data.streaming must be one of auto, on, off"),
    ("data.weights", "1", "config.data.dataset / config.data.weights: 2 dataset(s)"),
    ("refresh.memory_dtype", "fp8", "config.refresh.memory_dtype must be one of bfloat16"),
    ("loss.gradient_form", "eq3", "config.loss.gradient_form must be one of code, paper"),
    ("loss.distill_normalize", "pixel", "config.loss.distill_normalize must be one of batch"),
    ("seed", None, "config.seed must be an integer, got None"),
])
def test_settings_found_before_any_work(key, value, expected):
  config = _base()
  config.validation.ir_dir = config.validation.vis_dir = ""
  _set(config, key, value)
  with pytest.raises(run_spec.ConfigError) as info:
    run_spec.RunSpec.from_config(config)
  assert str(info.value).startswith(expected) and "\n" not in str(info.value), str(info.value)


# ------------------------------------------------------------- nothing below reads the config


class _Tripwire:
  """A config that fails the test when it is read once `armed` (any attribute or key)."""

  def __init__(self, config):
    object.__setattr__(self, "_config", config)
    object.__setattr__(self, "armed", False)
    object.__setattr__(self, "reads", [])

  def _read(self, what):
    if self.armed:
      self.reads.append(what)
      raise AssertionError(f"the config was read ({what}) after its RunSpec was built")
    return self._config

  def __getattr__(self, name):
    return getattr(self._read(name), name)

  def __getitem__(self, key):
    return self._read(key)[key]

  def __contains__(self, key):
    return key in self._read(key)

  def __iter__(self):
    return iter(self._read("iter"))


@pytest.fixture
def armed_after_reading(monkeypatch):
  """Arms a `_Tripwire` once `RunSpec.from_config` has read it; counts the reads."""
  calls = []
  original = run_spec.RunSpec.from_config.__func__

  def from_config(cls, config):
    spec = original(cls, config)
    calls.append(config)
    if isinstance(config, _Tripwire):
      object.__setattr__(config, "armed", True)
    return spec

  monkeypatch.setattr(run_spec.RunSpec, "from_config", classmethod(from_config))
  return calls


@pytest.mark.slow
def test_nothing_below_the_top_of_a_run_reads_the_config(tmp_path, teacher_file,
                                                         armed_after_reading):
  """A tiny student run (validated, with its best parameters kept, stopped and resumed) from a
  config that raises on any read once the spec is built: the loop, the run record, the
  checkpoints, the data, the frozen networks and the validation take the spec alone, and the
  config is read once per run."""
  config = default.get_config("student")
  config.data.synthetic_pairs = 1
  config.data.synthetic_height = config.data.synthetic_width = 32
  config.data.patch_size = config.data.patch_stride = 16  # 4 patches, 2 steps per epoch.
  config.batch_size, config.num_epochs = 2, 1
  config.loss.w_percep = 0.0  # No VGG-19 (a cheap step to compile), as test_validation.py.
  config.refresh.ssim = config.refresh.gmsd = False
  config.optim.lr = 3e-2
  config.teacher_weights = str(teacher_file)
  config.log_every_steps = config.checkpoint_every_steps = 1
  config.progress_bar = False
  v = config.validation
  v.synthetic_pairs, v.synthetic_height, v.synthetic_width = 2, 48, 48
  v.every_steps, v.metrics, v.num_images, v.best_metric = 1, "VIF", 1, "VIF"

  first = _Tripwire(config)
  stopped = loop.train_model(first, tmp_path, log=lambda *_: None, stop_at_step=1)
  assert stopped.step == 1 and stopped.weights is None
  assert first.armed and not first.reads and armed_after_reading == [first]
  lines = []
  second = _Tripwire(config)  # Resumed through the stages' entry, as bin/train.py runs it.
  result = stages.run(second, tmp_path, log=lines.append)
  assert result.step == 2 and result.weights == tmp_path / "student.npz"
  assert any("resumed" in line for line in lines), lines
  assert (tmp_path / "student_best_VIF.npz").is_file()
  assert second.armed and not second.reads and armed_after_reading == [first, second]
  assert json.loads((tmp_path / "config.json").read_text()) == json.loads(
      config.to_json_best_effort())


# The functions that take a config: the tops of a run, which read it into a spec at once.
_TAKE_A_CONFIG = {
    "run_spec.RunSpec.from_config", "run_spec.as_spec", "run_spec._read",
    "run_settings.check_config", "loop.train_model", "loop.load_dataset", "stages.plan",
    "stages.run", "ablation.config_changes", "ablation.run_grid",
}


def _functions(tree, prefix=""):
  for node in ast.iter_child_nodes(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield f"{prefix}{node.name}", node
      yield from _functions(node, f"{prefix}{node.name}.")
    elif isinstance(node, ast.ClassDef):
      yield from _functions(node, f"{prefix}{node.name}.")


def test_below_the_top_no_function_takes_a_config():
  """Statically: in mmdrfuse_jax/train/, only the tops of a run (`_TAKE_A_CONFIG`) have a
  parameter typed as a ConfigDict, and no parameter named `config` is untyped or `Any`; only
  their modules import ml_collections."""
  takers, importers = set(), set()
  for path in sorted((PACKAGE / "train").glob("*.py")):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)) and "ml_collections" in ast.unparse(node):
        importers.add(path.stem)
    for name, function in _functions(tree):
      arguments = function.args
      for arg in arguments.posonlyargs + arguments.args + arguments.kwonlyargs:
        annotation = ast.unparse(arg.annotation) if arg.annotation else ""
        if "ConfigDict" in annotation or (arg.arg == "config" and annotation in ("", "Any")):
          takers.add(f"{path.stem}.{name}")
  assert takers == _TAKE_A_CONFIG
  assert importers == {"run_spec", "run_settings", "loop", "stages", "ablation"}


# ---------------------------------------------------------------------- older run records


def _claim(workdir, config, log=print):
  spec = run_spec.RunSpec.from_config(config)
  run_record.claim_workdir(workdir, dict(spec.settings), spec.start_fresh, log)


@pytest.mark.parametrize("record_format", [None, 2])
def test_a_record_from_before_the_added_settings_resumes(tmp_path, record_format):
  """A run recorded before `data.weights`, `optim.schedule`, `init.conv1_bias`,
  `loss.perception`, ... existed resumes under settings that keep what it did (today's
  defaults), and its record then holds them; another value is refused like any change."""
  config = default.get_config("student")
  (tmp_path / "checkpoints" / "5").mkdir(parents=True)  # A run with a checkpoint.
  identity = run_record.run_identity(_flat(config))
  old = {k: v for k, v in identity.items() if k not in run_record.ADDED_SETTINGS}
  assert {"data.weights", "optim.schedule", "optim.warmup_steps", "optim.final_lr_fraction",
          "init.conv1_bias", "loss.perception"} <= set(identity) - set(old)
  record = {"identity": old} if record_format is None else {"format": 2, "identity": old}
  (tmp_path / "run.json").write_text(json.dumps(record))
  _claim(tmp_path, config)  # Not refused.
  assert json.loads((tmp_path / "run.json").read_text())["identity"] == identity
  (tmp_path / "run.json").write_text(json.dumps(record))
  config.optim.schedule = "cosine"
  with pytest.raises(run_spec.TrainingError,
                     match=r"other settings \(optim.schedule: 'constant' -> 'cosine'\)"):
    _claim(tmp_path, config)


@pytest.mark.parametrize("model", ["student", "teacher"])
def test_added_settings_are_todays_defaults(model):
  """The values older runs are held to are those of the published recipe, which the defaults
  keep. (Should a default change, `ADDED_SETTINGS` must not: it says what older versions did.)"""
  flat = _flat(default.get_config(model))
  assert {k: flat[k] for k in run_record.ADDED_SETTINGS} == dict(run_record.ADDED_SETTINGS)


def test_step_settings_are_the_steps_cache_key():
  """Two runs with the same step settings share one jitted step (`make_train_step` cache)."""
  spec = run_spec.RunSpec.from_config(default.get_config("student"))
  mesh = update.make_mesh(2)
  assert update.make_train_step(spec.step_config(2), mesh) is update.make_train_step(
      run_spec.RunSpec.from_config(default.get_config("student")).step_config(2), mesh)


@pytest.mark.parametrize("name", ["quickstart", "student", "student_paper", "teacher",
                                  "student_multidomain"])
def test_every_shipped_config_is_a_valid_run(name):
  """configs/<name>.py (the path users give) builds a spec; it is the package's config."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(__file__).resolve().parents[2] / "configs" / f"{name}.py"
  spec_of_file = importlib.util.spec_from_file_location(f"_config_{name}", path)
  module = importlib.util.module_from_spec(spec_of_file)
  spec_of_file.loader.exec_module(module)
  config = module.get_config()
  package = importlib.import_module(f"mmdrfuse_jax.configs.{name}").get_config()
  assert config.to_dict() == package.to_dict()
  if config.data.dataset:
    config.data.data_dir = "~/tfds"  # Left to the command line: where the user built the data.
  spec = run_spec.RunSpec.from_config(config)
  if name == "student_multidomain":
    assert spec.data.datasets == ("roadscene", "llvip") and spec.data.weights == (1.0, 1.0)
    assert spec.data.holdout > 0 and spec.validation.split == "holdout"
    assert not spec.needs_vgg  # It trains without downloading VGG-19.
