"""Strict JSON into typed dataclasses: the one converter every recipe section and every model family's options
go through.

`from_json(cls, raw, path)` checks a parsed JSON object against a dataclass's annotations (bool, int, float, str,
Literal, unions with None, tuples, lists, dicts, nested dataclasses), refuses unknown keys naming the closest
valid one, and runs the dataclass's own `__post_init__` checks, whose `FieldError`s it prefixes with the JSON path.
Every failure is a `RecipeError` that names the JSON path (`optim.lr`, `model.options.widths[1]`) and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the source, the JSON path and the fix."""


class FieldError(ValueError):
    """Raised by a dataclass's checks; `from_json` prefixes the JSON path of the field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field_name = field_name


def check(ok: bool, field_name: str, message: str) -> None:
    """FieldError(field_name, message) unless ok: a dataclass's check of one of its fields."""
    if not ok:
        raise FieldError(field_name, message)


def closest(word: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The choice most like `word` (difflib, cutoff 0.5), or None."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return close[0] if close else None


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        return f"a list of {type_name(get_args(tp)[0])}"
    if origin is dict:
        return "an object"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


INT_LIMIT = 2**63
"""Recipe integers must lie in [-2^63, 2^63): what torch, NumPy and DeepSpeed take as int64."""


def convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` (parsed JSON) against the annotation `tp` and return the typed value."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_json(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(value, a, path)
            except RecipeError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise RecipeError(f"{path}: expected {type_name(tp)}, got {json.dumps(value)}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices and type(value) is type(choices[0]):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {json.dumps(close[0])}?" if close else ""
        raise RecipeError(f"{path}: {json.dumps(value)} is not {type_name(tp)}{hint}")
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{path}: expected a list of {len(args)} values, got {json.dumps(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{path}: expected a list of {len(args)} values, got {len(value)}: {json.dumps(value)}")
        return tuple(convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{path}: expected a list, got {json.dumps(value)}")
        (a,) = get_args(tp)
        return [convert(v, a, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected an object, got {json.dumps(value)}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INT_LIMIT <= value < INT_LIMIT:
                raise RecipeError(f"{path}: {value} is out of range: integers must fit in 64 bits (|value| < 2^63)")
            return value
        if isinstance(value, float) and value.is_integer():
            # 32.0 or 1e308 is a typo or a computed value; int(1e308) has 309 digits and fails only in
            # torch.manual_seed, after the process group has started
            fix = f": write {int(value)}" if abs(value) < INT_LIMIT else ", out of range of a 64-bit integer"
            raise RecipeError(f"{path}: expected an integer, got {json.dumps(value)}{fix}")
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise RecipeError(f"{path}: must be a finite number, got {value}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - only reachable by adding a field of an unsupported type
        raise TypeError(f"{path}: unsupported annotation {tp!r}")
    raise RecipeError(f"{path}: expected {type_name(tp)}, got {json.dumps(value)} ({type(value).__name__})")


def from_json(cls: type, raw: Any, path: str, *, unknown_key: Callable[[str], str] | None = None) -> Any:
    """`cls` built from the parsed JSON object `raw` found at JSON path `path` ("" for the top level).

    `unknown_key(key)`, when given, words the error for a key `cls` does not have (the model section names the
    family and the closest of all its keywords); the default names the closest field of `cls`.
    """
    where = path or "the recipe"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected an object with keys of {cls.__name__}, got {json.dumps(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        sub = f"{path}.{key}" if path else key
        if key not in names:
            if unknown_key is not None:
                raise RecipeError(f"{sub}: {unknown_key(key)}")
            close = closest(key, names)
            hint = f"; did you mean {(path + '.' if path else '') + close!r}?" if close else ""
            raise RecipeError(f"unknown key {sub!r}{hint} Valid keys of {where}: {', '.join(names)}")
        kwargs[key] = convert(value, hints[key], sub)
    for name in names:  # absent sections are built from {} here so their checks report the right path
        if name not in kwargs and dataclasses.is_dataclass(hints[name]):
            kwargs[name] = from_json(hints[name], {}, f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except FieldError as e:
        full = f"{path}.{e.field_name}" if path else e.field_name
        raise RecipeError(f"{full}: {e}") from None
