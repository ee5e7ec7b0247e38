"""Checks for the pass-through sections (``model.megatron``, ``optim.megatron``): their keys are
fields of an upstream Megatron-Core dataclass, named in the schema field's
``metadata={"passthrough": "module.Class"}``.

The upstream class is imported only when a pass-through section is non-empty. Values are checked
loosely against the field's annotation: ``bool`` / ``int`` / ``float`` / ``str`` / ``Literal`` and
``Optional`` / ``Union`` of them are enforced; anything else (``torch.dtype``, callables, enums)
is passed through for Megatron-Core to convert or refuse.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import types
import typing
from typing import Any, Literal, Union


@functools.cache
def upstream_fields(qualified_class: str) -> dict[str, Any]:
    """``{field name: annotation}`` of an upstream dataclass (``Any`` where it cannot be read)."""
    module, _, name = qualified_class.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation naming something its module does not import
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def check_passthrough(values: dict[str, Any], key: str, qualified_class: str) -> list[str]:
    """One line per key of ``values`` (the section at dotted ``key``) that ``qualified_class``
    has no field for, or whose value clearly does not fit the field's annotation."""
    fields = upstream_fields(qualified_class)
    owner = qualified_class.rpartition(".")[2]
    problems = []
    for name, value in values.items():
        dotted = f"{key}.{name}"
        if name not in fields:
            problems.append(unknown_key(dotted, str(name), list(fields), key, owner=owner))
        elif not fits(value, fields[name]):
            problems.append(f"{dotted}: expected {type_name(fields[name])} ({owner}.{name}), got {value!r}")
    return problems


def fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (a YAML scalar / list / mapping) can be ``hint``; True when unsure."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def type_name(hint: Any) -> str:
    """How an error names an expected type: ``an integer``, ``one of ['a', 'b']``, ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (list, tuple):
        plural = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
        return f"a list of {plural.get(args[0], type_name(args[0])) if args else 'values'}"
    if origin is dict or hint is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def unknown_key(dotted: str, key: str, valid: list[str], where: str, *, owner: str = "") -> str:
    """``unknown key 'loss.tua_pos'; did you mean 'loss.tau_pos'? (valid keys under loss: ...)``."""
    parent = dotted[: -len(key)]
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f"; did you mean {' or '.join(repr(parent + c) for c in close)}?" if close else ""
    if len(valid) > 40:  # an upstream config class: its field list would drown the message
        return f"unknown key {dotted!r}{hint} (not one of the {len(valid)} {owner} fields accepted under {where})"
    return f"unknown key {dotted!r}{hint} (valid keys under {where}: {', '.join(sorted(valid))})"
