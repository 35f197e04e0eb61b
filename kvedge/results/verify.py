"""A verification's result: verify.json (schema kvedge.verify/2), the deployment audited on the eval
split beside f16, its noise run and the unmitigated config, judged by the one verdict function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..stats import Estimate, Rate
from . import Result, omit_none
from .audit import (
    DetectorDoc,
    Equivalence,
    FlipCounts,
    MarginStats,
    NoiseFloor,
    PromptsSummary,
    Verdict,
)

SCHEMA = "kvedge.verify/2"


@dataclass(frozen=True, kw_only=True)
class VerifyRow(Result):
    """One configuration measured on the eval split. Verdicts and flips are against the original model's
    f16 verdicts; KLD, PPL ratio and margins against the f16 run of the same file."""

    role: str  # reference | noise | unmitigated | deployment | prescription | deployment-f16 | prescription-f16
    label: str
    audit: str  # whose audit store holds it: original | deployment | prescription
    store_key: str
    type_k: str
    type_v: str
    rotation: bool | None
    smoothed: bool
    refusal_harmful: Rate
    over_refusal_benign: Rate
    kld: Estimate
    ppl_ratio: Estimate
    top1_agreement: Rate
    margin: MarginStats | None
    kv_bytes_per_token: int
    kv_mib_at_ctx: float
    harmful: FlipCounts | None = omit_none()
    benign: FlipCounts | None = omit_none()
    verdict: Verdict | None = omit_none()


@dataclass(frozen=True)
class Recovery(Result):
    """How much of the unmitigated config's damage a mitigation removes, on the same prompts: of the flips
    (both ways, both populations) and of each population's mean margin shift, with paired bootstrap
    intervals (undefined where the unmitigated config moved nothing)."""

    label: str
    verdict: Verdict
    flips: Estimate  # 1 - flips(mitigated) / flips(unmitigated)
    flips_mitigated: int
    flips_unmitigated: int
    n_prompts: int
    margin_harmful: Estimate | None  # 1 - shift(mitigated) / shift(unmitigated), harmful prompts
    margin_benign: Estimate | None
    kv_bytes_at_ctx: int
    unmitigated_kv_bytes_at_ctx: int
    memory_overhead: float  # bytes ratio - 1


@dataclass(frozen=True)
class Gate(Result):
    verdict: str  # the deployment's verdict on eval
    passed: bool  # only `equivalent` passes: kvedge verify exits 1 otherwise
    line: str


@dataclass(frozen=True, kw_only=True)
class VerifyReport(Result):
    """verify.json."""

    schema: str
    kvedge_version: str
    deployment_dir: str
    deploy_sha256: str
    deployment: dict[str, Any]  # label, type_k, type_v, rotation, smoothed, n_ctx
    split: str
    prompts_summary: PromptsSummary
    detector: DetectorDoc
    backend: dict[str, Any]
    noise_floor: NoiseFloor
    equivalence: Equivalence
    rows: list[VerifyRow]
    recovery: dict[str, Recovery]  # deployment, and PCR's prescription when it is another and measurable
    choice: dict[str, Any]  # chosen_on_calib, qualified_on_calib, stopped_at, prescription, prescription_was_chosen
    gate: Gate
    audits: dict[str, dict[str, Any]]  # per audit: store, runs [{label, key}]


SERVER_CHECK_SCHEMA = "kvedge.server-check/1"


@dataclass(frozen=True)
class ServerCheckRow(Result):
    """One thing a deployment needs, what the running server shows of it, and the finding."""

    item: str  # model, adapter, n_ctx, type_k, type_v, flash_attn, rotation, or a precondition id
    deployed: str  # what deploy.json says
    server: str  # what the server shows ("unknown" where it shows nothing)
    source: str  # how kvedge knows (observed: ..., unknown, ...)
    status: str  # ok | violated | unknown


@dataclass(frozen=True, kw_only=True)
class ServerCheck(Result):
    """`kvedge verify DIR --server URL`: a running server against deploy.json. `verified` only when every
    row is ok: an unknown is not a pass."""

    schema: str
    kvedge_version: str
    url: str
    kind: str
    deployment: str  # the deployment's label
    rows: list[ServerCheckRow]
    verified: bool
    line: str
