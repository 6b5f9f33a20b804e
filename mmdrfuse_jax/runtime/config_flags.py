"""`--config=FILE` and `--config.a.b=VALUE` overrides for argparse tools.

The same command lines as ml_collections' absl `config_flags` (`--config=configs/student.py
--config.optim.lr=3e-4`), for tools that parse their other flags with argparse: every tool of
this project uses one flag library, and argparse lets tests call a tool's `main(argv)` many
times in one process (absl's flags are global) and `--help` exit 0.

A config file is a Python file with `get_config()` (or `get_config(arg)`, named as
`FILE:arg`). It is loaded, locked (an override may change a field, never add one) and the
overrides are applied in order, each parsed as the type of the field it replaces.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import re
from typing import Any, Sequence

from mmdrfuse_jax.errors import MMDRFuseError


class ConfigError(MMDRFuseError, ValueError):
  """A config file or override that cannot be used; the message is one line naming the flag."""


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def split_overrides(argv: Sequence[str], names: Sequence[str]
                    ) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
  """Takes the `--NAME.field=value` (or `--NAME.field value`) arguments out of `argv`.

  Args:
    argv: the command line, without the program name.
    names: the config flags (`("config",)`, say).

  Returns:
    The other arguments, in order, and per name the (field path, value text) overrides.

  Raises:
    ConfigError: an override without a value.
  """
  pattern = re.compile(r"^--(" + "|".join(map(re.escape, names)) + r")\.([A-Za-z_][\w.]*)(=.*)?$")
  rest: list[str] = []
  overrides: dict[str, list[tuple[str, str]]] = {name: [] for name in names}
  args = list(argv)
  i = 0
  while i < len(args):
    match = pattern.match(args[i])
    if not match:
      rest.append(args[i])
      i += 1
      continue
    name, field, value = match.groups()
    if value is not None:
      value = value[1:]
      i += 1
    elif i + 1 < len(args):
      value = args[i + 1]
      i += 2
    else:
      raise ConfigError(f"--{name}.{field}: no value given")
    overrides[name].append((field, value))
  return rest, overrides


def load_config(spec: str, *, flag: str = "config") -> Any:
  """Loads `get_config()` from the file `spec` (`FILE` or `FILE:arg`), locked.

  Raises:
    ConfigError: no such file, or a file that does not load or has no `get_config`.
  """
  config = _call_file(spec, "get_config", flag=flag)
  if hasattr(config, "lock"):
    config.lock()
  return config


def load_grid(spec: str, *, flag: str = "grid") -> dict[str, Any]:
  """Loads `get_grid()` from the file `spec`: named configs, one per run of an ablation.

  Returns:
    {row name: its config, locked}, in the file's order.

  Raises:
    ConfigError: no such file, a file that does not load or has no `get_grid`, or a grid
      that is not a non-empty mapping of names (usable as folder names) to configs.
  """
  grid = _call_file(spec, "get_grid", flag=flag)
  if not hasattr(grid, "items") or not grid:
    raise ConfigError(f"--{flag}={spec}: get_grid() must return a non-empty mapping of row "
                      f"names to configs, got {type(grid).__name__}")
  rows = {}
  for name, config in grid.items():
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*", name):
      raise ConfigError(f"--{flag}={spec}: row name {name!r} is not usable as a folder name "
                        "(letters, digits and _ . + = -)")
    if not hasattr(config, "lock"):
      raise ConfigError(f"--{flag}={spec}: row {name!r} is a {type(config).__name__}, not a "
                        "ConfigDict")
    rows[name] = config.lock()
  return rows


def _call_file(spec: str, function: str, *, flag: str) -> Any:
  """`function()` (or `function(arg)` for `FILE:arg`) of the Python file `spec`."""
  path, _, arg = spec.partition(":") if not pathlib.Path(spec).exists() else (spec, "", "")
  file = pathlib.Path(path).expanduser()
  if not file.is_file():
    raise ConfigError(f"--{flag}={spec}: no such config file")
  module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
  if module_spec is None or module_spec.loader is None:
    raise ConfigError(f"--{flag}={spec}: not a Python file")
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    fn = getattr(module, function, None)
    if fn is None:
      raise ConfigError(f"--{flag}={spec}: the file has no {function}()")
    return fn(arg) if arg else fn()
  except ConfigError:
    raise
  except Exception as e:  # The file is the user's: any error in it is theirs, in one line.
    raise ConfigError(f"--{flag}={spec}: {type(e).__name__}: {_one_line(e)}") from None


def apply_overrides(config: Any, overrides: Sequence[tuple[str, str]], *,
                    flag: str = "config") -> Any:
  """Sets each (field path, value text) on `config`, parsed as the field's current type.

  Raises:
    ConfigError: a field that does not exist (with the nearest name, as ml_collections gives
      it), a group given a value, or a value that does not parse as the field's type.
  """
  for field, text in overrides:
    *groups, leaf = field.split(".")
    node = config
    try:
      for group in groups:
        node = getattr(node, group)
      current = getattr(node, leaf)
    except (AttributeError, KeyError) as e:
      raise ConfigError(_missing_field(flag, field, e)) from None
    if hasattr(current, "keys") and hasattr(current, "lock"):
      raise ConfigError(f"--{flag}.{field}: is a group of settings, not one setting")
    try:
      value = parse_value(text, current)
    except ValueError as e:
      raise ConfigError(f"--{flag}.{field}={text}: {e}") from None
    try:
      setattr(node, leaf, value)
    except (TypeError, AttributeError, KeyError) as e:
      raise ConfigError(f"--{flag}.{field}={text}: {_one_line(e)}") from None
  return config


def parse_value(text: str, current: Any) -> Any:
  """`text` as the type of `current` (bool, int, float, str, tuple/list, or a literal for None).

  Raises:
    ValueError: `text` is not of that type.
  """
  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered in _TRUE or lowered in _FALSE:
      return lowered in _TRUE
    raise ValueError("expected true or false")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise ValueError("expected an integer") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise ValueError("expected a number") from None
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise ValueError(f"expected a {type(current).__name__} literal, e.g. (1, 2)") from None
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return type(current)(value)
  if current is None:  # No type to follow: a Python literal, else the text itself.
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  raise ValueError(f"cannot set a {type(current).__name__} from the command line")


def _missing_field(flag: str, field: str, error: Exception) -> str:
  text = _one_line(error)
  suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  if suggestion:
    return (f"--{flag}: no field {suggestion.group(2)!r} in the config; did you mean "
            f"{suggestion.group(1)!r}?")
  return f"--{flag}: no field {field!r} in the config"


def _one_line(error: Exception) -> str:
  return " ".join(str(error).replace("\\n", " ").split()).strip("'\"")[:300]
