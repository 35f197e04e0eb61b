"""One PCR pass: calibration set through llama.cpp, torch runs under cache plans, statistics,
fidelity and the verdict per rotation setting. `run_pcr` returns a `PcrResult` (kvedge.results.pcr; its
JSON is schema kvedge.pcr/1, docs/pcr.md) that the report renders; every number in it is measured in
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
from ..results.pcr import (
    PCR_SCHEMA,
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
    RotationResult,
    Signal,
)
from . import stats as st
from .calibset import CalibSet, build_calibset, select_calib_prompts
from .classify import classify
from .engine import Engine
from .fidelity import f16_agreement, fidelity, llama_logits, quant_fidelity
from .layermap import search_layer_map
from .torch.gguf_torch import TorchModel
from .torch.kvquant import CachePlan, Scheme, cache_scheme, parse_scheme, rotate, rotation_block

SCHEMA = PCR_SCHEMA
N_PCR_LAYERS = 6  # PCR is computed on the layers holding most single-layer damage (docs/pcr.md)


@dataclass(frozen=True)
class PcrSpec:
    model: ModelInfo
    lora: Path | None
    kv: KVConfig
    rotations: tuple[bool, ...] = (True, False)
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    pcr_layers: int = N_PCR_LAYERS

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
    the sweep): the f16 reference, the safety direction, the noise floor, and runs under cache plans."""

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
        noise = self.engine.run(CachePlan(f32, f32), self.l_star, full=False)
        self.noise = st.damage(self.s_ref, noise.signal_hidden @ self.r, self.harmful, self.dirs.gap)
        self.noise_floor = max(abs(self.noise.lo or 0.0), abs(self.noise.hi or 0.0), abs(self.noise.value or 0.0))
        self._grads: dict | None = None

    @property
    def n_layer(self) -> int:
        return self.tm.hp.n_layer

    def grads(self) -> dict:
        if self._grads is None:
            self._grads = self.engine.gradients(self.r, self.l_star, self.harmful)
        return self._grads

    def d(self, plan: CachePlan):
        res = self.engine.run(plan, self.l_star, full=False)
        return st.damage(self.s_ref, res.signal_hidden @ self.r, self.harmful, self.dirs.gap)

    def full(self, plan: CachePlan) -> CacheRun:
        res = self.engine.run(plan, self.l_star, full=True)
        s_q = res.signal_hidden @ self.r
        dmg = st.damage(self.s_ref, s_q, self.harmful, self.dirs.gap)
        m_q = st.margin(res.logits, list(self.cal.refusal_tokens), list(self.cal.compliance_tokens))
        harmless = ~self.harmful
        return CacheRun(
            damage=dmg,
            margin_drop_harmful=st.mean_estimate([float(v) for v in (self.m_ref - m_q)[self.harmful]]),
            relative_l2_readout=st.relative_l2(self.ref_h, res.signal_hidden),
            kld_harmless=st.mean_estimate([float(v) for v in st.kld(self.ref_logits[harmless], res.logits[harmless])]),
            amplification=st.amplification(self.ref_h, res.signal_hidden, self.r, self.dirs.gap),
        )

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

    def rotation(self, rotation: bool) -> RotationResult:
        kv, L = self.spec.kv, self.n_layer
        audited = CachePlan.of(kv, rotation)
        kq, vq = quantizes(audited, "k", L), quantizes(audited, "v", L)
        self.log(f"rotation {'on' if rotation else 'off'}: all-layer runs")
        both = self.full(audited)
        k_only = self.full(CachePlan.of(kv, rotation, v=False)) if kq and vq else both if kq else None
        v_only = self.full(CachePlan.of(kv, rotation, k=False)) if kq and vq else both if vq else None
        self.log(f"rotation {'on' if rotation else 'off'}: per-layer runs up to the readout layer {self.l_star}")
        layers = range(self.l_star + 1)
        per_k = {l: float(self.d(CachePlan.of(kv, rotation, v=False, layers=frozenset({l}))).value)
                 if audited.stored_at(l, "k") else 0.0 for l in layers}
        per_v = {l: float(self.d(CachePlan.of(kv, rotation, k=False, layers=frozenset({l}))).value)
                 if audited.stored_at(l, "v") else 0.0 for l in layers}
        single = {l: per_k[l] + per_v[l] for l in layers}
        top3 = st.top_layers(single, 3)
        rest = frozenset(range(L)) - frozenset(top3)
        d_rest = float(self.full(CachePlan.of(kv, rotation, layers=rest)).damage.value)
        d_all = float(both.damage.value)
        self.log(f"rotation {'on' if rotation else 'off'}: PCR on the top {self.spec.pcr_layers} layers")
        pcr_layers = st.top_layers(single, self.spec.pcr_layers)
        pcr: dict[int, LayerReduction] = {}
        for l in pcr_layers:
            tk, tv = audited.stored_at(l, "k"), audited.stored_at(l, "v")
            g = CachePlan(_int_b(tk, False), _int_b(tv, False), frozenset({l}))
            c = CachePlan(_int_b(tk, True), _int_b(tv, True), frozenset({l}))
            dg, dc = self.d(g), self.d(c)
            # a ratio is read only where the group-32 damage itself is significant
            significant = dg.lo is not None and dg.lo > self.noise_floor
            pcr[l] = LayerReduction(float(dg.value), dg.lo, float(dc.value),
                                    st.pcr_value(float(dc.value), float(dg.value), self.noise_floor) if significant else None)
        weighted = st.weighted_mean([pcr[l].pcr for l in pcr_layers], [pcr[l].damage_group32 for l in pcr_layers])
        per_layer = []
        ov_vals, ov_w = [], []
        for l in range(L):
            found: dict[str, Any] = {}
            for kind, dmg in (("k", per_k.get(l)), ("v", per_v.get(l))):
                scheme = audited.stored_at(l, kind)
                if scheme is not None and l <= self.l_star:
                    n_out, ov = self.overlap(kind, l, scheme)
                    found |= {f"outliers_{kind}": n_out, f"overlap_{kind}": ov}
                    ov_vals.append(ov)
                    ov_w.append(dmg or 0.0)
            per_layer.append(LayerRow(layer=l, separation=float(self.dirs.separation[l]), damage_k=per_k.get(l),
                                      damage_v=per_v.get(l), reduction=pcr.get(l), **found))
        ev = Evidence(
            damage_both=d_all,
            damage_k=float(k_only.damage.value) if k_only else 0.0,
            damage_v=float(v_only.damage.value) if v_only else 0.0,
            beyond_noise=st.beyond_noise(both.damage, self.noise_floor),
            margin_drop=both.margin_drop_harmful.value,
            margin_drop_lo=both.margin_drop_harmful.lo,
            top3_recovery=st.recovery(d_all, d_rest),
            weighted_pcr=weighted,
            overlap=st.weighted_mean(ov_vals, ov_w),
            top_layers=tuple(top3),
            type_k=kv.type_k, type_v=kv.type_v,
            top_damage_k=sum(per_k[l] for l in top3), top_damage_v=sum(per_v[l] for l in top3),
            config=kv.name if kv.per_layer else None,
        )
        verdict = classify(ev)
        tk, tv = audited.k, audited.v
        self.log(f"rotation {'on' if rotation else 'off'}: per-layer map search")
        layer_map = search_layer_map(verdict, kv, per_k, per_v, self.spec.model, self.noise_floor,
                                     lambda cand: self.full(CachePlan.of(cand, rotation)))
        return RotationResult(
            rotation=rotation,
            scheme_k=scheme_label(kv, "k", rotation), scheme_v=scheme_label(kv, "v", rotation),
            all_layers=AllLayers(both, k_only, v_only),
            concentration=Concentration(tuple(top3), st.concentration_share(single, top3), d_rest, ev.top3_recovery),
            pcr=PcrLayers(_int_b(tk, False).bits if tk else None, _int_b(tv, False).bits if tv else None,
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
    cal = build_calibset(spec.model, spec.lora, select_calib_prompts(), spec.options)
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
        noise_floor=NoiseFloor("damage of an f32 cache against the f16 reference (arithmetic only)", ps.noise,
                               ps.noise_floor),
        fidelity=fid,
        rotations=tuple(results),
        timing=PcrTiming(round(seconds, 2), round(t_llama, 2), round(t_load, 2), ps.engine.runs, threads),
    )
