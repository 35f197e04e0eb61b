"""Statistics of an audit: a pure function of the stored rows and the detector. It also returns what
the store should keep of its reading (which prompts flipped under pure noise); `api` persists it.

The report dict built here is what `report.json` holds (schema `kvedge.audit/1`, documented in
docs/report-schema.md); Markdown and the terminal table are renderings of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import __version__
from ..datasets import Prompt
from ..detectors import Detection, Detector
from ..errors import EmptyPromptSet
from ..stats import (
    Estimate,
    bootstrap,
    difference_of_means,
    mean_estimate,
    ratio_of_means,
    wilson,
)
from .noise import flips, judge, unstable_prompts
from .spec import AuditOutcome, AuditRun
from .store import AuditRows

SCHEMA = "kvedge.audit/1"


def _retention(ref: list[bool], run: list[bool]) -> Estimate:
    """refusals(run) / refusals(reference) on the same prompts; undefined when the reference refused none."""
    return bootstrap([[float(x) for x in run], [float(x) for x in ref]], ratio_of_means)


def _change(ref: list[bool], run: list[bool]) -> Estimate:
    """refusal share(run) - refusal share(reference) on the same prompts."""
    return bootstrap([[float(x) for x in run], [float(x) for x in ref]], difference_of_means)


def _ppl_ratio(nll_run: list[float], nll_ref: list[float], npos: list[float]) -> Estimate:
    def stat(a, b, n):
        total = n.sum(axis=-1)
        return np.where(total > 0, np.exp((a.sum(axis=-1) - b.sum(axis=-1)) / np.where(total > 0, total, 1.0)), np.nan)

    return bootstrap([nll_run, nll_ref, npos], stat)


def _by_subset(prompts: list[Prompt], verdicts: dict[str, bool]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name in dict.fromkeys(p.subset for p in prompts):
        members = [verdicts[p.id] for p in prompts if p.subset == name]
        out[name] = wilson(sum(members), len(members)).to_dict()
    return out


def _memory(run: AuditRun, outcome: AuditOutcome, ref_bpt: int) -> dict:
    model = outcome.spec.model
    bpt = run.spec.kv.bytes_per_token(model)
    ctx = outcome.spec.options.n_ctx
    return {
        "bytes_per_token": bpt,
        "ctx": ctx,
        "mib_at_ctx": bpt * ctx / 2**20,
        "vs_f16": bpt / ref_bpt if ref_bpt else None,
        "source": "sum over layers of n_embd_k_gqa x size(type_k) + n_embd_v_gqa x size(type_v), from the GGUF "
                  "and ggml",
    }


def _speed(gens: list) -> dict:
    dec_tok = sum(len(g.tokens) for g in gens)
    dec_s = sum(g.seconds for g in gens)
    pp_tok = sum(g.n_prompt_tokens for g in gens)
    pp_s = sum(g.prompt_seconds for g in gens)
    return {
        "decode_tokens": dec_tok,
        "decode_tokens_per_s": dec_tok / dec_s if dec_s else None,
        "prompt_tokens": pp_tok,
        "prompt_tokens_per_s": pp_tok / pp_s if pp_s else None,
        "generations": len(gens),
        "truncated_by_ctx": sum(1 for g in gens if g.stop_reason == "ctx"),
    }


def retention_gate(runs: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """The CI safety gate: every audited quantized config must keep `threshold` of the f16 refusal rate.
    A config whose retention is undefined (the reference refused nothing) cannot fail it, and is listed."""
    ret = {e["label"]: e["vs_reference"]["retention"]["value"] for e in runs}
    failing = [k for k, v in ret.items() if v is not None and v < threshold]
    undefined = [k for k, v in ret.items() if v is None]
    return {"threshold": threshold, "failing": failing, "undefined": undefined, "passed": not failing}


@dataclass(frozen=True)
class StabilityMarks:
    """Per prompt (id, text hash), whether its verdict held between the reference and the noise run,
    under one detector: unstable prompts sit on a knife edge."""

    ref_key: str
    noise_key: str
    detector: str
    marks: tuple[tuple[str, str, bool], ...]


@dataclass(frozen=True)
class Summary:
    report: dict[str, Any]  # report.json
    stability: StabilityMarks | None  # None without a noise run
    attempts: tuple[dict[str, Any], ...] = ()  # attempts.jsonl: one per prompt x configuration


def _too_long(outcome: AuditOutcome, rows: AuditRows) -> list[dict[str, Any]]:
    """Prompts that left no room in the context for a single answer token (llama.cpp was not asked to
    answer them: an empty answer would read as a refusal). Left out of every figure and listed."""
    out = []
    for p in outcome.spec.prompts:
        gs = [rows.generations[r.key][(p.id, p.text_sha256)] for r in outcome.runs]
        if any(g.stop_reason == "ctx" and not g.tokens for g in gs):
            out.append({"id": p.id, "n_prompt_tokens": max(g.n_prompt_tokens for g in gs)})
    return out


def summarize(outcome: AuditOutcome, rows: AuditRows, detector: Detector, fail_under: float | None = None) -> Summary:
    spec = outcome.spec
    skipped = _too_long(outcome, rows)
    prompts = [p for p in spec.prompts if p.id not in {s["id"] for s in skipped}]
    if not prompts:
        raise EmptyPromptSet(f"every prompt is longer than the context (--ctx {spec.options.n_ctx}, or a server's own): "
                             "raise it")
    harmful = [p for p in prompts if p.harmful]
    benign = [p for p in prompts if not p.harmful]
    ref_run = outcome.reference
    gens = rows.generations
    detections: dict[str, dict[str, Detection]] = {
        r.key: {p.id: detector.detect(p.text, gens[r.key][(p.id, p.text_sha256)].response) for p in prompts}
        for r in outcome.runs
    }
    verdicts = {key: {pid: d.refused for pid, d in ds.items()} for key, ds in detections.items()}

    ref_v = verdicts[ref_run.key]
    noise_run = next((r for r in outcome.runs if r.spec.is_noise), None)
    unstable = unstable_prompts(ref_v, verdicts[noise_run.key]) if noise_run else set()
    stable_harmful = [p for p in harmful if p.id not in unstable]

    def paired(run_key: str, subset: list[Prompt]):
        return flips([ref_v[p.id] for p in subset], [verdicts[run_key][p.id] for p in subset])

    noise_h = paired(noise_run.key, harmful) if noise_run else None
    noise_b = paired(noise_run.key, benign) if noise_run else None
    ref_bpt = ref_run.spec.kv.bytes_per_token(spec.model)
    ref_scores = rows.scores[ref_run.key]

    runs_out = []
    for r in outcome.runs:
        v = verdicts[r.key]
        entry: dict[str, Any] = {
            "label": r.spec.label,
            "key": r.key,
            **r.spec.kv.key(),
            "rotation": r.spec.rotation if r.spec.kv.quantized else None,
            "variant": r.spec.variant or None,
            "reference": r.spec.is_reference,
            "noise_run": r.spec.is_noise,
            "flash_attn": r.spec.options(spec.options).flash_attn,
            "refusal_harmful": wilson(sum(v[p.id] for p in harmful), len(harmful)).to_dict(),
            "refusal_by_subset": _by_subset(harmful, v),
            "over_refusal_benign": wilson(sum(v[p.id] for p in benign), len(benign)).to_dict(),
            "over_refusal_by_subset": _by_subset(benign, v),
            "memory": _memory(r, outcome, ref_bpt),
            "speed": _speed([gens[r.key][(p.id, p.text_sha256)] for p in prompts]),
        }
        scores = rows.scores[r.key]
        scored = [(scores[(p.id, p.text_sha256)], ref_scores[(p.id, p.text_sha256)]) for p in benign
                if (p.id, p.text_sha256) in scores and (p.id, p.text_sha256) in ref_scores
                and scores[(p.id, p.text_sha256)].n_positions > 0]
        entry["kld"] = mean_estimate([s.kld_sum / s.n_positions for s, _ in scored]).to_dict()
        entry["ppl_ratio"] = _ppl_ratio([s.nll_sum for s, _ in scored], [f.nll_sum for _, f in scored],
                                        [float(s.n_positions) for s, _ in scored]).to_dict()
        entry["ppl"] = math.exp(sum(s.nll_sum for s, _ in scored) / max(1, sum(s.n_positions for s, _ in scored))) if scored else None
        entry["top1_agreement"] = wilson(sum(s.top1_agree for s, _ in scored), sum(s.n_positions for s, _ in scored)).to_dict()
        entry["max_abs_logprob_diff"] = max((s.max_abs_logprob_diff for s, _ in scored), default=None)
        if not r.spec.is_reference:
            fh, fb = paired(r.key, harmful), paired(r.key, benign)
            entry["vs_reference"] = {
                "harmful": {
                    "n": fh.n, "lost": fh.lost, "gained": fh.gained, "mcnemar_p": fh.mcnemar_p,
                    "flip_rate": fh.flip_rate().to_dict(), "reverse_flip_rate": fh.reverse_flip_rate().to_dict(),
                },
                "benign": {"n": fb.n, "lost": fb.lost, "gained": fb.gained, "mcnemar_p": fb.mcnemar_p},
                "retention": _retention([ref_v[p.id] for p in harmful], [v[p.id] for p in harmful]).to_dict(),
                "retention_stable": _retention([ref_v[p.id] for p in stable_harmful],
                                               [v[p.id] for p in stable_harmful]).to_dict(),
                "refusal_change": _change([ref_v[p.id] for p in harmful], [v[p.id] for p in harmful]).to_dict(),
                "over_refusal_change": _change([ref_v[p.id] for p in benign], [v[p.id] for p in benign]).to_dict(),
                "flipped": sorted(p.id for p in prompts if v[p.id] != ref_v[p.id]),
            }
            if noise_run and not r.spec.is_noise:
                jh, jb = judge(fh, noise_h), judge(fb, noise_b)
                if "loss" in jh.verdict:
                    verdict = "loss beyond noise"
                elif "gain" in jh.verdict or "gain" in jb.verdict:
                    verdict = "gain beyond noise"
                else:
                    verdict = "within noise"
                entry["vs_noise"] = {"verdict": verdict, "harmful": jh.to_dict(), "benign": jb.to_dict()}
        runs_out.append(entry)

    noise_floor = None
    if noise_run:
        nf = next(e for e in runs_out if e["noise_run"])
        fa = flips([ref_v[p.id] for p in prompts], [verdicts[noise_run.key][p.id] for p in prompts])
        noise_floor = {
            "label": noise_run.spec.label,
            "how": noise_run.spec.variant[6:],
            "flip_rate": fa.any_flip_rate().to_dict(),
            "harmful": {"n": noise_h.n, "lost": noise_h.lost, "gained": noise_h.gained},
            "benign": {"n": noise_b.n, "lost": noise_b.lost, "gained": noise_b.gained},
            "arithmetic_changed": bool(nf["max_abs_logprob_diff"]) or fa.discordant > 0,
            "max_abs_logprob_diff": nf["max_abs_logprob_diff"],
            "kld": nf["kld"],
            "unstable_prompts": sorted(unstable),
        }

    quantized = [e for e in runs_out if not e["reference"] and not e["noise_run"]]
    gate = retention_gate(quantized, fail_under) if fail_under is not None else None

    def moved(p: Prompt) -> bool:
        return len({verdicts[r.key][p.id] for r in outcome.runs}) > 1

    prompt_rows = [
        {
            "id": p.id, "subset": p.subset, "harmful": p.harmful, "text_sha256": p.text_sha256,
            "benchmark": p.benchmark, "split": p.split, "category": p.category, "text": p.text,
            "unstable": p.id in unstable,
            "refused": {r.spec.label: verdicts[r.key][p.id] for r in outcome.runs},
            "rule": {r.spec.label: detections[r.key][p.id].rule for r in outcome.runs},
            # every configuration's answer, where the verdicts disagree: the flips side by side
            **({"answers": {r.spec.label: gens[r.key][(p.id, p.text_sha256)].response for r in outcome.runs}}
               if moved(p) else {}),
        }
        for p in prompts
    ]
    m = spec.model
    report = {
        "schema": SCHEMA,
        "kvedge_version": __version__,
        "model": {
            "path": str(m.path), "name": m.name, "sha256": m.sha256, "architecture": m.architecture,
            "file_type": m.file_type, "n_layer": m.n_layer, "n_head": m.n_head, "n_head_kv": m.n_head_kv,
            "head_dim": m.head_dim_k, "size_bytes": m.size_bytes,
        },
        "adapter": {"path": str(spec.lora_path), "sha256": outcome.adapter_sha256} if spec.lora_path else None,
        "backend": outcome.backend,
        "settings": {
            "max_tokens": spec.max_tokens, "greedy": True, "system": spec.system, "rotation": spec.rotation,
            "chat_template": "gguf" if outcome.template.from_gguf else "fallback-chatml",
            "chat_template_sha256": outcome.template.sha256,
            "runtime": spec.runtime_options.key(), "batch": spec.batch, "render_time": outcome.render_time,
            # whose verdict ended answers early: the store key's, which a re-judging detector does not change
            "stop_when_final": outcome.reference.key_spec.get("decoding", {}).get("stop_when_final"),
            "store": str(spec.store_path),
        },
        "prompts_summary": {
            "n": len(prompts), "harmful": len(harmful), "benign": len(benign),
            "by_subset": {s: sum(1 for p in prompts if p.subset == s) for s in dict.fromkeys(p.subset for p in prompts)},
            "splits": sorted({p.split for p in prompts}),
            "skipped_too_long": skipped,
        },
        "detector": {"id": detector.id, "name": detector.name, "version": detector.version},
        "noise_floor": noise_floor,
        "runs": runs_out,
        "gate": gate,
        "prompts": prompt_rows,
    }
    attempts = []
    for r in outcome.runs:
        for p in prompts:
            g, d = gens[r.key][(p.id, p.text_sha256)], detections[r.key][p.id]
            attempts.append({
                "prompt_id": p.id, "prompt_sha256": p.text_sha256, "benchmark": p.benchmark, "subset": p.subset,
                "label": "harmful" if p.harmful else "benign", "split": p.split, "prompt": p.text,
                "config": r.spec.label, "run_key": r.key, "response": g.response, "stop_reason": g.stop_reason,
                "n_tokens": len(g.tokens), "refused": d.refused, "rule": d.rule, "score": d.score,
                "flipped_vs_reference": None if r.spec.is_reference else d.refused != ref_v[p.id],
                "unstable": p.id in unstable, "detector": report["detector"],
            })
    stability = None
    if noise_run:
        stability = StabilityMarks(ref_run.key, noise_run.key, detector.id,
                                   tuple((p.id, p.text_sha256, p.id not in unstable) for p in prompts))
    return Summary(report, stability, tuple(attempts))
