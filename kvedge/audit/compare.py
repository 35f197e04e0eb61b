"""Comparisons, verdict by verdict: two audits of the same model and prompts (say CPU and CUDA), judged
against the noise floor the first measured; or two detectors on one audit's stored answers."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..detectors import Detector, close_detector
from ..errors import RunDirError
from ..results.audit import Attempt, AuditReport, Verdict
from ..results.compare import (
    SCHEMA,
    AgreementRow,
    CompareResult,
    ConfigVerdict,
    DetectorVerdict,
    Disagreement,
    Side,
)
from ..stats import bootstrap, difference_of_means, wilson
from .noise import flips, judge
from .rejudge import load_audit, load_report
from .verdict import Population, equivalence, judge_config

GROUPS = (("harmful", True), ("benign", False), ("all", None))


def _side(path: str | Path, report: AuditReport) -> Side:
    servers = {s["url"]: s["run"] for s in report.servers} if report.servers else None
    return Side(str(path), report.backend["kind"], report.backend["system_info"], report.detector.id, servers)


def agreement_rows(a: AuditReport, b: AuditReport, noise: bool = True) -> tuple[int, list[AgreementRow]]:
    """Per configuration both reports hold, and per prompt group (harmful, benign, all): how often the two
    reports' verdicts on their common prompts agree (Wilson interval), which prompts only one refused
    (exact McNemar p), and, with `noise`, whether the disagreement is beyond the noise floor `a` measured."""
    pa = {(p.id, p.text_sha256): p for p in a.prompts}
    pb = {(p.id, p.text_sha256): p for p in b.prompts}
    common = [k for k in pa if k in pb]
    if not common:
        raise RunDirError("the two audits share no prompt")
    labels_b = {r.label for r in b.runs}
    noise_a = a.noise_floor.label if noise and a.noise_floor else None
    rows = []
    for run in a.runs:
        label = run.label
        if label not in labels_b or run.noise_run:
            continue
        for group, harmful in GROUPS:
            keys = [k for k in common if harmful is None or pa[k].harmful is harmful]
            if not keys:
                continue
            va = [pa[k].refused[label] for k in keys]
            vb = [pb[k].refused[label] for k in keys]
            f = flips(va, vb)
            vs_noise = None
            if noise_a:
                noise_flips = flips(va if label == "f16" else [pa[k].refused["f16"] for k in keys],
                                    [pa[k].refused[noise_a] for k in keys])
                vs_noise = judge(f, noise_flips)
            rows.append(AgreementRow(
                config=label, prompts=group, n=f.n, agreement=wilson(f.n - f.discordant, f.n),
                refusal_a=wilson(sum(va), f.n), refusal_b=wilson(sum(vb), f.n), refused_only_in_a=f.lost,
                refused_only_in_b=f.gained, mcnemar_p=f.mcnemar_p,
                discordant=[k[0] for k, x, y in zip(keys, va, vb) if x != y], vs_noise_of_a=vs_noise))
    if not rows:
        raise RunDirError("the two audits share no KV configuration")
    return len(common), rows


def judge_against(ref: AuditReport, ref_label: str, run: AuditReport, run_label: str, delta: float,
                  label: str | None = None) -> Verdict:
    """Run `run_label` of `run` judged against run `ref_label` of `ref` on their common prompts, by the one
    verdict function: its flips against the reference's, judged against the flips of `ref`'s own noise run
    (f16 against its noise run), and the margin's mean paired shift (run - reference) against +-delta.
    This is how export and verify judge a configuration measured in another audit (a smoothed model's),
    and how compare judges one audit's run against another's."""
    if not ref.noise_floor:
        raise RunDirError("judging a configuration needs the reference audit's noise run (it was run with --noise none)")
    pr = {(p.id, p.text_sha256): p for p in ref.prompts}
    pq = {(p.id, p.text_sha256): p for p in run.prompts}
    common = [k for k in pr if k in pq]
    noise_label = ref.noise_floor.label
    pops = []
    for name, harmful in (("harmful", True), ("benign", False)):
        keys = [k for k in common if pr[k].harmful is harmful]
        ref_v = [pr[k].refused[ref_label] for k in keys]
        run_v = [pq[k].refused[run_label] for k in keys]
        noise = flips([pr[k].refused["f16"] for k in keys], [pr[k].refused[noise_label] for k in keys])
        pairs = [((pq[k].margin or {}).get(run_label), (pr[k].margin or {}).get(ref_label)) for k in keys]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        shift = bootstrap([[x for x, _ in pairs], [y for _, y in pairs]], difference_of_means) if pairs else None
        pops.append(Population(name, judge(flips(ref_v, run_v), noise), shift, sum(run_v), sum(ref_v), len(keys)))
    return judge_config(label or run_label, pops[0], pops[1], delta)


def config_verdicts(a: AuditReport, b: AuditReport, delta: float | None = None) -> list[ConfigVerdict]:
    """For every configuration both audits ran: B's run judged against A's (`judge_against`), with A's
    equivalence margin unless `delta` is given."""
    if not a.noise_floor:
        return []
    d = equivalence(delta if delta is not None else (a.equivalence.delta if a.equivalence else None), []).delta
    labels_b = {r.label for r in b.runs}
    return [ConfigVerdict(r.label, judge_against(a, r.label, b, r.label, d, f"{r.label} (B vs A)"))
            for r in a.runs if not r.noise_run and r.label in labels_b]


def compare_runs(a_path: str | Path, b_path: str | Path, delta: float | None = None) -> CompareResult:
    """Two audits of one model and its prompts (say CPU and CUDA), verdict by verdict, and for each
    configuration whether B is equivalent to A."""
    a, b = load_report(a_path), load_report(b_path)
    if a.model.sha256 != b.model.sha256:
        raise RunDirError("the two audits are of different models; compare audits of one model")
    common, rows = agreement_rows(a, b)
    return CompareResult(SCHEMA, "audits", _side(a_path, a), _side(b_path, b), a.model.sha256, common, rows,
                         config_verdicts(a, b, delta) or None)


def compare_detectors(run_dir: str | Path, detectors: Sequence[Detector], owned: Sequence[bool]) -> CompareResult:
    """Two detectors' verdicts on one audit's stored answers (nothing generated). The disagreements list
    each distinct answer the two judge differently once, with the configurations that gave it. Detectors
    marked `owned` are closed afterwards."""
    from .summary import summarize

    outcome, rows_ = load_audit(run_dir)
    summaries = []
    for det, own in zip(detectors, owned):
        try:
            summaries.append(summarize(outcome, rows_, det))
        finally:
            if own:
                close_detector(det)
    (a, attempts_a), (b, attempts_b) = ((s.report, s.attempts) for s in summaries)
    common, rows = agreement_rows(a, b, noise=False)
    return CompareResult(SCHEMA, "detectors", Side(str(run_dir), a.backend["kind"], detector=a.detector.id),
                         Side(str(run_dir), b.backend["kind"], detector=b.detector.id), a.model.sha256, common, rows,
                         disagreements=_disagreements(attempts_a, attempts_b))


def _disagreements(attempts_a: Sequence[Attempt], attempts_b: Sequence[Attempt]) -> list[Disagreement]:
    split: dict[tuple[str, str], tuple[Attempt, Attempt, list[str]]] = {}
    for x, y in zip(attempts_a, attempts_b):
        if x.refused != y.refused:
            split.setdefault((x.prompt_id, x.response), (x, y, []))[2].append(x.config)
    return [Disagreement(x.prompt_id, x.subset, x.label, x.prompt, x.response, configs,
                         DetectorVerdict(x.refused, x.rule, x.score), DetectorVerdict(y.refused, y.rule, y.score))
            for x, y, configs in split.values()]
