"""Export's measurements: candidates audited on the calib split through the audit pipeline, each judged
against the original model's f16 by the one verdict function. The original model's f16 reference and
noise run are computed once and shared by every candidate on it (one audit store); a model file export
writes (smoothed, or carrying the K transform) is audited in a store of its own and judged against the
original's f16 across the two reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..audit.compare import judge_against
from ..audit.noise import flips
from ..audit.verdict import equivalence
from ..llama.runtime import KVConfig, RuntimeOptions
from ..results.audit import AuditReport, FlipCounts
from ..results.deploy import Measured
from .candidates import Candidate
from .choose import NOISE, run_entry
from .measure import audit_configs


@dataclass
class CalibBench:
    """`model`/`adapter`: the original files; `modified`: per candidate kind that runs a file export wrote
    (smoothed, k-transform), that model and adapter (when built)."""

    model: Path
    adapter: Path | None
    rotation: bool
    limit: int | None
    max_tokens: int
    options: RuntimeOptions
    work: Path
    delta: float | None  # --delta; None: from the calib noise run
    progress: bool = True
    modified: dict[str, tuple[Path, Path | None]] = field(default_factory=dict)
    measured: dict[Candidate, Measured] = field(default_factory=dict)
    reports: dict[str, AuditReport] = field(default_factory=dict)

    @property
    def orig_dir(self) -> Path:
        return self.work / "calib"

    def store_dir(self, audit: str) -> Path:
        """The audit store of `audit`: original, smoothed or k-transform."""
        return self.orig_dir if audit == "original" else self.work / f"calib-{audit}"

    def _audit(self, model: Path, adapter: Path | None, kvs: list[KVConfig], noise: str | None,
               out: Path) -> AuditReport:
        return audit_configs(model, adapter, kvs, self.rotation, "calib", self.limit, self.max_tokens, self.options,
                             noise, out, self.progress)

    def original(self, kvs: list[KVConfig]) -> AuditReport:
        """The original model's calib audit over `kvs` (f16 and the noise run always): what the store lacks is
        generated, the rest read back."""
        self.reports["original"] = self._audit(self.model, self.adapter, kvs, NOISE, self.orig_dir)
        return self.reports["original"]

    @property
    def equivalence_delta(self) -> float:
        eq = self.reports["original"].equivalence
        return self.delta if self.delta is not None else eq.delta

    def measure(self, c: Candidate, unmitigated: KVConfig) -> Measured:
        if c in self.measured:
            return self.measured[c]
        orig = self.original([unmitigated] if c.modified else [c.kv])
        if c.modified:
            model, adapter = self.modified[c.kind]
            rep = self._audit(model, adapter, [c.kv], None, self.store_dir(c.kind))
            self.reports[c.kind] = rep
        else:
            rep = orig
        entry = run_entry(rep, c.kv, c.rotation)
        verdict = judge_against(orig, "f16", rep, entry.label, self.equivalence_delta, c.label)
        ref, run = orig.verdicts("f16"), rep.verdicts(entry.label)
        groups = {h: [p.id for p in orig.prompts if p.harmful is h] for h in (True, False)}
        fh, fb = (flips([ref[i] for i in groups[h]], [run[i] for i in groups[h]]) for h in (True, False))
        self.measured[c] = Measured(verdict, FlipCounts(fh.n, fh.lost, fh.gained), FlipCounts(fb.n, fb.lost, fb.gained),
                                    c.kind if c.modified else "original", entry.key, entry.label, entry.kld,
                                    entry.ppl_ratio)
        return self.measured[c]

    def final_reports(self) -> dict[str, AuditReport]:
        """The original model's audit over every measured config (from the store: no new generation)."""
        self.original([c.kv for c in self.measured if not c.modified])
        return self.reports


def calib_equivalence(bench: CalibBench):
    """The equivalence margin the export judged by (for deploy.json)."""
    eq = bench.reports["original"].equivalence
    return equivalence(bench.delta, []) if bench.delta is not None else eq
