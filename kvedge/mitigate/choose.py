"""What export and verify share about the audits they run: the f16 noise run every judgement is made
against, and finding a configuration's run in an audit report. The judgement itself is
kvedge.audit.verdict's, the one verdict function."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import defaults
from ..results.audit import AuditReport, RunResult

if TYPE_CHECKING:
    from ..llama.runtime import KVConfig

NOISE = defaults.NOISE  # the f16 noise run every judgement here is made against


def run_entry(report: AuditReport, kv: "KVConfig", rotation: bool) -> RunResult:
    """The run of an audit report at these cache types and rotation (the reference for f16)."""
    from ..llama.runtime import F16

    for r in report.runs:
        if r.type_k == kv.type_k and r.type_v == kv.type_v and (r.layers_k or []) == [list(x) for x in kv.layers_k] \
                and (r.layers_v or []) == [list(x) for x in kv.layers_v] and not r.noise_run \
                and (r.reference if kv == F16 else r.rotation == rotation):
            return r
    raise KeyError(kv.name)
