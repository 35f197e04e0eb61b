"""The audit pipeline's entry: a validated spec in, the report and its files out. kvedge.api validates a
user's arguments and calls `run`; export and verify build their specs with typed configs and call `run`
too, so every audit, however it was asked for, goes through the same lock, session, statistics and
writers.

    spec -> lock the directory -> (servers) -> session (generate, score, store) -> rows -> summary
         -> stability marks in the store -> (server annotations) -> report.json/md/html, attempts.jsonl
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..detectors import Detector, close_detector
from ..llama.runtime import LLAMA_CPP, RuntimeFactory
from ..report import ReportFiles, write_jsonl, write_reports
from ..results.audit import AuditReport
from .session import run_audit
from .spec import AuditOutcome, AuditSpec
from .store import AuditRows, Store, audit_lock
from .summary import summarize


@dataclass(frozen=True)
class AuditResult:
    report: AuditReport
    files: ReportFiles  # report.json, report.md, report.html
    attempts_path: Path  # attempts.jsonl: one line per prompt x configuration
    store_path: Path
    generated: int

    @property
    def json_path(self) -> Path:
        return self.files.json

    @property
    def md_path(self) -> Path:
        return self.files.md

    @property
    def html_path(self) -> Path:
        return self.files.html


@dataclass(frozen=True)
class ServerOptions:
    """Running servers that answer the audit's runs (kvedge.server), and how long to wait on them."""

    servers: Sequence  # kvedge.server.ServerSpec
    timeout: float
    patience: float


def run(spec: AuditSpec, progress: bool = True, runtimes: RuntimeFactory = LLAMA_CPP,
        fail_under: float | None = None, servers: ServerOptions | None = None,
        own_detector: bool = False, delta: float | None = None) -> AuditResult:
    """Generate and score what the store lacks for `spec`, then judge and write. One audit at a time writes
    a directory: a second is refused, not interleaved. `own_detector`: close `spec.detector` afterwards
    (a judge frees its model)."""
    served = None
    with audit_lock(spec.store_path):
        if servers and servers.servers:
            from ..gguf.template import chat_template_for
            from ..server.prepare import prepare

            served = prepare(servers.servers, spec.model, spec.lora_path, list(spec.prompts),
                             chat_template_for(spec.model), spec.system, spec.noise, spec.runtime_options, runtimes,
                             spec.store_path, servers.timeout, servers.patience)
            spec, runtimes = dataclasses.replace(spec, explicit_runs=served.plan.runs), served.runtimes
        try:
            outcome = run_audit(spec, progress=progress, runtimes=runtimes)
        finally:
            if served:
                served.runtimes.close()
        with Store(spec.store_path) as store:
            rows = store.audit_rows([r.key for r in outcome.runs], outcome.reference.key)
        return judge_and_write(outcome, rows, spec.detector, own_detector, fail_under, spec.out_dir, served, delta)


def judge_and_write(outcome: AuditOutcome, rows: AuditRows, det: Detector, owned: bool,
                    fail_under: float | None, out_dir: Path, served=None, delta: float | None = None) -> AuditResult:
    """Verdicts from the stored answers, the statistics, and the audit's files: report.json/.md/.html and
    attempts.jsonl in `out_dir`; the noise-stability marks go to the audit's store. An `owned` detector
    is closed afterwards. `served` (a server audit's servers) adds what each server was and did."""
    try:
        summary = summarize(outcome, rows, det, fail_under, delta)
    finally:
        if owned:
            close_detector(det)
    report = summary.report
    with Store(outcome.spec.store_path) as store:
        if summary.stability:
            s = summary.stability
            store.put_stability(s.ref_key, s.noise_key, s.detector, list(s.marks))
        if served:
            from ..server.annotate import annotate

            report = annotate(report, outcome, served, store)
    files = write_reports(report, out_dir, "report")
    attempts = write_jsonl(summary.attempts, Path(out_dir) / "attempts.jsonl")
    return AuditResult(report, files, attempts, outcome.spec.store_path, outcome.generated)


def rejudge(run_dir: str | Path, det: Detector, owned: bool, out: str | Path | None = None,
            fail_under: float | None = None, delta: float | None = None) -> AuditResult:
    """A finished audit's stored answers judged by `det`: nothing generated. Reports go to `out` (default:
    `run_dir`/detector-<id>/), the audit's own reports stay as they are."""
    from .rejudge import load_audit

    outcome, rows = load_audit(run_dir)
    out_dir = Path(out) if out else Path(run_dir) / f"detector-{det.id}"
    return judge_and_write(outcome, rows, det, owned, fail_under, out_dir, delta=delta)
