"""Type checks of the options dataclasses (:class:`~bayeslora.config.TrainConfig`, each method's config): a value
of the wrong type, from Python or a JSON file, is refused by name before it reaches arithmetic deep inside."""

from __future__ import annotations

import dataclasses
import types
import typing

#: the annotations checked; others (lists, dicts, nested configs) are left to the class's own checks
_SCALARS = {int: "an int", float: "a number", bool: "true or false", str: "a string"}


def _expected(annotation) -> tuple[type | None, bool]:
    """``(scalar type, None allowed)`` of a field annotation; ``(None, _)`` where it is not a plain scalar."""
    if annotation in _SCALARS:
        return annotation, False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in _SCALARS:
            return rest[0], len(rest) < len(args)
    return None, False


def _fits(value, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_field_types(instance, error: type[Exception], what: str = "") -> None:
    """Raise ``error`` naming the first field of dataclass ``instance`` whose value does not have its annotated
    scalar type (``int``, ``float``, ``bool``, ``str``, optionally ``| None``). A bool is not an int here, and an
    int is a number."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        kind, optional = _expected(hints.get(f.name))
        value = getattr(instance, f.name)
        if kind is None or (optional and value is None) or _fits(value, kind):
            continue
        allowed = _SCALARS[kind] + (" or null" if optional else "")
        raise error(f"Expected {what}`{f.name}` to be {allowed}, but got {value!r} ({type(value).__name__})")
