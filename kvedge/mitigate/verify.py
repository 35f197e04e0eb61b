"""`kvedge verify DEPLOY_DIR`: audit exactly what deploy.json says on the eval split (prompts export never
saw), beside the unmitigated config at the same KV types and the f16 reference with its noise run.

Before any model runs, the folder is checked: every file export wrote must still have its sha256, the
models it points at too, and every rendering must read back as deploy.json says; otherwise it refuses.

Recovery = 1 - flips(mitigated vs f16) / flips(unmitigated vs f16), flips counted both ways on harmful and
benign prompts, with a paired bootstrap interval over prompts (stats.bootstrap). Beside it: whether the
mitigated flips are within the f16 noise floor (noise.judge), the one-sided recovery of lost refusals
when refusals were lost, rates, KLD and PPL ratio, KV memory and its overhead over the unmitigated
config, and PCR's prescription against the choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import __version__
from ..errors import DeploymentError
from ..gguf.model import inspect_model, sha256_file
from ..llama.runtime import F16, KVConfig, RuntimeOptions
from ..results.audit import AuditReport, RunResult
from ..stats import Estimate, bootstrap, ratio_of_means
from .choose import NOISE, Measured, Target, measure, run_entry
from .deploy import SCHEMA, Deployment, FileRef, disagreements
from .measure import audit_configs

VERIFY_SCHEMA = "kvedge.verify/1"
Log = Callable[[str], None]


def _check_file(ref: FileRef, root: Path, what: str) -> Path:
    p = ref.resolve(root)
    if not p.is_file():
        raise DeploymentError(f"{what} {p} is missing")
    if sha256_file(p) != ref.sha256:
        raise DeploymentError(f"sha256 mismatch: {what} {p} changed after export")
    return p


def load_deployment(folder: str | Path) -> tuple[dict, Deployment]:
    """deploy.json of a folder whose files are all as export wrote them (else DeploymentError)."""
    from ..report import read_document

    root = Path(folder)
    doc = read_document(root / "deploy.json", SCHEMA, DeploymentError, f"run `kvedge export --out {root}` first")
    for name, f in sorted(doc.get("files", {}).items()):
        _check_file(FileRef(name, f["sha256"], f["size_bytes"]), root, "file")
    dep = Deployment.from_dict(doc["deployment"])
    _check_file(dep.model, root, "deployment model")
    if dep.adapter:
        _check_file(dep.adapter, root, "deployment adapter")
    for what in ("model", "adapter"):
        ref = doc["source"].get(what)
        if ref:
            _check_file(FileRef.from_dict(ref), root, f"source {what} (the unmitigated config runs on it)")
    problems = disagreements(dep, root)
    if problems:
        raise DeploymentError("; ".join(problems))
    return doc, dep


@dataclass(frozen=True)
class VerifySpec:
    folder: Path
    doc: dict
    deployment: Deployment
    target: Target
    out: Path
    limit: int | None = None
    max_tokens: int = 64
    options: RuntimeOptions = field(default_factory=RuntimeOptions)


def recovery(ref: list[bool], mitigated: list[bool], unmitigated: list[bool]) -> Estimate:
    """1 - flips(mitigated) / flips(unmitigated) against the reference, per prompt paired; undefined when
    the unmitigated config flips nothing."""
    m = [float(a != b) for a, b in zip(ref, mitigated)]
    u = [float(a != b) for a, b in zip(ref, unmitigated)]
    return bootstrap([m, u], lambda m_, u_: 1.0 - ratio_of_means(m_, u_))


def one_sided_recovery(ref: list[bool], mitigated: list[bool], unmitigated: list[bool]) -> Estimate | None:
    """(R_mitigated - R_unmitigated) / (R_f16 - R_unmitigated) over harmful prompts, when refusals were lost."""
    if sum(ref) <= sum(unmitigated):
        return None

    def stat(f, m, u):
        d = f.sum(axis=-1) - u.sum(axis=-1)
        return np.where(d > 0, (m.sum(axis=-1) - u.sum(axis=-1)) / np.where(d > 0, d, 1.0), np.nan)

    return bootstrap([[float(x) for x in ref], [float(x) for x in mitigated], [float(x) for x in unmitigated]], stat)


def run_verify(spec: VerifySpec, log: Log, progress: bool = True) -> dict[str, Any]:
    doc, dep = spec.doc, spec.deployment
    root = spec.folder
    L = dep.launch
    rot = "on" if L.rotation else "off"
    unmit = KVConfig(doc["unmitigated"]["type_k"], doc["unmitigated"]["type_v"])
    src_model = FileRef.from_dict(doc["source"]["model"]).resolve(root)
    src_adapter = FileRef.from_dict(doc["source"]["adapter"]).resolve(root) if doc["source"].get("adapter") else None
    dep_kv = KVConfig(L.type_k, L.type_v)
    info = inspect_model(src_model)
    smoothed = bool(doc["deployment"].get("smoothed"))

    def run(model: Path, adapter: Path | None, kvs: list[KVConfig], noise: str | None, sub: str) -> AuditReport:
        log(f"eval split: {sub} ({', '.join(k.name for k in kvs)}, rotation {rot})")
        return audit_configs(model, adapter, kvs, L.rotation, "eval", spec.limit, spec.max_tokens,
                             RuntimeOptions(n_ctx=L.n_ctx, n_threads=spec.options.n_threads), noise, spec.out / sub,
                             progress)

    on_original = [unmit] + ([dep_kv] if not smoothed and dep_kv != unmit and dep_kv != F16 else [])
    orig = run(src_model, src_adapter, on_original, NOISE, "original")
    harmful = {p.id: p.harmful for p in orig.prompts}
    ids = list(harmful)

    ref = orig.verdicts("f16")
    noise = orig.verdicts(orig.noise_floor.label)
    u_entry = run_entry(orig, unmit, L.rotation)
    unmit_v = orig.verdicts(u_entry.label)

    rows = []

    def row(role: str, label: str, entry: RunResult, report_name: str, kv: KVConfig, v: dict[str, bool] | None,
            was_smoothed: bool) -> Measured | None:
        m = measure(label, harmful, ref, noise, v) if v is not None else None
        bpt = kv.bytes_per_token(info)
        rows.append({
            "role": role, "label": label, "audit": report_name, "store_key": entry.key, "type_k": kv.type_k,
            "type_v": kv.type_v, "rotation": entry.rotation, "smoothed": was_smoothed,
            "refusal_harmful": entry.refusal_harmful.to_dict(), "over_refusal_benign": entry.over_refusal_benign.to_dict(),
            "kld": entry.kld.to_dict(), "ppl_ratio": entry.ppl_ratio.to_dict(),
            "top1_agreement": entry.top1_agreement.to_dict(),
            "kv_bytes_per_token": bpt, "kv_mib_at_ctx": bpt * L.n_ctx / 2**20,
            "vs_f16": m.to_dict() if m else None,
        })
        return m

    ref_entry, noise_entry = orig.reference, orig.noise_run
    row("reference", "f16", ref_entry, "original", F16, None, False)
    row("noise", noise_entry.label, noise_entry, "original", F16, noise, False)
    m_unmit = row("unmitigated", u_entry.label, u_entry, "original", unmit, unmit_v, False)

    reports: dict[str, AuditReport] = {"original": orig}
    mitigations: dict[str, tuple[Measured, dict[str, bool], KVConfig]] = {}

    def smoothed_audit(role: str, label: str, model: FileRef, adapter: FileRef | None, kv: KVConfig) -> None:
        """A smoothed model's own audit: at f16 (its verdicts against the original's show the smoothing's
        exactness on eval) and at the cache types, judged against the original's f16."""
        rep = run(model.resolve(root), adapter.resolve(root) if adapter else None, [kv], None, role)
        reports[role] = rep
        row(f"{role}-f16", f"{label} (f16 KV)", rep.reference, role, F16, rep.verdicts("f16"), True)
        e = run_entry(rep, kv, L.rotation)
        v = rep.verdicts(e.label)
        mitigations[role] = (row(role, label, e, role, kv, v, True), v, kv)

    label = doc["deployment"]["label"]
    if smoothed:
        smoothed_audit("deployment", label, dep.model, dep.adapter, dep_kv)
    else:
        e = ref_entry if dep_kv == F16 else run_entry(orig, dep_kv, L.rotation)
        v = orig.verdicts(e.label)
        mitigations["deployment"] = (row("deployment", label, e, "original", dep_kv, v, False), v, dep_kv)

    presc = doc["decision"]["prescription"]
    pfile = presc.get("file")
    if pfile and not smoothed:
        pm = FileRef.from_dict(pfile["model"])
        pa = FileRef.from_dict(pfile["adapter"]) if pfile.get("adapter") else None
        if all(r.resolve(root).is_file() and sha256_file(r.resolve(root)) == r.sha256 for r in (pm, pa) if r):
            smoothed_audit("prescription", presc["label"], pm, pa, unmit)
        else:
            log(f"PCR's prescription ({presc['label']}) is not in the work folder any more: not measured on eval")

    ref_l, unmit_l = [ref[i] for i in ids], [unmit_v[i] for i in ids]
    h_ids = [i for i in ids if harmful[i]]
    rec = {}
    for name, (m, v, kv) in mitigations.items():
        one = one_sided_recovery([ref[i] for i in h_ids], [v[i] for i in h_ids], [unmit_v[i] for i in h_ids])
        bpt, ubpt = kv.bytes_per_token(info), unmit.bytes_per_token(info)
        rec[name] = {
            "label": m.label,
            "recovery": recovery(ref_l, [v[i] for i in ids], unmit_l).to_dict(),
            "one_sided_recovery": one.to_dict() if one else None,
            "flips_mitigated": m.n_flips, "flips_unmitigated": m_unmit.n_flips, "n_prompts": len(ids),
            "within_noise": m.within_noise,
            "kv_bytes_at_ctx": bpt * L.n_ctx, "unmitigated_kv_bytes_at_ctx": ubpt * L.n_ctx,
            "memory_overhead": bpt / ubpt - 1,
        }
    m_dep = mitigations["deployment"][0]
    passed = spec.target.met(m_dep)
    d = doc["decision"]
    return {
        "schema": VERIFY_SCHEMA,
        "kvedge_version": __version__,
        "deployment_dir": str(root.resolve()),
        "deploy_sha256": sha256_file(root / "deploy.json"),
        "deployment": {"label": label, "type_k": L.type_k, "type_v": L.type_v, "rotation": L.rotation,
                       "smoothed": smoothed, "n_ctx": L.n_ctx},
        "split": "eval",
        "prompts_summary": orig.prompts_summary.to_dict(),
        "detector": orig.detector.to_dict(),
        "backend": orig.backend,
        "noise_floor": orig.noise_floor.to_dict(),
        "rows": rows,
        "recovery": rec,
        "choice": {"chosen_on_calib": d["chosen"], "qualified_on_calib": d["qualified"], "runner_up": d["runner_up"],
                   "prescription": presc["label"], "prescription_was_chosen": presc["was_chosen"],
                   "prescription_on_eval": rec.get("prescription") or (rec["deployment"] if presc["was_chosen"] else None)},
        "gate": {"target": spec.target.to_dict(), "passed": passed},
        "audits": {name: {"store": str(spec.out / name / "kvedge.sqlite"),
                          "runs": [{"label": r.label, "key": r.key} for r in rep.runs]}
                   for name, rep in reports.items()},
    }
