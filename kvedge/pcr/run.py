"""One PCR pass: calibration set through llama.cpp, torch runs under cache plans, statistics,
fidelity and the verdict per rotation setting. `run_pcr` returns a plain dict (schema kvedge.pcr/1,
docs/pcr.md) that the report renders; every number in it is measured in this call."""

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
from . import stats as st
from .calibset import CalibSet, build_calibset, select_calib_prompts
from .classify import Evidence, classify
from .engine import Engine
from .fidelity import Fidelity, f16_agreement, llama_logits, quant_fidelity
from .layermap import search_layer_map
from .torch.gguf_torch import TorchModel
from .torch.kvquant import CachePlan, Scheme, parse_scheme, rotate, rotation_block

SCHEMA = "kvedge.pcr/1"
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


def cache_scheme(type_name: str, rotation: bool) -> Scheme | None:
    # an f32 cache is simulated as f16: llama.cpp's flash attention reads K and V as f16 whatever the
    # cache stores (measured: f32 and f16 caches give identical logits, docs/pcr.md)
    return None if type_name in ("f16", "f32") else parse_scheme(type_name, rotation)


def _int_b(s: Scheme | None, channel: bool) -> Scheme | None:
    if s is None:
        return None
    return parse_scheme(f"int{min(max(s.bits, 2), 8)}{'-channel' if channel else ''}", s.rotation)


@dataclass(frozen=True)
class KVPlans:
    """A KV config (uniform or per layer) under one rotation setting, as torch cache plans."""

    kv: KVConfig
    rotation: bool
    n_layer: int

    def at(self, kind: str, layer: int) -> Scheme | None:
        """The scheme of one layer's K or V cache (None: f16)."""
        return cache_scheme(self.kv.types(kind, self.n_layer)[layer], self.rotation)

    def base(self, kind: str) -> Scheme | None:
        return cache_scheme(self.kv.type_k if kind == "k" else self.kv.type_v, self.rotation)

    def quantizes(self, kind: str) -> bool:
        return any(self.at(kind, l) is not None for l in range(self.n_layer))

    def plan(self, k: bool = True, v: bool = True, layers: frozenset[int] | None = None) -> CachePlan:
        """The config's K and/or V (the other cache f16), on `layers` only if given."""
        def own(overrides):
            return tuple((l, cache_scheme(t, self.rotation)) for l, t in overrides)

        return CachePlan(self.base("k") if k else None, self.base("v") if v else None, layers,
                         own(self.kv.layers_k) if k else (), own(self.kv.layers_v) if v else ())

    def label(self, kind: str) -> str:
        base, over = (self.kv.type_k, self.kv.layers_k) if kind == "k" else (self.kv.type_v, self.kv.layers_v)
        s = self.base(kind)
        if not over:
            return s.label if s else base
        return cache_text(base, over) + ("" if self.rotation else ":norot")


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

    def grads(self) -> dict:
        if self._grads is None:
            self._grads = self.engine.gradients(self.r, self.l_star, self.harmful)
        return self._grads

    def d(self, plan: CachePlan):
        res = self.engine.run(plan, self.l_star, full=False)
        return st.damage(self.s_ref, res.signal_hidden @ self.r, self.harmful, self.dirs.gap)

    def full(self, plan: CachePlan) -> dict:
        res = self.engine.run(plan, self.l_star, full=True)
        s_q = res.signal_hidden @ self.r
        dmg = st.damage(self.s_ref, s_q, self.harmful, self.dirs.gap)
        m_q = st.margin(res.logits, list(self.cal.refusal_tokens), list(self.cal.compliance_tokens))
        harmless = ~self.harmful
        amp = st.amplification(self.ref_h, res.signal_hidden, self.r, self.dirs.gap)
        return {
            "damage": dmg.to_dict(),
            "margin_drop_harmful": st.mean_estimate([float(v) for v in (self.m_ref - m_q)[self.harmful]]).to_dict(),
            "relative_l2_readout": st.relative_l2(self.ref_h, res.signal_hidden),
            "kld_harmless": st.mean_estimate([float(v) for v in st.kld(self.ref_logits[harmless], res.logits[harmless])]).to_dict(),
            "amplification": vars(amp) if amp else None,
        }

    def overlap(self, kind: str, layer: int, scheme: Scheme) -> dict:
        rows, grads = self.grads()[(layer, kind)]
        head_dim = self.tm.hp.head_dim_k if kind == "k" else self.tm.hp.head_dim_v
        if scheme.rotates(head_dim):
            # the quantizer sees rotated rows; H is orthonormal and symmetric, so gradients rotate alike
            block = rotation_block(kind, head_dim)  # type: ignore[arg-type]
            rows, grads = rotate(rows, block), rotate(grads, block)
        out = st.outlier_channels(rows)
        imp = st.importance(rows, grads)
        return {"outlier_channels": int(out.sum()), "overlap": st.overlap(imp, out)}

    def rotation(self, rotation: bool) -> dict:
        kv, L = self.spec.kv, self.tm.hp.n_layer
        plans = KVPlans(kv, rotation, L)
        kq, vq = plans.quantizes("k"), plans.quantizes("v")
        self.log(f"rotation {'on' if rotation else 'off'}: all-layer runs")
        both = self.full(plans.plan())
        k_only = self.full(plans.plan(v=False)) if kq and vq else both if kq else None
        v_only = self.full(plans.plan(k=False)) if kq and vq else both if vq else None
        self.log(f"rotation {'on' if rotation else 'off'}: per-layer runs up to the readout layer {self.l_star}")
        layers = range(self.l_star + 1)
        per_k = {l: float(self.d(plans.plan(v=False, layers=frozenset({l}))).value) if plans.at("k", l) else 0.0
                 for l in layers}
        per_v = {l: float(self.d(plans.plan(k=False, layers=frozenset({l}))).value) if plans.at("v", l) else 0.0
                 for l in layers}
        single = {l: per_k[l] + per_v[l] for l in layers}
        top3 = st.top_layers(single, 3)
        rest = frozenset(range(L)) - frozenset(top3)
        d_rest = float(self.full(plans.plan(layers=rest))["damage"]["value"])
        d_all = float(both["damage"]["value"])
        self.log(f"rotation {'on' if rotation else 'off'}: PCR on the top {self.spec.pcr_layers} layers")
        pcr_layers = st.top_layers(single, self.spec.pcr_layers)
        pcr: dict[int, dict] = {}
        for l in pcr_layers:
            tk, tv = plans.at("k", l), plans.at("v", l)
            g = CachePlan(_int_b(tk, False), _int_b(tv, False), frozenset({l}))
            c = CachePlan(_int_b(tk, True), _int_b(tv, True), frozenset({l}))
            dg, dc = self.d(g), self.d(c)
            # a ratio is read only where the group-32 damage itself is significant
            significant = dg.lo is not None and dg.lo > self.noise_floor
            pcr[l] = {"damage_group32": float(dg.value), "damage_group32_lo": dg.lo, "damage_channel": float(dc.value),
                      "pcr": st.pcr_value(float(dc.value), float(dg.value), self.noise_floor) if significant else None}
        weighted = st.weighted_mean([pcr[l]["pcr"] for l in pcr_layers], [pcr[l]["damage_group32"] for l in pcr_layers])
        per_layer = []
        ov_vals, ov_w = [], []
        for l in range(L):
            row: dict[str, Any] = {"layer": l, "separation": float(self.dirs.separation[l]),
                                   "damage_k": per_k.get(l), "damage_v": per_v.get(l)}
            for kind, dmg in (("k", per_k.get(l)), ("v", per_v.get(l))):
                scheme = plans.at(kind, l)
                if scheme is not None and l <= self.l_star:
                    o = self.overlap(kind, l, scheme)
                    row[f"outliers_{kind}"] = o["outlier_channels"]
                    row[f"overlap_{kind}"] = o["overlap"]
                    ov_vals.append(o["overlap"])
                    ov_w.append(dmg or 0.0)
            if l in pcr:
                row.update(pcr[l])
            per_layer.append(row)
        ev = Evidence(
            damage_both=d_all,
            damage_k=float(k_only["damage"]["value"]) if k_only else 0.0,
            damage_v=float(v_only["damage"]["value"]) if v_only else 0.0,
            beyond_noise=st.beyond_noise(both["damage"], self.noise_floor),
            margin_drop=both["margin_drop_harmful"]["value"],
            margin_drop_lo=both["margin_drop_harmful"]["lo"],
            top3_recovery=st.recovery(d_all, d_rest),
            weighted_pcr=weighted,
            overlap=st.weighted_mean(ov_vals, ov_w),
            top_layers=tuple(top3),
            type_k=kv.type_k, type_v=kv.type_v,
            top_damage_k=sum(per_k[l] for l in top3), top_damage_v=sum(per_v[l] for l in top3),
            config=kv.name if kv.per_layer else None,
        )
        verdict = classify(ev)
        tk, tv = plans.base("k"), plans.base("v")
        self.log(f"rotation {'on' if rotation else 'off'}: per-layer map search")
        layer_map = search_layer_map(verdict, kv, per_k, per_v, self.spec.model, self.noise_floor,
                                     lambda cand: self.full(KVPlans(cand, rotation, L).plan()))
        return {
            "rotation": rotation,
            "scheme_k": plans.label("k"), "scheme_v": plans.label("v"),
            "all_layers": {"k_and_v": both, "k_only": k_only, "v_only": v_only},
            "concentration": {"top3_layers": top3, "top3_share": st.concentration_share(single, top3),
                              "damage_without_top3": d_rest, "top3_recovery": ev.top3_recovery},
            "pcr": {"bits_k": _int_b(tk, False).bits if tk else None, "bits_v": _int_b(tv, False).bits if tv else None,
                    "layers": pcr_layers, "weighted_mean": weighted},
            "overlap": ev.overlap,
            "per_layer": per_layer,
            "evidence": vars(ev) | {"top_layers": list(ev.top_layers)},
            "verdict": verdict.to_dict(),
            "layer_map": layer_map,
        }


def run_pcr(spec: PcrSpec, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
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
            sim_q = ps.engine.continuation_logits(KVPlans(spec.kv, rot, tm.hp.n_layer).plan())
            quant_fid.append(quant_fidelity(rot, llama_f16, llama_q[rot], sim_f16, sim_q))
        fidelity = Fidelity(top1, f16_kld, n_pos, tuple(quant_fid), tm.verified)
    seconds = time.perf_counter() - t0
    return {
        "schema": SCHEMA,
        "kvedge_version": __version__,
        "model": {"path": str(spec.model.path), "sha256": spec.model.sha256, "architecture": spec.model.architecture,
                  "n_layer": tm.hp.n_layer, "n_head_kv": tm.hp.n_head_kv, "head_dim_k": tm.hp.head_dim_k,
                  "head_dim_v": tm.hp.head_dim_v},
        "adapter": str(spec.lora) if spec.lora else None,
        "kv": {"name": spec.kv.name, **spec.kv.key(), "bytes_per_token": spec.kv.bytes_per_token(spec.model)},
        "calibration": {
            "split": "calib", "n_harmful": sum(cal.harmful), "n_harmless": len(cal.harmful) - sum(cal.harmful),
            "prompts": [{"id": p.id, "subset": p.subset, "harmful": p.harmful, "n_tokens": len(p.tokens)}
                        for p in cal.prompts],
            "shared_prefix_tokens": len(cal.prefix),
            "refusal_tokens": list(cal.refusal_pieces), "compliance_tokens": list(cal.compliance_pieces),
        },
        "signal": {"readout_layer": ps.l_star, "gap": ps.dirs.gap,
                   "separation": [float(x) for x in ps.dirs.separation],
                   "margin_f16_harmful": st.mean_estimate([float(v) for v in ps.m_ref[ps.harmful]]).to_dict(),
                   "margin_f16_harmless": st.mean_estimate([float(v) for v in ps.m_ref[~ps.harmful]]).to_dict()},
        "noise_floor": {"what": "damage of an f32 cache against the f16 reference (arithmetic only)",
                        "damage": ps.noise.to_dict(), "floor": ps.noise_floor},
        "fidelity": fidelity.to_dict(),
        "rotations": results,
        "timing": {"seconds": round(seconds, 2), "llama_cpp_seconds": round(t_llama, 2),
                   "load_seconds": round(t_load, 2), "torch_runs": ps.engine.runs, "threads": threads},
    }
