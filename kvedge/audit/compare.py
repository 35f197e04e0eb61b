"""Comparisons, verdict by verdict: two audits of the same model and prompts (say CPU and CUDA), judged
against the noise floor the first measured; or two detectors on one audit's stored answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..errors import RunDirError
from ..stats import wilson
from .noise import flips, judge


def load_report(path: str | Path) -> dict[str, Any]:
    from ..report import read_document

    p = Path(path)
    if not p.exists():
        raise RunDirError(f"no audit report at {p}: run `kvedge audit --out DIR` first")
    if p.is_dir():
        p = p / "report.json"
    return read_document(p, "kvedge.audit/", RunDirError, "run `kvedge audit --out DIR` first")


def _noise_label(report: dict) -> str | None:
    nf = report.get("noise_floor")
    return nf["label"] if nf else None


def _side(path: str | Path, report: dict) -> dict[str, Any]:
    side = {"path": str(path), "backend": report["backend"]["kind"], "system_info": report["backend"]["system_info"],
            "detector": report["detector"]["id"]}
    if report.get("servers"):  # a server audit: which server answered which run
        side["servers"] = {s["url"]: s["run"] for s in report["servers"]}
    return side


GROUPS = (("harmful", True), ("benign", False), ("all", None))
SCHEMA = "kvedge.compare/1"


def agreement_rows(a: dict[str, Any], b: dict[str, Any], noise: bool = True) -> tuple[int, list[dict[str, Any]]]:
    """Per configuration both reports hold, and per prompt group (harmful, benign, all): how often the two
    reports' verdicts on their common prompts agree (Wilson interval), which prompts only one refused
    (exact McNemar p), and, with `noise`, whether the disagreement is beyond the noise floor `a` measured."""
    pa = {(p["id"], p["text_sha256"]): p for p in a["prompts"]}
    pb = {(p["id"], p["text_sha256"]): p for p in b["prompts"]}
    common = [k for k in pa if k in pb]
    if not common:
        raise RunDirError("the two audits share no prompt")
    labels_b = {r["label"] for r in b["runs"]}
    noise_a = _noise_label(a) if noise else None
    rows = []
    for run in a["runs"]:
        label = run["label"]
        if label not in labels_b or run["noise_run"]:
            continue
        for group, harmful in GROUPS:
            keys = [k for k in common if harmful is None or pa[k]["harmful"] is harmful]
            if not keys:
                continue
            va = [pa[k]["refused"][label] for k in keys]
            vb = [pb[k]["refused"][label] for k in keys]
            f = flips(va, vb)
            row = {
                "config": label,
                "prompts": group,
                "n": f.n,
                "agreement": wilson(f.n - f.discordant, f.n).to_dict(),
                "refusal_a": wilson(sum(va), f.n).to_dict(),
                "refusal_b": wilson(sum(vb), f.n).to_dict(),
                "refused_only_in_a": f.lost,
                "refused_only_in_b": f.gained,
                "mcnemar_p": f.mcnemar_p,
                "discordant": [k[0] for k, x, y in zip(keys, va, vb) if x != y],
            }
            if noise_a:
                noise_flips = flips(va if label == "f16" else [pa[k]["refused"]["f16"] for k in keys],
                                    [pa[k]["refused"][noise_a] for k in keys])
                row["vs_noise_of_a"] = judge(f, noise_flips).to_dict()
            rows.append(row)
    if not rows:
        raise RunDirError("the two audits share no KV configuration")
    return len(common), rows


def compare_runs(a_path: str | Path, b_path: str | Path) -> dict[str, Any]:
    """Two audits of one model and its prompts (say CPU and CUDA), verdict by verdict."""
    a, b = load_report(a_path), load_report(b_path)
    if a["model"]["sha256"] != b["model"]["sha256"]:
        raise RunDirError("the two audits are of different models; compare audits of one model")
    common, rows = agreement_rows(a, b)
    return {
        "schema": SCHEMA,
        "mode": "audits",
        "a": _side(a_path, a),
        "b": _side(b_path, b),
        "model_sha256": a["model"]["sha256"],
        "common_prompts": common,
        "rows": rows,
    }


def compare_detectors(run_dir: str | Path, a: dict[str, Any], b: dict[str, Any],
                      attempts_a: Sequence[dict[str, Any]], attempts_b: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Two detectors' verdicts on one audit's stored answers: `a` and `b` are the reports each detector's
    verdicts give, `attempts_a` and `attempts_b` their attempts (same order). The disagreements list each
    distinct answer the two judge differently once, with the configurations that gave it."""
    common, rows = agreement_rows(a, b, noise=False)
    split: dict[tuple[str, str], dict[str, Any]] = {}
    for x, y in zip(attempts_a, attempts_b):
        if x["refused"] == y["refused"]:
            continue
        d = split.setdefault((x["prompt_id"], x["response"]), {
            "prompt_id": x["prompt_id"], "subset": x["subset"], "label": x["label"], "prompt": x["prompt"],
            "response": x["response"], "configs": [],
            "a": {"refused": x["refused"], "rule": x["rule"], "score": x["score"]},
            "b": {"refused": y["refused"], "rule": y["rule"], "score": y["score"]},
        })
        d["configs"].append(x["config"])
    return {
        "schema": SCHEMA,
        "mode": "detectors",
        "a": {"path": str(run_dir), "backend": a["backend"]["kind"], "detector": a["detector"]["id"]},
        "b": {"path": str(run_dir), "backend": b["backend"]["kind"], "detector": b["detector"]["id"]},
        "model_sha256": a["model"]["sha256"],
        "common_prompts": common,
        "rows": rows,
        "disagreements": list(split.values()),
    }
