"""Extension points by name, in one place: detectors, benchmarks and noise variants.

Each registry maps a name to a factory. Built-ins register themselves where they are defined
(`@DETECTORS.register("keyword")`); a lookup first imports the module that holds them, so
`DETECTORS.get("keyword")` works whatever was imported before (the way lm-evaluation-harness's
registry and garak's plugin loading find things by name).

Third-party packages add names through a package entry-point group (`kvedge.detectors` for detectors):

    [project.entry-points."kvedge.detectors"]
    mine = "my_package.detector:make"

The group is read once, on the first lookup, and a plugin's object is imported only when its name is
asked for, so a broken plugin breaks only its own name. A built-in name is never overridden: a plugin
that claims one (or two distributions that claim the same name) is an error naming the distribution,
raised when that name is looked up. Every command that takes a name then accepts the plugin's.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any, Callable, Generic, TypeVar

from .errors import KvedgeError, UnknownName

T = TypeVar("T")


class PluginError(KvedgeError):
    """A third-party plugin that claims a name kvedge or another plugin holds, or that cannot be loaded."""


def _distribution(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return f"the package that provides {ep.value}"
    return f"the package {dist.name} {dist.version}"


class Registry(Generic[T]):
    def __init__(self, kind: str, home: str, group: str | None = None):
        self.kind = kind
        self._home = home  # the module whose import registers the built-ins
        self.group = group  # the entry-point group third-party packages add names through
        self._items: dict[str, T] = {}
        self._plugins: dict[str, list[Any]] | None = None  # name -> entry points, read on the first lookup
        self._loaded: dict[str, T] = {}  # plugins imported so far

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def _load(self) -> None:
        importlib.import_module(self._home)
        if self._plugins is None and self.group:
            found: dict[str, list[Any]] = {}
            for ep in importlib.metadata.entry_points(group=self.group):
                same = found.setdefault(ep.name, [])
                if all(ep.value != other.value for other in same):  # a distribution on the path twice
                    same.append(ep)
            self._plugins = found
        elif self._plugins is None:
            self._plugins = {}

    def _plugin(self, name: str) -> T:
        """The object a plugin's entry point names, imported now. A name kvedge holds is never a plugin's
        (unless the entry point names that very object: a plugin module that also registered itself)."""
        eps = self._plugins[name]
        if len(eps) > 1:
            raise PluginError(f"{self.kind} {name!r} is registered by more than one package: "
                              f"{', '.join(_distribution(ep) for ep in eps)}; uninstall one of them")
        try:
            obj = eps[0].load()
        except Exception as exc:  # the plugin's own import error, named as the plugin's
            if name in self._items:
                obj = None  # a clash either way; say so below
            else:
                raise PluginError(f"{self.kind} {name!r} from {_distribution(eps[0])} cannot be loaded "
                                  f"({eps[0].value}): {type(exc).__name__}: {exc}") from None
        if name in self._items and self._items[name] is not obj:
            raise PluginError(f"{self.kind} {name!r} is built into kvedge; {_distribution(eps[0])} registers "
                              f"another under that name (entry-point group {self.group}): uninstall it or "
                              f"rename its entry point")
        self._loaded[name] = obj
        return obj

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(dict.fromkeys([*self._items, *self._plugins]))

    def get(self, name: str) -> T:
        self._load()
        if name in self._loaded:
            return self._loaded[name]
        if name in self._plugins:
            return self._plugin(name)
        try:
            return self._items[name]
        except KeyError:
            raise UnknownName(f"unknown {self.kind} {name!r}: choose from {', '.join(self.names())}") from None

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items or name in self._plugins


DETECTORS: Registry[Callable] = Registry("detector", "kvedge.detectors", group="kvedge.detectors")
BENCHMARKS: Registry[Callable] = Registry("benchmark", "kvedge.datasets")
NOISE_VARIANTS: Registry[Callable] = Registry("noise variant", "kvedge.audit.noise")
