"""Typed settings from plain values (YAML, JSON): dataclasses built strictly, errors naming the key path.

`build(Cls, values, "eval.sampling")` makes a `Cls` from a mapping: an unknown key, a value of the wrong type
or a missing required field is a one-line FluidbenchError naming the dotted path (`unknown key
'eval.sampling.head_stepz' (eval.sampling has: ...)`, `local.workers: expected int, got str 'abc'`). Nested dataclasses, `X | None`, `list[X]` and `dict[str, X]` fields are built the
same way, path by path. Strings are not parsed: a spec is typed YAML, so `workers: abc` is an error, not a
silent string. `given(obj)` returns the values `obj` was built from (the keys the spec set, as written), which
sweep jobs use for their settings key and command line, so a default never enters either.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

from harness.errors import FluidbenchError

T = TypeVar("T")
_GIVEN = "_schema_given"


def build(cls: type[T], values: Any, path: str, owner: str | None = None) -> T:
    """A `cls` (a dataclass) from a mapping of its field names; strict about keys and types. `owner` names what
    takes these settings in the error for an unknown key (`eval.fid.nn: not a setting of eval_fid`)."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise FluidbenchError(f"{path}: expected a mapping of {cls.__name__} keys, got {_describe(values)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            if owner:
                raise FluidbenchError(f"{_join(path, key)}: not a setting of {owner} (known: {', '.join(fields)})")
            raise FluidbenchError(f"unknown key {_join(path, key)!r} ({path or 'the spec'} has: {', '.join(fields)})")
        kwargs[key] = convert(hints[key], value, _join(path, key))
    missing = [name for name, f in fields.items() if name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise FluidbenchError(f"missing key {_join(path, missing[0])!r}")
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as e:  # a __post_init__ check
        raise FluidbenchError(f"{path}: {' '.join(str(e).split())}") from None
    object.__setattr__(obj, _GIVEN, dict(values))
    return obj


def given(obj: Any) -> dict:
    """The values `obj` was built from by `build` (the keys set, as written); {} for an object built in code."""
    return dict(getattr(obj, _GIVEN, {}))


def convert(hint: Any, value: Any, path: str) -> Any:
    """`value` checked against a type hint (int, float, bool, str, X | None, list[X], dict[str, X], a dataclass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return convert(options[0], value, path)
        for option in options:
            try:
                return convert(option, value, path)
            except FluidbenchError:
                continue
        raise FluidbenchError(f"{path}: expected {_name(hint)}, got {_describe(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise FluidbenchError(f"{path}: expected a list, got {_describe(value)}")
        return [convert(args[0] if args else Any, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise FluidbenchError(f"{path}: expected a mapping, got {_describe(value)}")
        item = args[1] if len(args) == 2 else Any
        return {k: convert(item, v, _join(path, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if hasattr(hint, "from_values"):  # a section with its own reading (a dict keyed by registry names)
            return hint.from_values(value, path)
        return build(hint, value, path)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 4.76e9 (no sign in the exponent) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if type(value) is not hint:  # exact: a bool is not an int, a float is not an int, a number is not a str
        raise FluidbenchError(f"{path}: expected {_name(hint)}, got {_describe(value)}")
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:120]
