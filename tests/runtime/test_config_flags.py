"""`--config=FILE --config.a.b=VALUE` for argparse tools (runtime/config_flags.py)."""

import pathlib

import ml_collections
import pytest

from mmdrfuse_jax.runtime import config_flags

REPO = pathlib.Path(__file__).resolve().parents[2]


def _config_file(tmp_path):
  path = tmp_path / "c.py"
  path.write_text(
      "import ml_collections\n"
      "def get_config(arg=None):\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.name = arg or 'default'\n"
      "  c.steps = 3\n"
      "  c.lr = 1e-3\n"
      "  c.flag = False\n"
      "  c.sizes = (1, 2)\n"
      "  c.maybe = None\n"
      "  c.optim = ml_collections.ConfigDict({'b1': 0.9})\n"
      "  return c\n")
  return path


def test_split_overrides_keeps_the_rest_in_order():
  rest, overrides = config_flags.split_overrides(
      ["--workdir=w", "--config.a=1", "--other", "--teacher_config.b.c", "x y", "--configs=z"],
      ["config", "teacher_config"])
  assert rest == ["--workdir=w", "--other", "--configs=z"]
  assert overrides == {"config": [("a", "1")], "teacher_config": [("b.c", "x y")]}
  with pytest.raises(config_flags.ConfigError, match="--config.a: no value"):
    config_flags.split_overrides(["--config.a"], ["config"])


def test_overrides_follow_the_field_types(tmp_path):
  config = config_flags.load_config(str(_config_file(tmp_path)))
  config_flags.apply_overrides(config, [
      ("steps", "7"), ("lr", "3e-4"), ("flag", "True"), ("sizes", "(4, 5, 6)"),
      ("maybe", "[1, 2]"), ("optim.b1", "0.5"), ("name", "x")])
  assert (config.steps, config.lr, config.flag, config.sizes, config.maybe, config.optim.b1,
          config.name) == (7, 3e-4, True, (4, 5, 6), [1, 2], 0.5, "x")
  assert isinstance(config.lr, float)


@pytest.mark.parametrize("override,message", [
    (("step", "1"), "--config: no field 'step' in the config; did you mean 'steps'?"),
    (("steps", "1.5"), "--config.steps=1.5: expected an integer"),
    (("flag", "maybe"), "--config.flag=maybe: expected true or false"),
    (("optim", "1"), "--config.optim: is a group of settings, not one setting"),
    (("optim.b2", "1"), "--config: no field 'optim.b2' in the config"),
])
def test_bad_overrides_are_one_line(tmp_path, override, message):
  config = config_flags.load_config(str(_config_file(tmp_path)))
  with pytest.raises(config_flags.ConfigError) as raised:
    config_flags.apply_overrides(config, [override])
  assert str(raised.value) == message


def test_file_argument_and_bad_files(tmp_path):
  path = _config_file(tmp_path)
  assert config_flags.load_config(f"{path}:given").name == "given"
  with pytest.raises(config_flags.ConfigError, match="no such config file"):
    config_flags.load_config(str(tmp_path / "nope.py"))
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  with pytest.raises(config_flags.ConfigError, match=r"^--config=.*broken.py: SyntaxError"):
    config_flags.load_config(str(broken))
  (tmp_path / "none.py").write_text("x = 1\n")
  with pytest.raises(config_flags.ConfigError, match="has no get_config"):
    config_flags.load_config(str(tmp_path / "none.py"))


def test_loaded_configs_are_locked_and_the_repo_configs_load():
  config = config_flags.load_config(str(REPO / "configs" / "student.py"))
  assert isinstance(config, ml_collections.ConfigDict) and config.model == "student"
  with pytest.raises(AttributeError):
    config.new_field = 1
