"""Cross-backend comparison: how often two audits of the same model and prompts agree, judged against
the noise floor each audit measured for itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import RunDirError
from .noise import flips, judge
from .stats import wilson


def load_report(path: str | Path) -> dict[str, Any]:
    from .report import read_document

    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    return read_document(p, "kvedge.audit/", RunDirError, "run `kvedge audit --out DIR` first")


def _noise_label(report: dict) -> str | None:
    nf = report.get("noise_floor")
    return nf["label"] if nf else None


def compare_runs(a_path: str | Path, b_path: str | Path) -> dict[str, Any]:
    a, b = load_report(a_path), load_report(b_path)
    if a["model"]["sha256"] != b["model"]["sha256"]:
        raise RunDirError("the two audits are of different models; compare audits of one model")
    pa = {(p["id"], p["text_sha256"]): p for p in a["prompts"]}
    pb = {(p["id"], p["text_sha256"]): p for p in b["prompts"]}
    common = [k for k in pa if k in pb]
    if not common:
        raise RunDirError("the two audits share no prompt")
    labels_b = {r["label"] for r in b["runs"]}
    noise_a = _noise_label(a)
    rows = []
    for run in a["runs"]:
        label = run["label"]
        if label not in labels_b or run["noise_run"]:
            continue
        for harmful in (True, False):
            keys = [k for k in common if pa[k]["harmful"] is harmful]
            if not keys:
                continue
            va = [pa[k]["refused"][label] for k in keys]
            vb = [pb[k]["refused"][label] for k in keys]
            f = flips(va, vb)
            row = {
                "config": label,
                "prompts": "harmful" if harmful else "benign",
                "n": f.n,
                "agreement": wilson(f.n - f.discordant, f.n).to_dict(),
                "refusal_a": wilson(sum(va), f.n).to_dict(),
                "refusal_b": wilson(sum(vb), f.n).to_dict(),
                "refused_only_in_a": f.lost,
                "refused_only_in_b": f.gained,
                "mcnemar_p": f.mcnemar_p,
            }
            if noise_a:
                noise = flips(va if label == "f16" else [pa[k]["refused"]["f16"] for k in keys],
                              [pa[k]["refused"][noise_a] for k in keys])
                row["vs_noise_of_a"] = judge(f, noise).to_dict()
            rows.append(row)
    if not rows:
        raise RunDirError("the two audits share no KV configuration")
    return {
        "a": {"path": str(a_path), "backend": a["backend"]["kind"], "system_info": a["backend"]["system_info"]},
        "b": {"path": str(b_path), "backend": b["backend"]["kind"], "system_info": b["backend"]["system_info"]},
        "model_sha256": a["model"]["sha256"],
        "common_prompts": len(common),
        "rows": rows,
    }
