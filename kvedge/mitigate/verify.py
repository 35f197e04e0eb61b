"""`kvedge verify DEPLOY_DIR`: audit exactly what deploy.json says on the eval split (prompts export never
saw), beside the unmitigated config at the same KV types and the f16 reference with its noise run, and
judge it by the rule export chose it by: the one verdict function (kvedge.audit.verdict), at the margin
export used. Only `equivalent` passes.

Before any model runs, the folder is checked: every file export wrote must still have its sha256, the
models it points at too, every rendering must read back as deploy.json says, and the configuration must be
one a runtime can run (kvedge.mitigate.preconditions: one cache type for an MLA model, flash attention
for a quantized V, no Ollama file for what Ollama cannot express); otherwise it refuses.

Recovery, on the same prompts, with paired bootstrap intervals over prompts: of the flips
(1 - flips(mitigated) / flips(unmitigated), both ways, both populations) and of each population's mean
margin shift (1 - shift(mitigated) / shift(unmitigated)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__, defaults
from ..audit.compare import judge_against
from ..audit.noise import flips
from ..audit.verdict import equivalence
from ..errors import DeploymentError
from ..gguf.model import inspect_model, sha256_file
from ..llama.runtime import F16, KVConfig, RuntimeOptions
from ..results.audit import AuditReport, FlipCounts, RunResult
from ..results.deploy import SCHEMA as DEPLOY_SCHEMA
from ..results.deploy import DeployDocument, Deployment, FileRef
from ..results.verify import SCHEMA, Gate, Recovery, VerifyReport, VerifyRow
from ..stats import Estimate, bootstrap, ratio_of_means
from .choose import NOISE, run_entry
from .deploy import MODELFILE, disagreements
from .preconditions import ollama_refusal, refusal
from .measure import audit_configs

Log = Callable[[str], None]


def _check_file(ref: FileRef, root: Path, what: str) -> Path:
    p = ref.resolve(root)
    if not p.is_file():
        raise DeploymentError(f"{what} {p} is missing")
    if sha256_file(p) != ref.sha256:
        raise DeploymentError(f"sha256 mismatch: {what} {p} changed after export")
    return p


def load_deployment(folder: str | Path) -> DeployDocument:
    """deploy.json of a folder whose files are all as export wrote them (else DeploymentError)."""
    from ..report import read_document

    root = Path(folder)
    raw = read_document(root / "deploy.json", DEPLOY_SCHEMA, DeploymentError, f"run `kvedge export --out {root}` first")
    try:
        doc = DeployDocument.from_dict(raw)
    except (TypeError, KeyError, ValueError) as exc:
        raise DeploymentError(f"{root / 'deploy.json'} is not a deployment this kvedge can read ({exc})") from None
    for name, f in sorted((doc.files or {}).items()):
        _check_file(FileRef(name, f["sha256"], f["size_bytes"]), root, "file")
    dep = doc.deployment.deployment
    _check_file(dep.model, root, "deployment model")
    if dep.adapter:
        _check_file(dep.adapter, root, "deployment adapter")
    for what, ref in doc.source.items():
        if ref:
            _check_file(ref, root, f"source {what} (the unmitigated config runs on it)")
    check_runnable(dep, root)
    return doc


def check_runnable(dep: Deployment, root: Path) -> None:
    """A deployment a runtime can run as verified, stated alike in every rendering (else DeploymentError)."""
    problems = disagreements(dep, root)  # first: an edited file is the likeliest cause of anything below
    if problems:
        raise DeploymentError("; ".join(problems))
    why = refusal(dep.launch, inspect_model(dep.model.resolve(root)))
    if why:
        raise DeploymentError(f"no runtime can run this deployment as verified: {why}")
    if (root / MODELFILE).exists() and ollama_refusal(dep.launch):
        raise DeploymentError(f"{root / MODELFILE} cannot hold this deployment: {ollama_refusal(dep.launch)}")


@dataclass(frozen=True)
class VerifySpec:
    folder: Path
    doc: DeployDocument
    out: Path
    limit: int | None = None
    max_tokens: int = defaults.MAX_TOKENS
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    delta: float | None = None  # None: the margin export judged by


def flip_recovery(ref: list[bool], mitigated: list[bool], unmitigated: list[bool]) -> Estimate:
    """1 - flips(mitigated) / flips(unmitigated) against the reference, per prompt paired; undefined when
    the unmitigated config flips nothing."""
    m = [float(a != b) for a, b in zip(ref, mitigated)]
    u = [float(a != b) for a, b in zip(ref, unmitigated)]
    return bootstrap([m, u], lambda m_, u_: 1.0 - ratio_of_means(m_, u_))


def margin_recovery(ref: list[float | None], mitigated: list[float | None],
                    unmitigated: list[float | None]) -> Estimate | None:
    """1 - mean(m_mitigated - m_ref) / mean(m_unmitigated - m_ref) over the prompts all three read a margin
    for, paired; None when no prompt has all three."""
    rows = [(r, m, u) for r, m, u in zip(ref, mitigated, unmitigated) if None not in (r, m, u)]
    if not rows:
        return None

    def stat(r, m, u):
        d = (u - r).sum(axis=-1)
        return np.where(d != 0, 1.0 - (m - r).sum(axis=-1) / np.where(d != 0, d, 1.0), np.nan)

    return bootstrap([[r for r, _, _ in rows], [m for _, m, _ in rows], [u for _, _, u in rows]], stat)


def deployment_gate(dep_row: VerifyRow, label: str) -> Gate:
    """Only `equivalent` passes. A deployment that is the f16 cache itself (export could show no quantized
    candidate equivalent) is the reference: equivalent by construction, so it passes, saying it saves nothing."""
    if dep_row.verdict is None:
        return Gate("equivalent", True,
                    f"{label}: the deployment is the f16 cache itself (the reference), which export recommended "
                    "because no quantized candidate was shown equivalent: safe by construction, no KV memory saved")
    return Gate(dep_row.verdict.verdict, dep_row.verdict.verdict == "equivalent", dep_row.verdict.line)


def run_verify(spec: VerifySpec, log: Log, progress: bool = True) -> VerifyReport:
    doc = spec.doc
    root = spec.folder
    L = doc.deployment.launch
    rot = "on" if L.rotation else "off"
    unmit = KVConfig(doc.unmitigated.type_k, doc.unmitigated.type_v)
    src_model = doc.source["model"].resolve(root)
    src_adapter = doc.source["adapter"].resolve(root) if doc.source.get("adapter") else None
    dep_kv = KVConfig(L.type_k, L.type_v)
    info = inspect_model(src_model)
    # a model file export wrote (smoothed weights, or the K transform's metadata): audited in a store of its own
    smoothed = doc.deployment.smoothed or L.k_transform
    delta = spec.delta if spec.delta is not None else doc.equivalence.delta
    options = RuntimeOptions(n_ctx=L.n_ctx, n_threads=spec.options.n_threads)

    def run(model: Path, adapter: Path | None, kvs: list[KVConfig], noise: str | None, sub: str) -> AuditReport:
        log(f"eval split: {sub} ({', '.join(k.name for k in kvs)}, rotation {rot})")
        return audit_configs(model, adapter, kvs, L.rotation, "eval", spec.limit, spec.max_tokens, options, noise,
                             spec.out / sub, progress)

    on_original = [unmit] + ([dep_kv] if not smoothed and dep_kv != unmit and dep_kv != F16 else [])
    orig = run(src_model, src_adapter, on_original, NOISE, "original")
    ids = [p.id for p in orig.prompts]
    ref = orig.verdicts("f16")
    u_entry = run_entry(orig, unmit, L.rotation)
    reports: dict[str, AuditReport] = {"original": orig}
    rows: list[VerifyRow] = []

    def row(role: str, label: str, rep: AuditReport, entry: RunResult, audit: str, kv: KVConfig,
            judged: bool, was_smoothed: bool) -> VerifyRow:
        v = rep.verdicts(entry.label)
        groups = {h: [p.id for p in orig.prompts if p.harmful is h] for h in (True, False)}
        fh, fb = (flips([ref[i] for i in groups[h]], [v[i] for i in groups[h]]) for h in (True, False))
        bpt = kv.bytes_per_token(info)
        r = VerifyRow(
            role=role, label=label, audit=audit, store_key=entry.key, type_k=kv.type_k, type_v=kv.type_v,
            rotation=entry.rotation, smoothed=was_smoothed, refusal_harmful=entry.refusal_harmful,
            over_refusal_benign=entry.over_refusal_benign, kld=entry.kld, ppl_ratio=entry.ppl_ratio,
            top1_agreement=entry.top1_agreement, margin=entry.margin, kv_bytes_per_token=bpt,
            kv_mib_at_ctx=bpt * L.n_ctx / 2**20,
            harmful=FlipCounts(fh.n, fh.lost, fh.gained) if role != "reference" else None,
            benign=FlipCounts(fb.n, fb.lost, fb.gained) if role != "reference" else None,
            verdict=judge_against(orig, "f16", rep, entry.label, delta, label) if judged else None)
        rows.append(r)
        return r

    row("reference", "f16", orig, orig.reference, "original", F16, False, False)
    row("noise", orig.noise_run.label, orig, orig.noise_run, "original", F16, False, False)
    u_row = row("unmitigated", u_entry.label, orig, u_entry, "original", unmit, True, False)
    mitigations: dict[str, tuple[VerifyRow, AuditReport, str, KVConfig]] = {}

    def smoothed_audit(role: str, label: str, model: FileRef, adapter: FileRef | None, kv: KVConfig) -> None:
        """A modified model's own audit (smoothed, or carrying the K transform): at f16 (its verdicts against the
        original's show the modification's exactness on eval) and at the cache types, judged against the
        original's f16."""
        rep = run(model.resolve(root), adapter.resolve(root) if adapter else None, [kv], None, role)
        reports[role] = rep
        row(f"{role}-f16", f"{label} (f16 KV)", rep, rep.reference, role, F16, True, True)
        e = run_entry(rep, kv, L.rotation)
        mitigations[role] = (row(role, label, rep, e, role, kv, True, True), rep, e.label, kv)

    label = doc.deployment.label
    if smoothed:
        smoothed_audit("deployment", label, doc.deployment.model, doc.deployment.adapter, dep_kv)
    else:
        e = orig.reference if dep_kv == F16 else run_entry(orig, dep_kv, L.rotation)
        mitigations["deployment"] = (row("deployment", label, orig, e, "original", dep_kv, dep_kv != F16, False),
                                     orig, e.label, dep_kv)

    presc = doc.decision.prescription
    pfile = presc.get("file")
    if pfile and not smoothed:
        pm = FileRef.from_dict(pfile["model"])
        pa = FileRef.from_dict(pfile["adapter"]) if pfile.get("adapter") else None
        if all(r.resolve(root).is_file() and sha256_file(r.resolve(root)) == r.sha256 for r in (pm, pa) if r):
            smoothed_audit("prescription", presc["label"], pm, pa, unmit)
        else:
            log(f"PCR's prescription ({presc['label']}) is not in the work folder any more: not measured on eval")

    unmit_v = orig.verdicts(u_entry.label)
    margins = {p.id: p.margin or {} for p in orig.prompts}
    rec = {}
    for name, (r, rep, run_label, kv) in mitigations.items():
        if r.verdict is None:  # the f16 cache: nothing to recover, it is the reference
            continue
        v = rep.verdicts(run_label)
        mm = {p.id: (p.margin or {}).get(run_label) for p in rep.prompts}

        def margin_rec(harmful: bool) -> Estimate | None:
            sel = [p.id for p in orig.prompts if p.harmful is harmful]
            return margin_recovery([margins[i].get("f16") for i in sel], [mm.get(i) for i in sel],
                                   [margins[i].get(u_entry.label) for i in sel])

        bpt, ubpt = kv.bytes_per_token(info), unmit.bytes_per_token(info)
        n_mit = r.harmful.lost + r.harmful.gained + r.benign.lost + r.benign.gained
        n_unmit = u_row.harmful.lost + u_row.harmful.gained + u_row.benign.lost + u_row.benign.gained
        rec[name] = Recovery(r.label, r.verdict, flip_recovery([ref[i] for i in ids], [v[i] for i in ids],
                                                               [unmit_v[i] for i in ids]),
                             n_mit, n_unmit, len(ids), margin_rec(True), margin_rec(False), bpt * L.n_ctx,
                             ubpt * L.n_ctx, bpt / ubpt - 1)
    d = doc.decision
    return VerifyReport(
        schema=SCHEMA,
        kvedge_version=__version__,
        deployment_dir=str(root.resolve()),
        deploy_sha256=sha256_file(root / "deploy.json"),
        deployment={"label": label, "type_k": L.type_k, "type_v": L.type_v, "rotation": L.rotation,
                    "smoothed": doc.deployment.smoothed, "kind": doc.deployment.kind, "n_ctx": L.n_ctx},
        split="eval",
        prompts_summary=orig.prompts_summary,
        detector=orig.detector,
        backend=orig.backend,
        noise_floor=orig.noise_floor,
        equivalence=doc.equivalence if spec.delta is None else equivalence(spec.delta, []),
        rows=rows,
        recovery=rec,
        choice={"chosen_on_calib": d.chosen, "qualified_on_calib": d.qualified, "stopped_at": d.stopped_at,
                "prescription": presc["label"], "prescription_was_chosen": presc["was_chosen"]},
        gate=deployment_gate(mitigations["deployment"][0], label),
        audits={name: {"store": str(spec.out / name / "kvedge.sqlite"),
                       "runs": [{"label": r.label, "key": r.key} for r in rep.runs]}
                for name, rep in reports.items()},
    )
