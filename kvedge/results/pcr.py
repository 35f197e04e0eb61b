"""The results of `kvedge pcr` (schema kvedge.pcr/1) and `kvedge sweep` (kvedge.sweep/1), as typed values.

`to_dict()` of `PcrResult` / `SweepResult` is the pcr.json / sweep.json document, key for key in the order
docs/pcr.md lists them; `from_dict()` reads a file back (what `kvedge export` and
`kvedge.api.prescribed_layer_map` do). The classifier's `Evidence` and `Diagnosis` live here because they
are part of the result; `kvedge.pcr.classify` builds them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from ..stats import Estimate
from . import Result, omit_none

PCR_SCHEMA = "kvedge.pcr/1"
SWEEP_SCHEMA = "kvedge.sweep/1"


# --- the pieces the classifier reads and writes -----------------------------------------------------
@dataclass(frozen=True)
class Evidence(Result):
    """What the verdict is read from. `damage_*` are all-layer damages (share of the gap erased) at the
    audited cache types; `beyond_noise` says whether the K+V damage's interval clears the noise floor."""

    damage_both: float
    damage_k: float
    damage_v: float
    beyond_noise: bool
    top3_recovery: float | None
    weighted_pcr: float | None
    overlap: float | None
    top_layers: tuple[int, ...]
    type_k: str
    type_v: str
    margin_drop: float | None = None  # mean drop of the refusal-vs-compliance margin on harmful prompts
    margin_drop_lo: float | None = None  # its interval's lower bound
    top_damage_k: float | None = None  # single-layer K damage summed over `top_layers`
    top_damage_v: float | None = None  # single-layer V damage summed over `top_layers`
    config: str | None = None  # the audited config's name, where types alone do not say it (a per-layer map)


@dataclass(frozen=True)
class Diagnosis(Result):
    mode: str
    carrier: str  # "K", "V" or "K and V": which cache carries the damage
    reasons: tuple[str, ...]  # the rule that fired, with its numbers
    prescription: str
    suggested: dict[str, Any]  # a runtime setting to try: type_k, type_v (and layers for smoothing)


@dataclass(frozen=True)
class Amplification(Result):
    value: float  # (error along r relative to the gap) / (whole-vector relative error)
    isotropic: float  # what `value` would be if the error had no preferred direction
    directional: float  # value / isotropic: > 1 when the error concentrates along r


# --- fidelity ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantFidelity(Result):
    rotation: bool
    llama_kld: float  # mean over positions of KL(llama.cpp f16 || llama.cpp quantized)
    sim_kld: float  # the same for the torch simulation
    ratio: float | None  # sim / llama.cpp
    spearman: float | None  # of per-prompt mean KLDs
    n_prompts: int
    meets_target: bool


@dataclass(frozen=True)
class FidelityTargets(Result):
    f16_top1: float
    f16_kld: float
    ratio: tuple[float, float]
    spearman: float


@dataclass(frozen=True)
class Fidelity(Result):
    f16_top1: float
    f16_kld: float
    n_positions: int
    quantized: tuple[QuantFidelity, ...]
    verified_architecture: bool
    f16_meets_target: bool
    targets: FidelityTargets


# --- one PCR pass ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PcrModel(Result):
    path: str
    sha256: str
    architecture: str
    n_layer: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int


@dataclass(frozen=True, kw_only=True)
class KvSection(Result):
    """The audited cache: its name, types and (for a per-layer map) overrides as [layer, type] pairs."""

    name: str
    type_k: str
    type_v: str
    layers_k: tuple[tuple[int, str], ...] | None = omit_none()
    layers_v: tuple[tuple[int, str], ...] | None = omit_none()
    bytes_per_token: int


@dataclass(frozen=True)
class CalibPromptInfo(Result):
    id: str
    subset: str
    harmful: bool
    n_tokens: int


@dataclass(frozen=True)
class Calibration(Result):
    split: str
    n_harmful: int
    n_harmless: int
    prompts: tuple[CalibPromptInfo, ...]
    shared_prefix_tokens: int
    refusal_tokens: tuple[str, ...]
    compliance_tokens: tuple[str, ...]


@dataclass(frozen=True)
class Signal(Result):
    readout_layer: int
    gap: float
    separation: tuple[float, ...]
    margin_f16_harmful: Estimate
    margin_f16_harmless: Estimate


@dataclass(frozen=True)
class NoiseFloor(Result):
    what: str
    damage: Estimate
    floor: float


@dataclass(frozen=True)
class CacheRun(Result):
    """One simulated run of the whole network under a cache plan, against the f16 reference."""

    damage: Estimate
    margin_drop_harmful: Estimate
    relative_l2_readout: float
    kld_harmless: Estimate
    amplification: Amplification | None


@dataclass(frozen=True)
class AllLayers(Result):
    k_and_v: CacheRun
    k_only: CacheRun | None
    v_only: CacheRun | None


@dataclass(frozen=True)
class Concentration(Result):
    top3_layers: tuple[int, ...]
    top3_share: float | None
    damage_without_top3: float
    top3_recovery: float | None


@dataclass(frozen=True)
class PcrLayers(Result):
    bits_k: int | None
    bits_v: int | None
    layers: tuple[int, ...]
    weighted_mean: float | None


@dataclass(frozen=True)
class LayerReduction(Result):
    """PCR of one layer: group-32 against per-channel damage at the audited bit width."""

    damage_group32: float
    damage_group32_lo: float | None
    damage_channel: float
    pcr: float | None


@dataclass(frozen=True, kw_only=True)
class LayerRow(Result):
    """One layer of `per_layer`. The outlier keys exist for the caches quantized at that layer (up to the
    readout layer); on the PCR layers, `reduction`'s keys sit in the row itself."""

    layer: int
    separation: float
    damage_k: float | None
    damage_v: float | None
    outliers_k: int | None = omit_none()
    overlap_k: float | None = omit_none()
    outliers_v: int | None = omit_none()
    overlap_v: float | None = omit_none()
    reduction: LayerReduction | None = omit_none()

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        return d | d.pop("reduction", {})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerRow":
        own = {f.name for f in fields(LayerReduction)}
        row = {k: v for k, v in data.items() if k not in own}
        if own <= set(data):
            row["reduction"] = {k: data[k] for k in own}
        return super().from_dict(row)


@dataclass(frozen=True, kw_only=True)
class MapRow(Result):
    """A per-layer map the search simulated (`layers`: the upgraded ones; absent on the uniform upgrade)."""

    layers: tuple[int, ...] | None = omit_none()
    kv: str
    bytes_per_token: int
    vs_audited: float
    damage: Estimate
    margin_drop_harmful: Estimate
    safe: bool
    within_noise: bool


@dataclass(frozen=True)
class MapAudited(Result):
    kv: str
    bytes_per_token: int


@dataclass(frozen=True, kw_only=True)
class LayerMap(Result):
    """The per-layer map search (pcr/layermap.py): `reason` when not searched, else the rest."""

    searched: bool
    reason: str | None = omit_none()
    criterion: str | None = omit_none()
    carrier: str | None = omit_none()
    ranking: tuple[int, ...] | None = omit_none()
    audited: MapAudited | None = omit_none()
    tried: tuple[MapRow, ...] | None = omit_none()
    chosen: MapRow | None = None  # the first safe row; null when searched and none was
    uniform_upgrade: MapRow | None = omit_none()

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if not self.searched:
            d.pop("chosen", None)
        return d


@dataclass(frozen=True)
class RotationResult(Result):
    rotation: bool
    scheme_k: str
    scheme_v: str
    all_layers: AllLayers
    concentration: Concentration
    pcr: PcrLayers
    overlap: float | None
    per_layer: tuple[LayerRow, ...]
    evidence: Evidence
    verdict: Diagnosis
    layer_map: LayerMap


@dataclass(frozen=True)
class PcrTiming(Result):
    seconds: float
    llama_cpp_seconds: float
    load_seconds: float
    torch_runs: int
    threads: int


@dataclass(frozen=True)
class PcrResult(Result):
    schema: str
    kvedge_version: str
    model: PcrModel
    adapter: str | None
    kv: KvSection
    calibration: Calibration
    signal: Signal
    noise_floor: NoiseFloor
    fidelity: Fidelity
    rotations: tuple[RotationResult, ...]
    timing: PcrTiming

    def at(self, rotation: bool) -> RotationResult | None:
        """The entry of one rotation setting (None when the pass did not run it)."""
        return next((r for r in self.rotations if r.rotation is rotation), None)


# --- the sweep ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepModel(Result):
    path: str
    sha256: str
    architecture: str


@dataclass(frozen=True, kw_only=True)
class HeldMap(Result):
    """With `--kv <map>`: the map whose named layers keep their types while the others sweep."""

    kv: str
    type_k: str
    type_v: str
    layers_k: tuple[tuple[int, str], ...] | None = omit_none()
    layers_v: tuple[tuple[int, str], ...] | None = omit_none()


@dataclass(frozen=True)
class SweepNoise(Result):
    damage: Estimate
    floor: float


@dataclass(frozen=True)
class SweepPoint(Result):
    bits: int
    bits_per_value: float
    damage: Estimate
    margin_drop_harmful: Estimate
    kld_harmless: Estimate
    relative_l2_readout: float


@dataclass(frozen=True)
class Transition(Result):
    collapse_bits: int | None
    safe_bits: int | None


@dataclass(frozen=True)
class Curve(Result):
    rotation: bool
    cache: str  # "k", "v" or "k+v"
    points: tuple[SweepPoint, ...]
    transition: Transition


@dataclass(frozen=True)
class SweepTiming(Result):
    seconds: float
    torch_runs: int
    threads: int


@dataclass(frozen=True)
class SweepResult(Result):
    schema: str
    kvedge_version: str
    model: SweepModel
    adapter: str | None
    held: HeldMap | None
    readout_layer: int
    gap: float
    noise_floor: SweepNoise
    collapse_threshold: float
    safe_threshold: float
    curves: tuple[Curve, ...]
    timing: SweepTiming
