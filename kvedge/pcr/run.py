"""One PCR pass: calibration set through llama.cpp, torch runs under cache plans, statistics,
fidelity and the verdict per rotation setting. `run_pcr` returns a `PcrResult` (kvedge.results.pcr; its
JSON is schema kvedge.pcr/2, docs/pcr.md) that the report renders; every number in it is measured in
this call."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import __version__
from ..gguf.kvmap import cache_text
from ..gguf.lora import read_adapter
from ..gguf.model import ModelInfo
from ..llama.runtime import KVConfig, RuntimeOptions
from ..stats import Estimate
from ..results.pcr import (
    PCR_SCHEMA,
    POPULATIONS,
    AllLayers,
    CacheRun,
    CalibPromptInfo,
    Calibration,
    Concentration,
    Evidence,
    KvSection,
    LayerReduction,
    LayerRow,
    NoiseFloor,
    PcrLayers,
    PcrModel,
    PcrResult,
    PcrTiming,
    PopulationShift,
    RotationResult,
    Signal,
)
from . import stats as st
from .calibset import N_BENIGN, CalibSet, build_calibset, select_calib_prompts
from .classify import carrier_of, classify
from .engine import Engine
from .fidelity import f16_agreement, fidelity, llama_logits, quant_fidelity
from .layermap import CACHES, search_layer_map
from .torch.gguf_torch import TorchModel
from .torch.kvquant import CachePlan, Scheme, cache_scheme, parse_scheme, rotate, rotation_block

SCHEMA = PCR_SCHEMA
N_PCR_LAYERS = 6  # PCR is computed on the layers holding most single-layer shift (docs/pcr.md)


@dataclass(frozen=True)
class PcrSpec:
    model: ModelInfo
    lora: Path | None
    kv: KVConfig
    rotations: tuple[bool, ...] = (True, False)
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    pcr_layers: int = N_PCR_LAYERS
    n_benign: int = N_BENIGN  # benign calibration prompts (XSTest safe); the harmful ones are fixed at 10

    def torch_model(self) -> TorchModel:
        return TorchModel.from_gguf(self.model.path, read_adapter(self.lora) if self.lora else None)


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads at `n` for a pass, the caller's setting restored after (a notebook keeps its own)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _int_b(s: Scheme | None, channel: bool) -> Scheme | None:
    if s is None:
        return None
    return parse_scheme(f"int{min(max(s.bits, 2), 8)}{'-channel' if channel else ''}", s.rotation)


def quantizes(plan: CachePlan, kind: str, n_layer: int) -> bool:
    """Whether the plan stores any layer's K (or V) cache other than f16."""
    return any(plan.stored_at(l, kind) is not None for l in range(n_layer))


def scheme_label(kv: KVConfig, kind: str, rotation: bool) -> str:
    """How the report names one cache of `kv` under a rotation setting: `q4_0:norot`, `q4_0@11+17+19:q8_0`."""
    base, over = (kv.type_k, kv.layers_k) if kind == "k" else (kv.type_v, kv.layers_v)
    s = cache_scheme(base, rotation)
    if not over:
        return s.label if s else base
    return cache_text(base, over) + ("" if rotation else ":norot")


class PcrPass:
    """The measurements of one pass over the calibration set, shared by the rotation settings (and by
    the sweep): the f16 reference, the safety direction, the noise floors, and runs under cache plans."""

    def __init__(self, spec: PcrSpec, cal: CalibSet, tm: TorchModel, log: Callable[[str], None]):
        self.spec, self.cal, self.tm, self.log = spec, cal, tm, log
        self.engine = Engine(tm, cal)
        self.harmful = torch.tensor(cal.harmful)
        ref = self.engine.reference()
        last = self.engine.last
        self.dirs = st.directions(ref[:, last], self.harmful)
        self.l_star = self.dirs.readout
        self.r = self.dirs.r[self.l_star]
        with torch.inference_mode():
            self.ref_logits = tm.logits(ref[-1][last])
        self.ref_h = ref[self.l_star][last]
        self.s_ref = self.ref_h @ self.r
        self.m_ref = st.margin(self.ref_logits, list(cal.refusal_tokens), list(cal.compliance_tokens))
        # arithmetic-only change: an f32 cache instead of f16 moves nothing a quantizer would
        f32 = parse_scheme("f32")
        n = self.full(CachePlan(f32, f32))
        self.noise = NoiseFloor("an f32 cache against the f16 reference, arithmetic only",
                                n.damage, st.floor(n.damage), n.damage_benign, st.floor(n.damage_benign),
                                n.margin_shift_harmful, st.floor(n.margin_shift_harmful),
                                n.margin_shift_benign, st.floor(n.margin_shift_benign))
        self.noise_floor = self.noise.floor  # the harmful signal damage's, as kvedge.pcr/1 had it
        self._grads: dict | None = None

    @property
    def n_layer(self) -> int:
        return self.tm.hp.n_layer

    def grads(self) -> dict:
        if self._grads is None:
            self._grads = self.engine.gradients(self.r, self.l_star, self.harmful)
        return self._grads

    def full(self, plan: CachePlan) -> CacheRun:
        res = self.engine.run(plan, self.l_star, full=True)
        s_q = res.signal_hidden @ self.r
        m_q = st.margin(res.logits, list(self.cal.refusal_tokens), list(self.cal.compliance_tokens))
        harmless = ~self.harmful
        return CacheRun(
            damage=st.damage(self.s_ref, s_q, self.harmful, self.dirs.gap, "harmful"),
            damage_benign=st.damage(self.s_ref, s_q, self.harmful, self.dirs.gap, "benign"),
            margin_drop_harmful=st.mean_estimate([float(v) for v in (self.m_ref - m_q)[self.harmful]]),
            margin_shift_harmful=st.margin_shift(self.m_ref, m_q, self.harmful, "harmful"),
            margin_shift_benign=st.margin_shift(self.m_ref, m_q, self.harmful, "benign"),
            relative_l2_readout=st.relative_l2(self.ref_h, res.signal_hidden),
            kld_harmless=st.mean_estimate([float(v) for v in st.kld(self.ref_logits[harmless], res.logits[harmless])]),
            amplification=st.amplification(self.ref_h, res.signal_hidden, self.r, self.dirs.gap),
        )

    def populations(self, run: CacheRun) -> tuple[PopulationShift, ...]:
        """Both populations' movement under one run, each against its own noise floor."""
        return tuple(st.population_shift(p, run.margin_shift(p), run.damage if p == "harmful" else run.damage_benign,
                                         self.noise.margin_floor(p)) for p in POPULATIONS)

    def overlap(self, kind: str, layer: int, scheme: Scheme) -> tuple[int, float]:
        """(outlier channels, overlap) of one layer's K or V cache, in the basis its quantizer sees."""
        rows, grads = self.grads()[(layer, kind)]
        head_dim = self.tm.hp.head_dim_k if kind == "k" else self.tm.hp.head_dim_v
        if scheme.rotates(head_dim):
            # the quantizer sees rotated rows; H is orthonormal and symmetric, so gradients rotate alike
            block = rotation_block(kind, head_dim)  # type: ignore[arg-type]
            rows, grads = rotate(rows, block), rotate(grads, block)
        out = st.outlier_channels(rows)
        imp = st.importance(rows, grads)
        return int(out.sum()), st.overlap(imp, out)

    def single_layers(self, kv: KVConfig, rotation: bool, caches: tuple[str, ...]) -> dict[tuple[int, str], CacheRun | None]:
        """Each layer's K alone and V alone quantized as `kv` says, everything else f16, for the `caches`
        named (None: not run, or that cache is f16 there). Every layer, not only those up to the readout:
        the margin reads the output."""
        audited = CachePlan.of(kv, rotation)
        return {(l, kind): self.full(CachePlan.of(kv, rotation, k=kind == "k", v=kind == "v", layers=frozenset({l})))
                if kind in caches and audited.stored_at(l, kind) else None
                for l in range(self.n_layer) for kind in ("k", "v")}

    def layer_row(self, l: int, runs: dict[tuple[int, str], CacheRun | None], measured: tuple[str, ...],
                  audited: CachePlan, extra: dict[str, Any], reduction: LayerReduction | None) -> LayerRow:
        rk, rv = runs[(l, "k")], runs[(l, "v")]

        def value(run: CacheRun | None, kind: str, read: Callable[[CacheRun], Estimate]) -> float | None:
            if run is not None:
                return float(read(run).value)
            # a cache the pass did not run is unknown; one stored f16 at this layer changes nothing
            return 0.0 if kind in measured and audited.stored_at(l, kind) is None else None

        def signal(run: CacheRun | None, kind: str, benign: bool) -> float | None:
            if l > self.l_star:
                return None  # a later layer cannot move the readout signal
            return value(run, kind, lambda r: r.damage_benign if benign else r.damage)

        def shift(run: CacheRun | None, kind: str, population: str) -> float | None:
            return value(run, kind, lambda r: r.margin_shift(population))

        return LayerRow(layer=l, separation=float(self.dirs.separation[l]),
                        damage_k=signal(rk, "k", False), damage_v=signal(rv, "v", False),
                        damage_benign_k=signal(rk, "k", True), damage_benign_v=signal(rv, "v", True),
                        margin_shift_harmful_k=shift(rk, "k", "harmful"), margin_shift_harmful_v=shift(rv, "v", "harmful"),
                        margin_shift_benign_k=shift(rk, "k", "benign"), margin_shift_benign_v=shift(rv, "v", "benign"),
                        reduction=reduction, **extra)

    def rotation(self, rotation: bool) -> RotationResult:
        kv, L = self.spec.kv, self.n_layer
        name = f"rotation {'on' if rotation else 'off'}"
        audited = CachePlan.of(kv, rotation)
        kq, vq = quantizes(audited, "k", L), quantizes(audited, "v", L)
        self.log(f"{name}: all-layer runs")
        both = self.full(audited)
        k_only = self.full(CachePlan.of(kv, rotation, v=False)) if kq and vq else both if kq else None
        v_only = self.full(CachePlan.of(kv, rotation, k=False)) if kq and vq else both if vq else None
        shifts = self.populations(both)
        # everything below follows the population that moved: its failure-signed margin shift ranks the
        # layers, measures the concentration and PCR, and the layer map must bring it into the safe band
        pop = st.moved_population(shifts).population
        floor = self.noise.margin_floor(pop)

        def fail(run: CacheRun | None) -> float:
            return float(run.failure_shift(pop).value) if run is not None else 0.0

        # single-layer runs for the cache(s) that carry the shift only: a cache that does not carry it cannot
        # rank layers for the fix, and skipping it saves one full run per layer (docs/pcr.md, "Per-layer
        # runs"); where neither alone reproduces the joint shift both are run and the top layers name the carrier
        measured = tuple(CACHES[carrier_of(fail(both), fail(k_only), fail(v_only))])
        self.log(f"{name}: per-layer runs of {'+'.join(c.upper() for c in measured)} ({pop} prompts' shift ranks "
                 "the layers)")
        runs = self.single_layers(kv, rotation, measured)

        per_k = {l: fail(runs[(l, "k")]) for l in range(L)}
        per_v = {l: fail(runs[(l, "v")]) for l in range(L)}
        single = {l: per_k[l] + per_v[l] for l in range(L)}
        top3 = st.top_layers(single, 3)
        rest = frozenset(range(L)) - frozenset(top3)
        f_rest = fail(self.full(CachePlan.of(kv, rotation, layers=rest)))
        f_all = fail(both)
        self.log(f"{name}: PCR on the top {self.spec.pcr_layers} layers")
        pcr_layers = st.top_layers(single, self.spec.pcr_layers)
        pcr: dict[int, LayerReduction] = {}
        for l in pcr_layers:
            tk, tv = audited.stored_at(l, "k"), audited.stored_at(l, "v")
            fg = self.full(CachePlan(_int_b(tk, False), _int_b(tv, False), frozenset({l}))).failure_shift(pop)
            fc = self.full(CachePlan(_int_b(tk, True), _int_b(tv, True), frozenset({l}))).failure_shift(pop)
            # a ratio is read only where the group-32 shift itself is significant
            significant = fg.lo is not None and fg.lo > floor
            pcr[l] = LayerReduction(float(fg.value), fg.lo, float(fc.value),
                                    st.pcr_value(float(fc.value), float(fg.value), floor) if significant else None)
        weighted = st.weighted_mean([pcr[l].pcr for l in pcr_layers], [pcr[l].shift_group32 for l in pcr_layers])
        per_layer = []
        ov_vals, ov_w = [], []
        for l in range(L):
            found: dict[str, Any] = {}
            for kind, weight in (("k", per_k[l]), ("v", per_v[l])):
                scheme = audited.stored_at(l, kind)
                if scheme is not None and l <= self.l_star:
                    n_out, ov = self.overlap(kind, l, scheme)
                    found |= {f"outliers_{kind}": n_out, f"overlap_{kind}": ov}
                    ov_vals.append(ov)
                    ov_w.append(weight)
            per_layer.append(self.layer_row(l, runs, measured, audited, found, pcr.get(l)))
        ev = Evidence(
            populations=shifts,
            population=pop,
            shift_k=fail(k_only),
            shift_v=fail(v_only),
            top3_recovery=st.recovery(f_all, f_rest),
            weighted_pcr=weighted,
            overlap=st.weighted_mean(ov_vals, ov_w),
            top_layers=tuple(top3),
            type_k=kv.type_k, type_v=kv.type_v,
            top_shift_k=sum(per_k[l] for l in top3) if "k" in measured else None,
            top_shift_v=sum(per_v[l] for l in top3) if "v" in measured else None,
            config=kv.name if kv.per_layer else None,
        )
        verdict = classify(ev)
        tk, tv = audited.k, audited.v
        self.log(f"{name}: per-layer map search")
        layer_map = search_layer_map(verdict, kv, pop, per_k, per_v, self.spec.model, self.noise,
                                     lambda cand: self.full(CachePlan.of(cand, rotation)))
        return RotationResult(
            rotation=rotation,
            scheme_k=scheme_label(kv, "k", rotation), scheme_v=scheme_label(kv, "v", rotation),
            all_layers=AllLayers(both, k_only, v_only),
            concentration=Concentration(pop, tuple(top3), st.concentration_share(single, top3), f_rest,
                                        ev.top3_recovery),
            pcr=PcrLayers(pop, _int_b(tk, False).bits if tk else None, _int_b(tv, False).bits if tv else None,
                          tuple(pcr_layers), weighted),
            overlap=ev.overlap,
            per_layer=tuple(per_layer),
            evidence=ev,
            verdict=verdict,
            layer_map=layer_map,
        )


def run_pcr(spec: PcrSpec, log: Callable[[str], None] = lambda m: None) -> PcrResult:
    t0 = time.perf_counter()
    log("calibration set through llama.cpp")
    cal = build_calibset(spec.model, spec.lora, select_calib_prompts(spec.n_benign), spec.options)
    llama_f16 = [torch.from_numpy(p.f16_logprobs) for p in cal.prompts]
    llama_q = {rot: llama_logits(spec.model, spec.lora, cal, spec.kv, rot, spec.options) for rot in spec.rotations}
    t_llama = time.perf_counter() - t0
    log("loading the GGUF into torch")
    threads = spec.options.resolved_threads()
    with torch_threads(threads):
        tm = spec.torch_model()
        t_load = time.perf_counter() - t0 - t_llama
        log("f16 reference, safety directions and noise floor")
        ps = PcrPass(spec, cal, tm, log)
        sim_f16 = ps.engine.continuation_logits(CachePlan())
        top1, f16_kld, n_pos = f16_agreement(llama_f16, sim_f16)
        results, quant_fid = [], []
        for rot in spec.rotations:
            results.append(ps.rotation(rot))
            sim_q = ps.engine.continuation_logits(CachePlan.of(spec.kv, rot))
            quant_fid.append(quant_fidelity(rot, llama_f16, llama_q[rot], sim_f16, sim_q))
        fid = fidelity(top1, f16_kld, n_pos, tuple(quant_fid), tm.verified)
    seconds = time.perf_counter() - t0
    g = tm.hp.geometry
    kv = spec.kv
    return PcrResult(
        schema=PCR_SCHEMA,
        kvedge_version=__version__,
        model=PcrModel(str(spec.model.path), spec.model.sha256, spec.model.architecture, g.n_layer, g.n_head_kv,
                       g.head_dim_k, g.head_dim_v),
        adapter=str(spec.lora) if spec.lora else None,
        kv=KvSection(name=kv.name, type_k=kv.type_k, type_v=kv.type_v, layers_k=kv.layers_k or None,
                     layers_v=kv.layers_v or None, bytes_per_token=kv.bytes_per_token(spec.model)),
        calibration=Calibration(
            "calib", sum(cal.harmful), len(cal.harmful) - sum(cal.harmful),
            tuple(CalibPromptInfo(p.id, p.subset, p.harmful, len(p.tokens)) for p in cal.prompts),
            len(cal.prefix), tuple(cal.refusal_pieces), tuple(cal.compliance_pieces)),
        signal=Signal(ps.l_star, ps.dirs.gap, tuple(float(x) for x in ps.dirs.separation),
                      st.mean_estimate([float(v) for v in ps.m_ref[ps.harmful]]),
                      st.mean_estimate([float(v) for v in ps.m_ref[~ps.harmful]])),
        noise_floor=ps.noise,
        fidelity=fid,
        rotations=tuple(results),
        timing=PcrTiming(round(seconds, 2), round(t_llama, 2), round(t_load, 2), ps.engine.runs, threads),
    )
