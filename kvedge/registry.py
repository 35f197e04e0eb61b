"""Extension points by name, in one place: detectors, benchmarks and noise variants.

Each registry maps a name to a factory. Implementations register themselves where they are defined
(`@DETECTORS.register("keyword")`); a lookup first imports the module that holds the built-in ones, so
`DETECTORS.get("keyword")` works whatever was imported before (the way lm-evaluation-harness's
registry and garak's plugin loading find things by name). A third-party detector registers itself the
same way, and every command that takes a name then accepts it.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from .errors import UnknownName

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, home: str):
        self.kind = kind
        self._home = home  # the module whose import registers the built-ins
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def _load(self) -> None:
        importlib.import_module(self._home)

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(self._items)

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownName(f"unknown {self.kind} {name!r}: choose from {', '.join(self._items)}") from None

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items


DETECTORS: Registry[Callable] = Registry("detector", "kvedge.detectors")
BENCHMARKS: Registry[Callable] = Registry("benchmark", "kvedge.datasets")
NOISE_VARIANTS: Registry[Callable] = Registry("noise variant", "kvedge.audit.noise")
