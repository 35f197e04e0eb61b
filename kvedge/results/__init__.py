"""What kvedge's commands produce, as typed values: the audit, PCR, sweep, compare, deployment and verify
results. Features build them, `kvedge.report` renders them, and their JSON is the documented schema
(docs/reference). Nothing here imports a feature package or a renderer.

Every result is a dataclass deriving from `Result`: `to_dict()` gives the JSON document field by field in
declaration order (so the files keep their key order), and `from_dict()` reads one back, converting nested
dicts into the declared dataclasses. A field whose metadata says `omit_none` is left out of the document
while it is None (keys that only some entries carry, like a run's comparison with the reference).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import lru_cache
from typing import Any, TypeVar, Union

R = TypeVar("R", bound="Result")


def omit_none(default: Any = None) -> Any:
    """A field left out of the JSON document while it is None."""
    return dataclasses.field(default=default, metadata={"omit_none": True})


def plain(value: Any) -> Any:
    """JSON-ready form of a value: dataclasses as dicts (through their own `to_dict` when they have one),
    tuples as lists, recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        if to_dict is not None:
            return to_dict()
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(tp: Any, value: Any) -> Any:
    """`value` (parsed JSON) as type `tp`: dataclasses built from dicts, containers element by element."""
    if value is None or tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        for a in args:
            if dataclasses.is_dataclass(a) and isinstance(value, dict):
                return _convert(a, value)
        return _convert(args[0], value) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"{tp.__name__} expects an object, not {type(value).__name__}")
        reader = getattr(tp, "from_dict", None)
        return reader(value) if reader is not None else _build(tp, value)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_convert(inner, v) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict:
        args = typing.get_args(tp)
        inner = args[1] if len(args) == 2 else Any
        return {k: _convert(inner, v) for k, v in value.items()}
    return value


def _build(cls: type, data: dict[str, Any]) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name])
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {sorted(unknown)[0]!r}")
    return cls(**kwargs)


class Result:
    """Base of every result dataclass: JSON out in declaration order, JSON back in by declared types."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = plain(v)
        return out

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        return _build(cls, data)
