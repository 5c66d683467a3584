"""Typed configuration objects shared by every layer.

A config is a frozen dataclass whose fields carry a short reason for their
default (``option(default, "why")``). :func:`from_mapping` builds one from plain
data (a YAML file, CLI overrides), rejecting unknown keys and values of the
wrong type or out of range with a :class:`ConfigError` that names the key.

Every file a user hands over (configs, task files, cell files) is read through
:func:`read_data_file`: at most :data:`MAX_FILE_CHARS` characters, safe loaders
only (no YAML tag constructs a Python object), duplicate keys refused (YAML and
JSON would otherwise keep the last one silently), and every parser failure,
nesting too deep included, reported as one line. Integers must fit in 64 bits
and numbers must be finite everywhere, because numpy, torch and the run
database all store them that way.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import math
import stat
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from cellsearch.errors import shown

__all__ = ["ConfigError", "option", "from_mapping", "to_mapping", "load_yaml", "read_data_file", "describe",
           "MAX_FILE_CHARS", "INT64_MAX"]

T = TypeVar("T")

#: Largest config, task or cell file read (characters). The largest legal cell (500 nodes) fits in a
#: few hundred kilobytes; the cap keeps a hostile file from costing seconds of parsing.
MAX_FILE_CHARS = 1_000_000
#: Integers in configs must fit in a signed 64-bit integer (numpy, torch and SQL columns).
INT64_MAX = 2**63 - 1


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


def _key_text(key: Any) -> str:
    """A key as it appears in a message: strings bare (escaped to one line), anything else as a bounded repr."""
    if isinstance(key, str):
        text = key[:100].encode("unicode_escape").decode("ascii")
        return text if len(text) <= 40 and len(key) <= 40 else text[:37] + "..."
    return shown(key, 40)


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
        if len(errors) == 1:  # an optional value: its one type's reason says more than "X or NoneType"
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {shown(value)}")
    if origin is typing.Literal:
        # Compared by type as well: 1 == True == 1.0, and a Literal of strings must get a string.
        if not any(type(value) is type(arg) and value == arg for arg in args):
            raise ConfigError(f"{key}: expected one of {list(args)}, got {shown(value)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {shown(value)}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, collections.abc.Mapping) or hint in (dict,):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        key_type, value_type = args if args else (Any, Any)
        items = {_coerce(k, key_type, f"{key}.{_key_text(k)}"): _coerce(v, value_type, f"{key}.{_key_text(k)}")
                 for k, v in value.items()}
        # A Mapping field stays a plain dict (it may travel by pickle); a dict field is frozen.
        return items if origin is collections.abc.Mapping else types.MappingProxyType(items)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_mapping(hint, value, prefix=f"{key}.")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {shown(value)}")
        return value
    if hint is int:
        # bool is an int subclass in Python; `true` where a count belongs is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {shown(value)}")
        if abs(value) > INT64_MAX:
            raise ConfigError(f"{key}: {shown(value)} does not fit in a 64-bit integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {shown(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {shown(value)}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {shown(value)}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {shown(value)}")
        return Path(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {shown(value)}")
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
        names = ", ".join(f"{prefix}{_key_text(k)}" for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise ConfigError(f"unknown key {names}; known keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        value = _coerce(value, hints[name], key)
        check = fields[name].metadata.get("check")
        if check is not None and not check(value):
            raise ConfigError(
                f"{key}: {shown(value)} is out of range ({fields[name].metadata.get('rule') or 'invalid'})"
            )
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


def _no_duplicate_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"duplicate key {shown(key, 60)}")
        data[key] = value
    return data


@functools.lru_cache(maxsize=1)
def _strict_yaml_loader() -> type:
    """The safe YAML loader (libyaml's when built in) that also refuses duplicate keys."""
    import yaml

    class StrictSafeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc, valid-type]
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # merged keys may be overridden; that is what a merge is for
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, collections.abc.Hashable):
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {shown(key, 60)}", key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return StrictSafeLoader


def read_data_file(path: str | Path, error: type[Exception] | None = None, what: str = "file",
                   fmt: str | None = None) -> Any:
    """Plain data from a YAML or JSON file (``fmt`` 'yaml' or 'json'; by default from the suffix).

    Any problem (unreadable, not UTF-8, too large, a parser error, nesting too deep,
    a duplicate key) raises ``error`` (default :class:`ConfigError`) with one line.
    """
    import yaml

    error = error or ConfigError
    path = Path(path)
    fmt = fmt or ("json" if path.suffix.lower() == ".json" else "yaml")
    try:
        # A FIFO or a device would block the read or never end: only regular files are data files.
        if path.exists() and not stat.S_ISREG(path.stat().st_mode):
            raise error(f"{path}: {what} is not a regular file")
    except OSError:
        pass  # reported by open() below
    try:
        # At most one character past the cap is read: a multi-gigabyte file costs nothing to refuse.
        with open(path, encoding="utf-8") as handle:
            text = handle.read(MAX_FILE_CHARS + 1)
    except (OSError, UnicodeDecodeError, ValueError) as problem:
        reason = getattr(problem, "strerror", None) or " ".join(str(problem).split()) or type(problem).__name__
        raise error(f"{path}: cannot read {what} ({reason[:200]})") from None
    if len(text) > MAX_FILE_CHARS:
        raise error(f"{path}: {what} is too large (more than {MAX_FILE_CHARS:,} characters)")
    try:
        if fmt == "json":
            return json.loads(text, object_pairs_hook=_no_duplicate_pairs)
        return yaml.load(text, Loader=_strict_yaml_loader())  # noqa: S506 - a safe loader
    except RecursionError:
        raise error(f"{path}: not valid {fmt.upper()} (nested too deeply)") from None
    except Exception as problem:  # noqa: BLE001 - every parser failure means the same thing here
        lines = [line.strip() for line in str(problem).splitlines() if line.strip()]
        reason = "; ".join(lines[:2]) if lines else type(problem).__name__
        raise error(f"{path}: not valid {fmt.upper()} ({reason[:200]})") from None


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file safely (see :func:`read_data_file`), turning every problem into :class:`ConfigError`."""
    return read_data_file(path, ConfigError, "YAML file", fmt="yaml")


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
