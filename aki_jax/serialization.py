"""The one (de)serialiser of typed configs: frozen dataclasses <-> JSON-friendly dicts.

`to_dict(config)` gives nested dicts (`json.dumps` writes it as is; `to_json` / `from_json` use files).
`from_dict(Cls, data)` builds `Cls` back from such a dict, driven by the field annotations alone:

  a dataclass        a dict of its fields (missing ones keep their defaults; unknown ones are an error),
                     or an instance of it as is
  tuple[X, ...]      a list or tuple, each element converted as X (`tuple[X, Y]`: exactly two, in order)
  X | None           None, or an X
  dict, dict[K, V]   a dict, taken as it is
  int, float, bool, str  that type; an int where a float is declared becomes a float (JSON writes 1e3 as
                     1000.0 but a hand-written config says 1000); a bool is never an int
  Any                anything

Every error names the dotted path of the value at fault, e.g. `TrainConfig.model.decoder.num_layers:
expected int, got str 'four'`. Checks between fields stay in each dataclass's `__post_init__`, which runs
once per object as it is built.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A value that does not fit its declared type; the message starts with its dotted path."""


def to_dict(config) -> dict[str, Any]:
    """A dataclass as nested dicts (tuples stay tuples; `json.dumps` writes them as lists)."""
    return dataclasses.asdict(config)


def to_json(config, sort_keys: bool = False) -> str:
    """`to_dict(config)` as indented JSON text with a final newline (the files next to checkpoints)."""
    return json.dumps(to_dict(config), indent=2, sort_keys=sort_keys) + "\n"


def from_json(cls: type[T], path) -> T:
    """`cls` read from a JSON file; errors name the file (bad JSON) or the file and field (bad value)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def from_dict(cls: type[T], data, where: str | None = None) -> T:
    """`cls` built from `data` (see the module docstring); `where` prefixes error paths (default: cls name)."""
    return convert(data, cls, where or cls.__name__)


@functools.cache
def field_types(cls) -> dict[str, Any]:
    """{field name: resolved annotation} of a dataclass (string annotations evaluated once)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def convert(value, hint, where: str):
    """`value` converted to the annotation `hint`; ConfigError naming `where` when it does not fit."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _union(value, typing.get_args(hint), where)
    if dataclasses.is_dataclass(hint):
        return _dataclass(value, hint, where)
    if hint is tuple or origin is tuple:
        return _tuple(value, typing.get_args(hint), where)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a dict, got {_describe(value)}")
        return dict(value)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint in (bool, str):
        if isinstance(value, hint):
            return value
    else:
        raise ConfigError(f"{where}: unsupported annotation {hint!r}")
    raise ConfigError(f"{where}: expected {hint.__name__}, got {_describe(value)}")


def _union(value, args, where: str):
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where}: null is not allowed here")
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return convert(value, arg, where)
        except ConfigError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    names = " or ".join(_name(a) for a in args if a is not type(None))
    raise ConfigError(f"{where}: expected {names}, got {_describe(value)}")


def _dataclass(value, cls, where: str):
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected {cls.__name__} (a dict of its fields), got {_describe(value)}")
    types_ = field_types(cls)
    unknown = sorted(set(value) - set(types_))
    if unknown:
        raise ConfigError(f"{where}: unknown fields {unknown}; known: {sorted(types_)}")
    kwargs = {name: convert(v, types_[name], f"{where}.{name}") for name, v in value.items()}
    return cls(**kwargs)


def _tuple(value, args, where: str):
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{where}: expected a list, got {_describe(value)}")
    if not args:
        return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
    return tuple(convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))


def _name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
