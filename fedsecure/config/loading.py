"""Reading configs: YAML files, dotted overrides, strict conversion into the typed sections, and the flat
dotted form Flower's run and node configs need.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from fedsecure.errors import ConfigError

T = TypeVar("T")


def read_yaml(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A YAML config file as a mapping (empty when ``path`` is None), with dotted ``overrides`` applied;
    ConfigError names the file, the line and the fix.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist. Fix: pass an existing YAML file "
                              "(see configs/simulation.yaml).")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"config file {p} is not a text file (not UTF-8). Fix: pass a YAML config such as "
                              "configs/simulation.yaml.") from None
        except OSError as e:
            raise ConfigError(f"config file {p} cannot be read ({e.strerror or e}). Fix: pass a readable YAML "
                              "file.") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file {p} is not valid YAML{where}: "
                              f"{getattr(e, 'problem', e)}. Fix the syntax and retry.") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys at the top level, "
                              f"found {type(loaded).__name__}.")
        data = loaded
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value`` (value read as YAML, so ``8`` is an int and ``null`` is None)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. model.lora.r=4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; a number is meant
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    return key.strip(), value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key = "a.b.c"``, creating sections on the way."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is tuple:
        return "a list of strings"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for arg in args[1:]:  # ``int | str``: a value of a later type is taken as it is
            if type(value) is arg:
                return value
        return _coerce(args[0], value, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}; found {value!r}.")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings; found {value!r}.")
        return tuple(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a section (mapping of keys); found {value!r}.")
        return from_mapping(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false; found {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer; found {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number; found {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string; found {value!r}.")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - programming error


def from_mapping(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in known:
            close = [k for k in known if k.startswith(str(key)[:3])]
            hint = f" Did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown key.{hint} Known keys here: "
                              f"{', '.join(prefix + k for k in known)}.")
    kwargs = {name: _coerce(hints[name], data[name], f"{prefix}{name}") for name in known if name in data}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A dataclass as nested dicts (tuples as lists): what YAML and JSON write."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested mapping to dotted keys: ``None`` becomes ``""``, lists are comma-joined."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif value is None:
            out[name] = ""
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(value)
        else:
            out[name] = value
    return out


def unflatten(run_config: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """Rebuild the nested mapping for ``cls`` from dotted keys; ``""`` for an optional is None."""
    out: dict[str, Any] = {}

    def walk(tp: type, prefix: str, node: dict[str, Any]) -> None:
        hints = typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            key, hint = f"{prefix}{f.name}", hints[f.name]
            if dataclasses.is_dataclass(hint):
                child: dict[str, Any] = {}
                walk(hint, f"{key}.", child)
                if child:
                    node[f.name] = child
            elif key in run_config:
                value = run_config[key]
                optional = type(None) in get_args(hint)
                if value == "" and optional:
                    value = None
                node[f.name] = value

    walk(cls, "", out)
    return out
