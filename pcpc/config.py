"""Strict loading of dataclass configs from JSON-like dicts.

Unknown keys, missing required keys, wrong types and nested mistakes are
errors that name the field (with its path) and the valid choices.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

from pcpc.errors import UserError

_MISSING = dataclasses.MISSING


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, path: str):
    """Check `value` against annotation `tp`; returns the (possibly converted) value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        objects = [a for a in args if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(objects) == 1:  # Section | None: the section's own error names
            return _coerce(value, objects[0], path)        # the nested field
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except UserError as e:
                errors.append(str(e))
        names = " or ".join(_type_name(a) for a in args)
        raise UserError(f"{path}: expected {names}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{path}: expected an object, got {type(value).__name__}")
        return from_dict(tp, value, where=path)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"{path}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else typing.Any
            items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{path}: expected an object, got {type(value).__name__}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{path}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise UserError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _declared_order(cls) -> list[tuple[str, dataclasses.Field]]:
    """The dataclass's fields, its own first (in declaration order), then those it inherits: a loop's
    config lists its own keys before the shared base's (runtime/run/config.py). A class's FIRST_KEYS (the
    reference design's keys, say) come before all of them."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    order = [n for n in getattr(cls, "FIRST_KEYS", ()) if n in by_name]
    for klass in cls.__mro__:
        for name in klass.__dict__.get("__annotations__", {}):
            if name in by_name and name not in order:
                order.append(name)
    return [(n, by_name[n]) for n in order]


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types.

    ValueErrors raised by the class's `__post_init__` are re-raised as
    UserError prefixed with `where`.
    """
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {name: f for name, f in _declared_order(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}")
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise UserError(f"{where}: missing required key {name!r}")
    try:
        return cls(**kwargs)
    except UserError:
        raise
    except ValueError as e:
        raise UserError(f"{where}: {e}") from e


def load_json(path: str | Path) -> dict:
    """Read a JSON object from `path` with errors that name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


# Checks for config dataclasses' __post_init__: each raises ValueError naming the field,
# which from_dict turns into a UserError prefixed with the file or section.


def check_positive(obj, *names: str) -> None:
    """Each named field of obj must be > 0."""
    for name in names:
        if not getattr(obj, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(obj, name)}")


def check_at_least(obj, low, *names: str) -> None:
    """Each named field of obj must be >= low."""
    for name in names:
        if getattr(obj, name) < low:
            raise ValueError(f"{name} must be >= {low}, got {getattr(obj, name)}")


def check_choice(obj, name: str, choices) -> None:
    """Field `name` of obj must be one of `choices`."""
    if getattr(obj, name) not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {getattr(obj, name)!r}")


def redacted_dict(obj, secrets: tuple[str, ...] = ("wandb_api_key",)) -> dict:
    """dataclasses.asdict(obj) with the named secret fields replaced (what may be printed or saved)."""
    out = dataclasses.asdict(obj)
    for name in secrets:
        if out.get(name) is not None:
            out[name] = "<redacted>"
    return out
