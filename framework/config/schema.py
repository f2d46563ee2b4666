"""Typed parsing of config sections: a section is a dataclass whose fields carry a doc string and bounds.

A field is declared with :func:`option`, which records its documentation and the range of accepted values, so the
same declaration drives parsing, validation, error messages and the generated reference in ``docs/config.md``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from framework.config.errors import ConfigError


def option(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    min: float | None = None,  # noqa: A002 - reads naturally at the declaration site
    max: float | None = None,  # noqa: A002
    min_exclusive: bool = False,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """Declare a config field with its documentation and accepted range."""
    metadata = {"doc": doc, "min": min, "max": max, "min_exclusive": min_exclusive}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def describe_type(tp: Any) -> str:
    """Human wording of an annotation, used in error messages and docs."""
    origin = get_origin(tp)
    if tp is bool:
        return "a boolean (true/false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (Any,)
        return f"a list of {describe_type(inner).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    if origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in get_args(tp) if a is not type(None)]
        optional = type(None) in get_args(tp)
        return " or ".join(parts) + (" or null" if optional else "")
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def _range_text(meta: dict[str, Any]) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    lo_op = ">" if meta.get("min_exclusive") else ">="
    if lo is not None and hi is not None:
        return f" {lo_op} {lo} and <= {hi}"
    if lo is not None:
        return f" {lo_op} {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def coerce(value: Any, tp: Any, key: str, meta: dict[str, Any] | None = None) -> Any:
    """Check ``value`` against annotation ``tp`` (and bounds in ``meta``); return it in canonical form."""
    meta = meta or {}
    expected = "expected " + describe_type(tp) + _range_text(meta)
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, meta)
            except ConfigError:
                continue
        raise ConfigError(key, value, expected)
    if origin is Literal:
        if value in get_args(tp) and not (
            isinstance(value, bool) and not any(a is value for a in get_args(tp))
        ):
            return value
        raise ConfigError(key, value, expected)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, expected)
        (inner, *_) = get_args(tp) or (Any,)
        return [coerce(v, inner, f"{key}[{i}]", meta) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, expected)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, expected)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, expected)
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, expected)
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(key, value, expected)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, expected)
    else:
        raise TypeError(f"unsupported config annotation {tp!r} for {key}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
        raise ConfigError(key, value, expected)
    if hi is not None and value > hi:
        raise ConfigError(key, value, expected)
    return value


def section_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def build_section(cls: type, data: dict[str, Any] | None, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys, wrong types and bad ranges raise :class:`ConfigError`.

    A section may declare ``MOVED_KEYS: ClassVar[dict[str, str]]`` (old key -> its new ``section.key``): an old job
    file that still sets one gets an error naming the new key instead of a silent change or a bare "unknown key"."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix, data, f"expected a mapping of {cls.__name__} keys")
    hints = typing.get_type_hints(cls)
    fields = section_fields(cls)
    moved: dict[str, str] = getattr(cls, "MOVED_KEYS", {})
    for key in data:
        if key in moved and key not in fields:
            raise ConfigError(
                f"{prefix}.{key}", data[key], f"this key moved to '{moved[key]}': set that key instead"
            )
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{prefix}.{key}", data[key], f"unknown key; '{prefix}' accepts: {known}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], f"{prefix}.{name}", dict(f.metadata))
    section = cls(**kwargs)
    validate = getattr(section, "validate", None)
    if validate is not None:
        validate(prefix)
    return section


def section_docs(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type text, default, doc) for every field of a section, for the generated reference."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append(
            (f.name, describe_type(hints[f.name]) + _range_text(dict(f.metadata)), default, f.metadata["doc"])
        )
    return rows
