"""The results of `kvedge pcr` (schema kvedge.pcr/2) and `kvedge sweep` (kvedge.sweep/2), as typed values.

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

PCR_SCHEMA = "kvedge.pcr/2"
SWEEP_SCHEMA = "kvedge.sweep/2"

POPULATIONS = ("harmful", "benign")
# The direction of (simulated - f16) that fails each population, for the margin and the readout signal
# alike: harmful prompts losing their refusal (falling), benign prompts gaining one (rising).
FAILURE_SIGN = {"harmful": -1.0, "benign": 1.0}


def failure_signed(e: Estimate, population: str) -> Estimate:
    """An estimate of (simulated - f16) turned so that positive is the population's failure direction."""
    if FAILURE_SIGN[population] > 0:
        return e
    neg = (lambda x: None if x is None else -x)
    return Estimate(neg(e.value), neg(e.hi), neg(e.lo), e.n, e.method)


# --- the pieces the classifier reads and writes -----------------------------------------------------
@dataclass(frozen=True)
class PopulationShift(Result):
    """How one population's first-token refusal margin moved under the audited cache (K and V, all
    layers), judged against that population's noise floor (an f32 cache against the f16 reference)."""

    population: str  # "harmful" or "benign"
    margin_shift: Estimate  # mean of m_q - m_f16 over the population's prompts, nats (+: toward refusal)
    damage: Estimate  # the readout signal's move in the failure direction, share of the f16 gap
    noise_floor: float  # the margin's noise floor for this population, nats
    moved: bool  # the margin shift's interval clears +-noise_floor
    direction: str | None  # "toward refusal" / "away from refusal" when it moved
    failure: bool  # it moved the way that fails this population (harmful: away, benign: toward refusal)
    safe: bool  # the failure-direction shift's interval stays below the safe band (SAFE_SHIFT nats)
    strength: float | None  # |shift| over the larger of the noise floor and the interval's half-width

    @property
    def failure_shift(self) -> Estimate:
        """The margin shift, positive in this population's failure direction."""
        return failure_signed(self.margin_shift, self.population)


FAILURE = {"harmful": "refusals lost", "benign": "over-refusal"}  # what a population's failure direction means


def describe(p: PopulationShift) -> str:
    """One population's movement in words, as the verdict and the summaries state it:
    `benign prompts move toward refusal (over-refusal): margin +0.72 [+0.40, +1.01] nats (n=30)`."""
    e = p.margin_shift
    m = f"{e.value:+.2f}" if e.value is not None else "n/a"
    if e.lo is not None and e.hi is not None:
        m += f" [{e.lo:+.2f}, {e.hi:+.2f}]"
    m += f" nats (n={e.n})"
    if not p.moved:
        return (f"{p.population} prompts show no shift beyond noise: margin {m}, its interval reaching the noise "
                f"floor +-{p.noise_floor:.3f}")
    what = f" ({FAILURE[p.population]})" if p.failure else ""
    return f"{p.population} prompts move {p.direction}{what}: margin {m}"


@dataclass(frozen=True)
class Evidence(Result):
    """What the verdict is read from. `populations`: both populations' all-layer movement; `population`:
    the one the rest follows (the one that moved the way that fails it, the strongest if both did).
    `shift_*`: that population's failure-signed margin shift (nats) with K alone / V alone quantized on all
    layers; `top_*` and `top3_recovery` rank and recover the same quantity."""

    populations: tuple[PopulationShift, ...]
    population: str
    shift_k: float
    shift_v: float
    top3_recovery: float | None
    weighted_pcr: float | None
    overlap: float | None
    top_layers: tuple[int, ...]
    type_k: str
    type_v: str
    top_shift_k: float | None = None  # single-layer K shift summed over `top_layers`
    top_shift_v: float | None = None  # single-layer V shift summed over `top_layers`
    config: str | None = None  # the audited config's name, where types alone do not say it (a per-layer map)

    @property
    def chosen(self) -> PopulationShift:
        return next(p for p in self.populations if p.population == self.population)

    @property
    def shift_both(self) -> float:
        return float(self.chosen.failure_shift.value or 0.0)


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
    """The f32-cache run against the f16 reference (a change of arithmetic only). Each floor is the largest
    absolute value in its estimate's 95% interval; an effect within +-floor is noise."""

    what: str
    damage: Estimate  # harmful prompts' signal damage (share of the gap)
    floor: float
    damage_benign: Estimate  # benign prompts' signal moving toward the harmful side (share of the gap)
    floor_benign: float
    margin_shift_harmful: Estimate  # m_q - m_f16, nats
    margin_floor_harmful: float
    margin_shift_benign: Estimate
    margin_floor_benign: float

    def margin_floor(self, population: str) -> float:
        return self.margin_floor_harmful if population == "harmful" else self.margin_floor_benign


@dataclass(frozen=True)
class CacheRun(Result):
    """One simulated run of the whole network under a cache plan, against the f16 reference. Damages are
    shares of the f16 gap in each population's failure direction; margin shifts are m_q - m_f16 (nats,
    positive toward refusal), each a mean over that population's prompts with a paired bootstrap interval."""

    damage: Estimate  # harmful: (s_f16 - s_q) / g, the gap erased
    damage_benign: Estimate  # benign: (s_q - s_f16) / g, the signal moving toward the harmful side
    margin_drop_harmful: Estimate  # m_f16 - m_q on harmful prompts (kvedge.pcr/1's field)
    margin_shift_harmful: Estimate
    margin_shift_benign: Estimate
    relative_l2_readout: float
    kld_harmless: Estimate
    amplification: Amplification | None

    def margin_shift(self, population: str) -> Estimate:
        return self.margin_shift_harmful if population == "harmful" else self.margin_shift_benign

    def failure_shift(self, population: str) -> Estimate:
        return failure_signed(self.margin_shift(population), population)


@dataclass(frozen=True)
class AllLayers(Result):
    k_and_v: CacheRun
    k_only: CacheRun | None
    v_only: CacheRun | None


@dataclass(frozen=True)
class Concentration(Result):
    """Where `population`'s failure-signed margin shift sits: the top-3 layers by single-layer shift, their
    share of the summed positive single-layer shifts, the all-layer shift with them kept at f16."""

    population: str
    top3_layers: tuple[int, ...]
    top3_share: float | None
    shift_without_top3: float
    top3_recovery: float | None


@dataclass(frozen=True)
class PcrLayers(Result):
    """PCR on the layers of largest single-layer shift of `population`: int_b-channel (one scale per channel
    over the tokens, KIVI-style: a counterfactual quantizer llama.cpp does not have) against int_b group-32."""

    population: str
    bits_k: int | None
    bits_v: int | None
    layers: tuple[int, ...]
    weighted_mean: float | None


@dataclass(frozen=True)
class LayerReduction(Result):
    """PCR of one layer: the failure-signed margin shift of the evidence's population with that layer's cache
    at int_b group-32 and at int_b-channel."""

    shift_group32: float
    shift_group32_lo: float | None
    shift_channel: float
    pcr: float | None


@dataclass(frozen=True, kw_only=True)
class LayerRow(Result):
    """One layer of `per_layer`. The outlier keys exist for the caches quantized at that layer (up to the
    readout layer); on the PCR layers, `reduction`'s keys sit in the row itself."""

    layer: int
    separation: float
    damage_k: float | None  # harmful signal damage with this layer's K alone quantized (None past the readout)
    damage_v: float | None
    damage_benign_k: float | None  # benign prompts' signal moving toward the harmful side (None past the readout)
    damage_benign_v: float | None
    # m_q - m_f16 (nats), mean over each population's prompts; None for a cache that does not carry the
    # shift (its single-layer runs are not made: docs/pcr.md, "Per-layer runs")
    margin_shift_harmful_k: float | None
    margin_shift_harmful_v: float | None
    margin_shift_benign_k: float | None
    margin_shift_benign_v: float | None
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
    damage_benign: Estimate
    margin_shift_harmful: Estimate
    margin_shift_benign: Estimate
    safe: bool  # both populations' failure-direction margin shift below the safe band (interval's upper bound)
    within_noise: bool  # both populations' margin shift inside their noise floors


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
    population: str | None = omit_none()  # whose single-layer shift ranks the layers
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
    margin_floor_harmful: float
    margin_floor_benign: float


@dataclass(frozen=True)
class SweepPoint(Result):
    bits: int
    bits_per_value: float
    damage: Estimate
    margin_drop_harmful: Estimate
    kld_harmless: Estimate
    relative_l2_readout: float
    damage_benign: Estimate
    margin_shift_harmful: Estimate
    margin_shift_benign: Estimate


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
