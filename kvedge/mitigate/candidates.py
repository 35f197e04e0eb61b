"""What export considers, in the order it measures them.

Kinds:
- `kv`: a K/V cache type pair on the original model (llama.cpp's `--cache-type-k/-v`);
- `smoothed`: the channel-smoothed model (and adapter) at the requested types;
- `per-layer`: a map of cache types per layer. kvedge's native build runs such maps (audits, PCR's
  prescription), but a deployment of one needs that patched llama.cpp on the device and no stock runtime
  can be told a map, so export proposes none yet; a source that does registers in `PER_LAYER_SOURCES`.

Pruned by PCR's evidence: only the cache PCR names as the carrier gets more bits (K alone, V alone, or
both stepping up together), so a carrier-K diagnosis at q4_0 considers 7 K types instead of 49 pairs.
Ordered by KV bytes per token; at equal bytes PCR's prescription first, then the unmitigated config.
f16 for both caches is not a candidate: it is the reference, and the recommendation when none qualifies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..gguf import kvtypes
from ..gguf.model import ModelInfo
from ..llama.runtime import F16, KVConfig

# llama.cpp's cache types that save memory over f16 (f32 and bf16 never do)
LADDER_TYPES: tuple[str, ...] = tuple(t for t in kvtypes.NAMES if kvtypes.bytes_per_value(t) <= kvtypes.bytes_per_value("f16")
                                      and t != "bf16")


@dataclass(frozen=True)
class Candidate:
    kind: str  # "kv" | "smoothed" | "per-layer"
    kv: KVConfig
    rotation: bool
    layer_types: tuple[tuple[str, str], ...] | None = None  # per layer (type_k, type_v), kind "per-layer"

    @property
    def smoothed(self) -> bool:
        return self.kind == "smoothed"

    @property
    def label(self) -> str:
        if self.kind == "per-layer":
            return f"per-layer map rot={'on' if self.rotation else 'off'}"
        cfg = self.kv.name if not self.kv.quantized else f"{self.kv.name} rot={'on' if self.rotation else 'off'}"
        return cfg + (" smoothed" if self.smoothed else "")

    def bytes_per_token(self, model: ModelInfo) -> int:
        if self.layer_types is None:
            return self.kv.bytes_per_token(model)
        return int(round(sum(model.n_embd_k_gqa * kvtypes.bytes_per_value(tk) + model.n_embd_v_gqa * kvtypes.bytes_per_value(tv)
                             for tk, tv in self.layer_types)))

    def to_dict(self, model: ModelInfo) -> dict:
        return {"label": self.label, "kind": self.kind, "type_k": self.kv.type_k, "type_v": self.kv.type_v,
                "rotation": self.rotation, "smoothed": self.smoothed, "layer_types": self.layer_types,
                "kv_bytes_per_token": self.bytes_per_token(model)}


# (model, unmitigated config, rotation, PCR verdict dict) -> per-layer candidates
PerLayerSource = Callable[[ModelInfo, KVConfig, bool, dict], list[Candidate]]
PER_LAYER_SOURCES: list[PerLayerSource] = []


def measure_per_layer(candidate: Candidate) -> None:
    raise NotImplementedError("export cannot deploy per-layer cache types yet: stock runtimes take one type "
                              "for K and one for V (audit a map with kvedge audit --kv on the native build)")


def _wider(t: str) -> list[str]:
    """Types with at least the bytes of `t`, in order of bytes (ties in llama.cpp's list order)."""
    b = kvtypes.bytes_per_value(t)
    return sorted((x for x in LADDER_TYPES if kvtypes.bytes_per_value(x) >= b),
                  key=lambda x: (kvtypes.bytes_per_value(x), x != t, LADDER_TYPES.index(x)))


def kv_ladder(base: KVConfig, carrier: str) -> list[KVConfig]:
    """More bits for the carrier cache, from the unmitigated config up."""
    ks, vs = _wider(base.type_k), _wider(base.type_v)
    if carrier == "K":
        pairs = [KVConfig(k, base.type_v) for k in ks]
    elif carrier == "V":
        pairs = [KVConfig(base.type_k, v) for v in vs]
    else:
        pairs = [KVConfig(ks[min(i, len(ks) - 1)], vs[min(i, len(vs) - 1)]) for i in range(max(len(ks), len(vs)))]
    return [p for p in dict.fromkeys(pairs) if p != F16]


def candidates(model: ModelInfo, base: KVConfig, rotation: bool, carrier: str, prescription: Candidate | None,
               smoothed: bool, verdict: dict) -> list[Candidate]:
    """Every candidate, in the order export measures them."""
    out = [Candidate("kv", kv, rotation) for kv in kv_ladder(base, carrier)]
    if smoothed:
        out.append(Candidate("smoothed", base, rotation))
    for source in PER_LAYER_SOURCES:
        out.extend(source(model, base, rotation, verdict))
    unmitigated = Candidate("kv", base, rotation)

    def order(c: Candidate) -> tuple:
        return (c.bytes_per_token(model), c != prescription, c != unmitigated, c.label)

    return sorted(dict.fromkeys(out), key=order)


def prescription(verdict: dict, base: KVConfig, rotation: bool, smoothed: bool) -> Candidate:
    """PCR's prescription as a candidate: the smoothed model when the verdict calls for smoothing and it was
    built; otherwise the cache types the verdict suggests (the unmitigated config when it found nothing)."""
    if verdict["mode"] == "outlier-crushes-safety" and smoothed:
        return Candidate("smoothed", base, rotation)
    s = verdict.get("suggested") or {}
    return Candidate("kv", KVConfig(s.get("type_k", base.type_k), s.get("type_v", base.type_v)), rotation)
