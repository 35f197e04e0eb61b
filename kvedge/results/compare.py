"""A comparison's result: compare.json (schema kvedge.compare/1), two audits of one model verdict by
verdict, or two detectors on one audit's stored answers."""

from __future__ import annotations

from dataclasses import dataclass

from ..stats import Rate
from . import Result, omit_none
from .audit import Judgement, Verdict

SCHEMA = "kvedge.compare/1"


@dataclass(frozen=True)
class Side(Result):
    path: str
    backend: str
    system_info: str | None = omit_none()  # audits mode
    detector: str = ""
    servers: dict[str, str] | None = omit_none()  # server audits: url -> the run it answered


@dataclass(frozen=True)
class AgreementRow(Result):
    config: str
    prompts: str  # harmful | benign | all
    n: int
    agreement: Rate
    refusal_a: Rate
    refusal_b: Rate
    refused_only_in_a: int
    refused_only_in_b: int
    mcnemar_p: float
    discordant: list[str]
    vs_noise_of_a: Judgement | None = omit_none()


@dataclass(frozen=True)
class DetectorVerdict(Result):
    """One detector's verdict on one answer."""

    refused: bool
    rule: str
    score: float | None


@dataclass(frozen=True)
class Disagreement(Result):
    prompt_id: str
    subset: str
    label: str
    prompt: str
    response: str
    configs: list[str]
    a: DetectorVerdict
    b: DetectorVerdict


@dataclass(frozen=True)
class ConfigVerdict(Result):
    """B's run of one configuration judged against A's (kvedge.audit.verdict), A's noise run the yardstick."""

    config: str
    verdict: Verdict


@dataclass(frozen=True)
class CompareResult(Result):
    schema: str
    mode: str  # audits | detectors
    a: Side
    b: Side
    model_sha256: str
    common_prompts: int
    rows: list[AgreementRow]
    verdicts: list[ConfigVerdict] | None = omit_none()  # audits mode: is B equivalent to A, per configuration
    disagreements: list[Disagreement] | None = omit_none()
