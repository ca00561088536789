"""Nested dicts into frozen dataclasses, checking each value against its field's type.

Generic over the root dataclass (``atlasfl.config.schema.ExperimentConfig``): a ``Literal``
field is a choice (a wrong one is refused naming the key, the value and the allowed values),
nested dataclasses are sections, ``dict`` fields are mappings, ``tuple`` fields lists. Unknown
keys are errors that list close matches.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

from atlasfl.errors import AtlasError


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass and its sections (``train``, ``train.lr``, ...)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(dotted_keys(hints[f.name], key + "."))
    return keys


def known_key(root: type, key: str) -> bool:
    """A dotted key of ``root``, or one entry of a mapping field (``data.task_samples.cola``)."""
    return key in dotted_keys(root) or _mapping_entry(root, key)


def _mapping_entry(root: type, key: str) -> bool:
    parent, _, _ = key.rpartition(".")
    node: Any = root
    for part in parent.split(".") if parent else []:
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            return False
        node = hints[part]
    return typing.get_origin(node) is dict


def unknown_key(root: type, path: str) -> AtlasError:
    """The error for a key ``root`` does not have, with close matches."""
    close = difflib.get_close_matches(path, dotted_keys(root), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return AtlasError(f"unknown config key {path!r}{hint}")


def _coerce(root: type, value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) or value not in allowed:
            raise AtlasError(f"config key {path!r} = {value!r} is invalid; allowed: "
                             f"{', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(root, value, inner[0], path)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise AtlasError(f"config key {path!r} must be a mapping, got {value!r}")
        return build(root, tp, value, path + ".")
    if origin is dict:
        (key_tp, item_tp) = typing.get_args(tp)
        if not isinstance(value, dict):
            raise AtlasError(f"config key {path!r} must be a mapping, got {value!r}")
        return {_coerce(root, k, key_tp, path): _coerce(root, v, item_tp, f"{path}.{k}")
                for k, v in value.items()}
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, (str, dict)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise AtlasError(f"config key {path!r} must be a list, got {value!r}")
        return tuple(_coerce(root, v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise AtlasError(f"config key {path!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise AtlasError(f"config key {path!r} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AtlasError(f"config key {path!r} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise AtlasError(f"config key {path!r} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise AtlasError(f"config key {path!r} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} at {path}")  # internal: a field type we forgot


def build(root: type, cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """``cls`` (``root`` or one of its sections at ``prefix``) from a nested dict."""
    names = _field_names(cls)
    for key in raw:
        if key not in names:
            raise unknown_key(root, prefix + str(key))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(root, raw[f.name], hints[f.name], prefix + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise AtlasError(f"config key {prefix + f.name!r} is required")
    return cls(**kwargs)


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key (``train.lr``) in a nested dict, creating sections as needed."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise AtlasError(f"unknown config key {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value
