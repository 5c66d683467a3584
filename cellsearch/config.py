"""Typed configuration objects shared by every layer.

A config is a frozen dataclass whose fields carry a short reason for their
default (``option(default, "why")``). :func:`from_mapping` builds one from plain
data (a YAML file, CLI overrides), rejecting unknown keys and values of the
wrong type or out of range with a :class:`ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

__all__ = ["ConfigError", "option", "from_mapping", "to_mapping", "load_yaml", "describe"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value was unknown, of the wrong type or out of range; the message names the key."""


def option(
    default: Any = dataclasses.MISSING,
    why: str = "",
    *,
    check: Callable[[Any], bool] | None = None,
    rule: str = "",
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A config field with its reason, and an optional value check (``check``) described by ``rule``."""
    metadata = {"why": why, "check": check, "rule": rule}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or hint in (dict,):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        key_type, value_type = args if args else (Any, Any)
        return types.MappingProxyType(
            {_coerce(k, key_type, f"{key}.{k}"): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
        )
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_mapping(hint, value, prefix=f"{key}.")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    return value


def from_mapping(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build the dataclass ``cls`` from plain data; unknown keys and bad values raise :class:`ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        names = ", ".join(f"{prefix}{k}" for k in map(str, unknown))
        raise ConfigError(f"unknown key {names}; known keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        value = _coerce(value, hints[name], key)
        check = fields[name].metadata.get("check")
        if check is not None and not check(value):
            raise ConfigError(f"{key}: {value!r} is out of range ({fields[name].metadata.get('rule') or 'invalid'})")
        values[name] = value
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {error}") from None


def to_mapping(config: Any) -> Any:
    """Plain data (dicts, lists, numbers, strings) for a config; inverse of :func:`from_mapping`."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_mapping(getattr(config, f.name)) for f in dataclasses.fields(config) if f.init}
    if isinstance(config, Mapping):
        return {k: to_mapping(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_mapping(v) for v in config]
    if isinstance(config, Path):
        return str(config)
    return config


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file with the safe loader, turning parser errors into :class:`ConfigError`."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None


def describe(cls: type) -> str:
    """A table of a config's keys, defaults and reasons (for ``--help`` and docs)."""
    lines = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)"
        )
        lines.append(f"{f.name} = {to_mapping(default)!r}  # {f.metadata.get('why', '')}")
    return "\n".join(lines)
