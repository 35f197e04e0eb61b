"""KV cache configurations: the K and V cache types, uniform or per layer.

One config is written without commas (`--kv` takes a comma-separated list of them):

    q8_0                          K and V at q8_0 on every layer
    k=q8_0/v=q4_0                 K and V apart (a half left out stays f16)
    k=q4_0@11+17+19:q8_0/v=q4_0   K at q4_0 but q8_0 on layers 11, 17 and 19; V at q4_0
    q4_0@0-3:q8_0@29:f16          K and V alike: q4_0, layers 0-3 at q8_0, layer 29 at f16

A cache is a base type and `@<layers>:<type>` overrides; layers are `N` or `N-M` joined by `+`, later
overrides win. `resolve(model)` checks the layers against the model and makes the spelling canonical:
the base becomes the type most layers hold, so every spelling of one map has one name (the label in
reports and the store key) and a map that sets every layer alike is the uniform config. Per-layer
configs run on kvedge's native llama.cpp build (`kvedge.llama.native`), which reads `layer_types_env()`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from ..errors import KVTypeError
from . import kvtypes
from .model import ModelInfo

Overrides = tuple[tuple[int, str], ...]  # (layer, type), sorted by layer, each type unlike the base

_SYNTAX = "write `q8_0`, `k=q8_0/v=q4_0` or `k=q4_0@11+17+19:q8_0/v=q4_0`"
_HALVES = re.compile(r"/|:(?=\s*[kv]\s*=)")  # `k=q8_0:v=q4_0` is also accepted, as it always was
_LAYERS = re.compile(r"^(\d+)(?:-(\d+))?$")


def _ranges(layers: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for l in sorted(layers):
        if out and l == out[-1][1] + 1:
            out[-1] = (out[-1][0], l)
        else:
            out.append((l, l))
    return out


def _range_text(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}-{b}"


def _by_type(overrides: Overrides) -> list[tuple[str, list[int]]]:
    """Overrides grouped by type, the group holding the lowest layer first."""
    groups: dict[str, list[int]] = {}
    for layer, t in sorted(overrides):
        groups.setdefault(t, []).append(layer)
    return list(groups.items())


def cache_text(base: str, overrides: Overrides) -> str:
    """`q4_0@11+17+19:q8_0`: the canonical spelling of one cache."""
    return base + "".join(f"@{'+'.join(_range_text(a, b) for a, b in _ranges(ls))}:{t}" for t, ls in _by_type(overrides))


@dataclass(frozen=True, order=True)
class KVConfig:
    """`type_k` / `type_v`: the types of every layer the overrides do not name (the context's types in
    llama.cpp); `layers_k` / `layers_v`: per-layer overrides."""

    type_k: str
    type_v: str
    layers_k: Overrides = ()
    layers_v: Overrides = ()

    @property
    def per_layer(self) -> bool:
        return bool(self.layers_k or self.layers_v)

    @property
    def name(self) -> str:
        k, v = cache_text(self.type_k, self.layers_k), cache_text(self.type_v, self.layers_v)
        return k if k == v else f"k={k}/v={v}"

    def _all_types(self, kind: str) -> set[str]:
        base, over = (self.type_k, self.layers_k) if kind == "k" else (self.type_v, self.layers_v)
        return {base, *(t for _, t in over)}

    @property
    def quantized(self) -> bool:
        return any(kvtypes.is_quantized(t) for t in self._all_types("k") | self._all_types("v"))

    @property
    def k_quantized(self) -> bool:
        return any(kvtypes.is_quantized(t) for t in self._all_types("k"))

    @property
    def v_quantized(self) -> bool:
        return any(kvtypes.is_quantized(t) for t in self._all_types("v"))

    def types(self, kind: str, n_layer: int) -> tuple[str, ...]:
        """The type of each layer's K (`kind="k"`) or V cache."""
        base, over = (self.type_k, self.layers_k) if kind == "k" else (self.type_v, self.layers_v)
        at = dict(over)
        return tuple(at.get(l, base) for l in range(n_layer))

    def bytes_per_token(self, model: ModelInfo) -> int:
        """KV cache bytes one token costs, summed over the layers, from the GGUF's shapes and ggml's sizes."""
        total = sum(model.n_embd_k_gqa * kvtypes.bytes_per_value(tk) + model.n_embd_v_gqa * kvtypes.bytes_per_value(tv)
                    for tk, tv in zip(self.types("k", model.n_layer), self.types("v", model.n_layer)))
        return int(round(total))

    def check_fits(self, model: ModelInfo) -> None:
        for which, kind, width in (("K", "k", model.head_dim_k), ("V", "v", model.head_dim_v)):
            for t in sorted(self._all_types(kind)):
                block = kvtypes.block_size(t)
                if width % block:
                    raise KVTypeError(f"{which} cache type {t} needs a head size divisible by {block}, model has {width}")
        if model.mla and (self._all_types("k") != self._all_types("v") or self.layers_k != self.layers_v):
            raise KVTypeError(f"{model.name} ({model.architecture}) uses MLA attention: llama.cpp takes one cache "
                              f"type for K and V, not {self.name}")
        beyond = sorted({l for l, _ in self.layers_k + self.layers_v if l >= model.n_layer})
        if beyond:
            raise KVTypeError(f"KV config {self.name} names layer {beyond[0]}, but {model.name} has layers "
                              f"0-{model.n_layer - 1}")

    def resolve(self, model: ModelInfo) -> "KVConfig":
        """This config checked against `model` and spelled canonically: each cache's base is the type most
        layers hold (ties go to kvtypes' order), the overrides are the layers that differ."""
        self.check_fits(model)
        halves = []
        for kind in ("k", "v"):
            types = self.types(kind, model.n_layer)
            count = Counter(types)
            base = max(kvtypes.NAMES, key=lambda t: (count[t], -kvtypes.NAMES.index(t)))
            halves.append((base, tuple((l, t) for l, t in enumerate(types) if t != base)))
        (bk, ok), (bv, ov) = halves
        return KVConfig(bk, bv, ok, ov)

    def layer_types_env(self) -> str | None:
        """The value of the native build's LLAMA_KV_LAYER_TYPES for this config (None when uniform):
        `k=11:q8_0,17:q8_0;v=0-3:f16`, overrides of the context's type_k / type_v."""
        if not self.per_layer:
            return None
        parts = []
        for kind, over in (("k", self.layers_k), ("v", self.layers_v)):
            if over:
                entries = sorted((a, b, t) for t, ls in _by_type(over) for a, b in _ranges(ls))
                parts.append(f"{kind}=" + ",".join(f"{_range_text(a, b)}:{t}" for a, b, t in entries))
        return ";".join(parts)

    def key(self) -> dict:
        """The store key's fields for this config; a uniform config's are what they always were."""
        out: dict = {"type_k": self.type_k, "type_v": self.type_v}
        if self.layers_k:
            out["layers_k"] = [list(x) for x in self.layers_k]
        if self.layers_v:
            out["layers_v"] = [list(x) for x in self.layers_v]
        return out


F16 = KVConfig("f16", "f16")  # the reference cache


def _parse_layers(text: str, spec: str) -> list[int]:
    out: list[int] = []
    for item in text.split("+"):
        m = _LAYERS.match(item.strip())
        if not m:
            raise KVTypeError(f"malformed layers {text!r} in KV config {spec!r}: write N, N-M or N+M+...")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise KVTypeError(f"empty layer range {item.strip()!r} in KV config {spec!r}")
        out.extend(range(a, b + 1))
    return out


def _parse_cache(text: str, spec: str) -> tuple[str, Overrides]:
    base_text, *overrides = text.split("@")
    base = kvtypes.check(base_text)
    at: dict[int, str] = {}
    for item in overrides:
        layers, sep, t = item.partition(":")
        if not sep:
            raise KVTypeError(f"malformed layer override {'@' + item!r} in KV config {spec!r}: {_SYNTAX}")
        t = kvtypes.check(t)
        for l in _parse_layers(layers, spec):
            at[l] = t
    return base, tuple(sorted((l, t) for l, t in at.items() if t != base))


def parse_kv(spec: str) -> KVConfig:
    """One KV config (see the module's docstring); KVTypeError for anything malformed. Layers are checked
    against a model by `KVConfig.resolve`."""
    s = spec.strip().lower()
    if not s:
        raise KVTypeError("empty KV config")
    if "=" not in s:
        base, over = _parse_cache(s, spec)
        return KVConfig(base, base, over, over)
    halves = {"k": ("f16", ()), "v": ("f16", ())}
    seen: set[str] = set()
    for half in _HALVES.split(s):
        key, sep, val = half.partition("=")
        key = key.strip()
        if not sep or key not in ("k", "v") or key in seen:
            raise KVTypeError(f"malformed KV config {spec!r}: {_SYNTAX}")
        seen.add(key)
        halves[key] = _parse_cache(val, spec)
    (bk, ok), (bv, ov) = halves["k"], halves["v"]
    return KVConfig(bk, bv, ok, ov)


def parse_kv_list(spec: str) -> list[KVConfig]:
    configs = [parse_kv(s) for s in spec.split(",") if s.strip()]
    if not configs:
        raise KVTypeError("no KV config given")
    return list(dict.fromkeys(configs))
