"""A finished audit read back from its directory, for judging its stored answers again.

An audit's report.json names every run (label, store key, cache types, rotation, variant) and every
prompt (id, text, text hash, group); its store holds each run's generations and scores. That is all
`summary.summarize` needs, with a detector, to compute a report: so another detector re-judges an audit
without opening llama.cpp for generation, and without the flags the audit was run with. Nothing here
generates or writes.
"""

from __future__ import annotations

from pathlib import Path

from ..datasets import Prompt
from ..errors import KvedgeError, RunDirError
from ..gguf.model import load_model
from ..gguf.template import chat_template_for
from ..llama.runtime import KVConfig, RuntimeOptions
from ..results.audit import AuditReport, RunResult
from .spec import AuditOutcome, AuditRun, AuditSpec, RunSpec
from .store import AuditRows, Store


def load_report(path: str | Path) -> AuditReport:
    """The audit report in a directory (or the report.json named)."""
    from ..report import read_document

    p = Path(path)
    if not p.exists():
        raise RunDirError(f"no audit report at {p}: run `kvedge audit --out DIR` first")
    if p.is_dir():
        p = p / "report.json"
    doc = read_document(p, "kvedge.audit/", RunDirError, "run `kvedge audit --out DIR` first")
    try:
        return AuditReport.from_dict(doc)
    except (TypeError, KeyError, ValueError) as exc:
        raise RunDirError(f"{p} is not an audit report this kvedge can read ({exc})") from None


def _prompts(report: AuditReport, where: Path) -> tuple[Prompt, ...]:
    out = []
    for p in report.prompts:
        if p.text is None:
            raise RunDirError(f"{where} predates stored prompt texts: rerun the same `kvedge audit` "
                              "command once (it generates nothing) and re-judge")
        prompt = Prompt(p.id, p.benchmark, p.text, p.harmful, p.split, p.category)
        if prompt.text_sha256 != p.text_sha256:
            raise RunDirError(f"{where}: the text of prompt {p.id} does not match its hash")
        out.append(prompt)
    return tuple(out)


def _config(r: RunResult) -> KVConfig:
    """A run's cache configuration, per-layer maps included."""
    return KVConfig(r.type_k, r.type_v, tuple((l, t) for l, t in r.layers_k or ()),
                    tuple((l, t) for l, t in r.layers_v or ()))


def load_audit(run_dir: str | Path) -> tuple[AuditOutcome, AuditRows]:
    """The audit in `run_dir` (its report.json and kvedge.sqlite) as `summarize` takes it. The audited
    model must still be where the report says, unchanged: its shapes give the memory figures."""
    run_dir = Path(run_dir)
    report = load_report(run_dir)
    prompts = _prompts(report, run_dir)
    m = report.model
    try:
        model = load_model(m.path)
    except KvedgeError as exc:
        raise RunDirError(f"the audited model is needed to re-judge: {exc}") from None
    if model.sha256 != m.sha256:
        raise RunDirError(f"{m.path} changed since the audit (sha256 differs)")
    template = chat_template_for(model)
    if template.sha256 != report.settings.chat_template_sha256:
        raise RunDirError("the model's chat template differs from the audited one")
    s, nf, adapter = report.settings, report.noise_floor, report.adapter
    spec = AuditSpec(
        model=model, prompts=prompts,
        kv=tuple(dict.fromkeys(_config(r) for r in report.runs if r.rotation is not None)),
        rotation=s.rotation, lora_path=Path(adapter.path) if adapter else None, max_tokens=s.max_tokens,
        options=RuntimeOptions(**s.runtime), system=s.system, out_dir=run_dir,
        noise=nf.how if nf else None, batch=s.batch,
    )
    store_path = run_dir / "kvedge.sqlite"
    if not store_path.is_file():
        raise RunDirError(f"no results store at {store_path}")
    with Store(store_path) as store:
        stored = store.runs()
        runs = []
        for r in report.runs:
            rs = RunSpec(_config(r), r.rotation is not False, r.variant or "")
            if r.key not in stored or rs.label != r.label:
                raise RunDirError(f"{store_path} does not hold the run {r.label!r} its report names")
            key_spec = {k: v for k, v in stored[r.key].items() if k != "label"}
            runs.append(AuditRun(rs, r.key, key_spec))
        ref = next(r for r in runs if r.spec.is_reference)
        rows = store.audit_rows([r.key for r in runs], ref.key)
    for r in runs:
        missing = [p.id for p in prompts if (p.id, p.text_sha256) not in rows.generations[r.key]]
        if missing:
            raise RunDirError(f"{store_path} lacks {len(missing)} answers of {r.spec.label} (e.g. {missing[0]}): "
                              "the audit did not finish; rerun it")
    outcome = AuditOutcome(spec, template, report.backend, adapter.sha256 if adapter else None, runs)
    return outcome, rows
