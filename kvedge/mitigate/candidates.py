"""What export considers, in the one order it tests them: from the safest candidate downward.

Choosing the cheapest of several candidates that each passed a test on the same prompts is a winner's
curse: with three candidates that each recover only half the damage, tested cheapest first on 30 prompts,
one passes by chance about nine times in ten. The fixed-sequence procedure avoids it without a
correction: test the candidates in an order fixed before any measurement, from the most bytes (the
safest) down, stop at the first that is not shown `equivalent` (kvedge.audit.verdict), and deploy the
last one that was. Each test is then at the full 5% level.

Kinds:
- `kv`: a K/V cache type pair on the original model (llama.cpp's `--cache-type-k/-v`);
- `smoothed`: the channel-smoothed model (and adapter) at the requested types;
- `per-layer`: a per-layer map of cache types (a `KVConfig` with overrides), which only kvedge's native
  llama.cpp build can run; sources of such candidates register in `PER_LAYER_SOURCES`;
- `k-transform`: the original model carrying kvedge's K transform (centring and/or per-channel scales of K
  after RoPE, in GGUF metadata) at the requested types, which only kvedge's native llama.cpp applies.

Where the K transform goes: right after the widest rung, in place of the intermediate rungs. It costs no KV
bytes over the unmitigated config, so when it is shown equivalent it beats every intermediate rung, and when it
is not the sequence stops there (the widest rung, when shown equivalent, is deployed): either way no
intermediate rung would be tested after it, so they leave the sequence, and only candidates of no more bytes
follow it (the others at the unmitigated config's bytes, then the unmitigated config). Placed by bytes, it
would come after every intermediate rung, and one inconclusive rung (a 1.16x cache that recovers most of the
damage) would keep it from ever being tested. The order is fixed here, before any measurement.

Pruned by PCR's evidence: only the cache PCR names as the carrier gets more bits (K alone, V alone, or
both stepping up together), so a carrier-K diagnosis at q4_0 considers K at q8_0, q5_1, q5_0, q4_1,
iq4_nl and q4_0 with V as asked. At equal bytes the plain cache types come first, then the smoothed
model (a change of the weights), then the unmitigated config. f16 for both caches is not a candidate: it is
the reference, and the recommendation when no candidate is shown equivalent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..gguf import kvtypes
from ..gguf.model import ModelInfo
from ..llama.runtime import F16, KVConfig

# the quantized cache types llama.cpp takes: the steps of the ladder (an unquantized cache is the reference)
LADDER_TYPES: tuple[str, ...] = kvtypes.QUANTIZED


MODIFIED = ("smoothed", "k-transform")  # kinds that run a model file export writes
SUFFIX = {"smoothed": " smoothed", "k-transform": " k-transform"}


@dataclass(frozen=True)
class Candidate:
    kind: str  # "kv" | "smoothed" | "per-layer" | "k-transform"
    kv: KVConfig  # the cache types (a per-layer map for kind "per-layer")
    rotation: bool

    @property
    def smoothed(self) -> bool:
        return self.kind == "smoothed"

    @property
    def transformed(self) -> bool:
        return self.kind == "k-transform"

    @property
    def modified(self) -> bool:
        """Runs a model file export writes (smoothed weights, or the K transform's metadata), not the original."""
        return self.kind in MODIFIED

    @property
    def label(self) -> str:
        cfg = self.kv.name if not self.kv.quantized else f"{self.kv.name} rot={'on' if self.rotation else 'off'}"
        return cfg + SUFFIX.get(self.kind, "")

    def bytes_per_token(self, model: ModelInfo) -> int:
        return self.kv.bytes_per_token(model)

    def layer_types(self, model: ModelInfo) -> list[list[str]] | None:
        """Per layer [type_k, type_v], for a map; None for a uniform cache."""
        if not self.kv.per_layer:
            return None
        return [[k, v] for k, v in zip(self.kv.types("k", model.n_layer), self.kv.types("v", model.n_layer))]


# (model, unmitigated config, rotation, PCR verdict dict) -> per-layer candidates
PerLayerSource = Callable[[ModelInfo, KVConfig, bool, dict], list[Candidate]]
PER_LAYER_SOURCES: list[PerLayerSource] = []


def _wider(t: str) -> list[str]:
    """Types with at least the bytes of `t`, fewest bytes first (ties in llama.cpp's list order, `t` last)."""
    b = kvtypes.bytes_per_value(t)
    return sorted((x for x in LADDER_TYPES if kvtypes.bytes_per_value(x) >= b),
                  key=lambda x: (kvtypes.bytes_per_value(x), x == t, LADDER_TYPES.index(x)))


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


def _rank(t: str) -> int:
    return LADDER_TYPES.index(t) if t in LADDER_TYPES else -1


def sequence(model: ModelInfo, base: KVConfig, rotation: bool, carrier: str, smoothed: bool,
             verdict: dict, transformed: bool = False) -> list[Candidate]:
    """Every candidate, in the order export tests them: most KV bytes first, the K transform right after the
    widest rung (see above). The unmitigated config is last. A model with MLA attention takes one type for K
    and V, so its ladder widens both together."""
    if model.mla:
        carrier = "both"
    out = [Candidate("kv", kv, rotation) for kv in kv_ladder(base, carrier) if kv != base]
    for source in PER_LAYER_SOURCES:
        out.extend(source(model, base, rotation, verdict))
    if model.mla:
        out = [c for c in out if c.kv.type_k == c.kv.type_v and c.kv.layers_k == c.kv.layers_v]
    if smoothed:
        out.append(Candidate("smoothed", base, rotation))
    unmitigated = Candidate("kv", base, rotation)

    def order(c: Candidate) -> tuple:
        # bytes down; at equal bytes the other cache types, then smoothing, then the unmitigated config
        return (-c.bytes_per_token(model), c == unmitigated, c.smoothed, _rank(c.kv.type_k), _rank(c.kv.type_v),
                c.label)

    ordered = sorted(dict.fromkeys([*out, unmitigated]), key=order)
    if transformed:
        kt = Candidate("k-transform", base, rotation)
        widest = ordered[:1] if ordered[0].bytes_per_token(model) > kt.bytes_per_token(model) else []
        # after the transform only candidates of no more bytes: "the last shown equivalent" must be the cheapest
        rest = [c for c in ordered if c not in widest and c.bytes_per_token(model) <= kt.bytes_per_token(model)]
        ordered = [*widest, kt, *rest]
    return ordered


def prescription(verdict: dict, base: KVConfig, rotation: bool, smoothed: bool) -> Candidate:
    """PCR's prescription as a candidate: the smoothed model when the verdict calls for smoothing and it was
    built; otherwise the cache types the verdict suggests (the unmitigated config when it found nothing)."""
    if verdict["mode"] == "outlier-crushes-safety" and smoothed:
        return Candidate("smoothed", base, rotation)
    s = verdict.get("suggested") or {}
    return Candidate("kv", KVConfig(s.get("type_k", base.type_k), s.get("type_v", base.type_v)), rotation)
