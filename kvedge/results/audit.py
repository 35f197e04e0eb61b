"""The audit's result: report.json (schema kvedge.audit/1, docs/reference/report-schema.md) and the rows
of attempts.jsonl, as typed values. `kvedge.audit.summary` builds them from the store; the renderers,
rejudge, compare, export and verify read them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..stats import Estimate, Rate
from . import Result, omit_none

SCHEMA = "kvedge.audit/1"


@dataclass(frozen=True)
class ModelDoc(Result):
    path: str
    name: str
    sha256: str
    architecture: str
    file_type: str
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    size_bytes: int


@dataclass(frozen=True)
class AdapterDoc(Result):
    path: str
    sha256: str | None


@dataclass(frozen=True)
class Settings(Result):
    max_tokens: int
    greedy: bool
    system: str | None
    rotation: str  # on | off | both, as asked
    chat_template: str  # gguf | fallback-chatml
    chat_template_sha256: str
    runtime: dict[str, Any]  # RuntimeOptions.key(): every option that can change arithmetic
    batch: int
    render_time: str | None
    stop_when_final: str | None  # whose verdict ended answers early (the store key's detector)
    store: str


@dataclass(frozen=True)
class PromptsSummary(Result):
    n: int
    harmful: int
    benign: int
    by_subset: dict[str, int]
    splits: list[str]
    skipped_too_long: list[dict[str, Any]]  # {id, n_prompt_tokens}


@dataclass(frozen=True)
class DetectorDoc(Result):
    id: str
    name: str
    version: str


@dataclass(frozen=True)
class Judgement(Result):
    """A run's flips in one group against the noise run's flips on the same prompts (kvedge.audit.noise)."""

    verdict: str  # "loss beyond noise" | "gain beyond noise" | "loss and gain beyond noise" | "within noise"
    lost: int
    gained: int
    noise_lost: int
    noise_gained: int
    p_loss: float
    p_gain: float


@dataclass(frozen=True)
class FlipCounts(Result):
    n: int
    lost: int
    gained: int
    mcnemar_p: float | None = omit_none()


@dataclass(frozen=True)
class HarmfulFlips(Result):
    n: int
    lost: int
    gained: int
    mcnemar_p: float
    flip_rate: Rate  # refused at f16, answered here
    reverse_flip_rate: Rate  # answered at f16, refused here


@dataclass(frozen=True)
class VsReference(Result):
    harmful: HarmfulFlips
    benign: FlipCounts
    retention: Estimate
    retention_stable: Estimate
    refusal_change: Estimate
    over_refusal_change: Estimate
    flipped: list[str]


@dataclass(frozen=True)
class VsNoise(Result):
    verdict: str
    harmful: Judgement
    benign: Judgement


@dataclass(frozen=True)
class MarginStats(Result):
    """The first-token refusal margin (kvedge.detectors.openings) of one run: its mean per population and,
    beside the reference, the mean paired shift against it (positive: toward refusal), each with a 95%
    paired bootstrap interval over prompts."""

    harmful: Estimate
    benign: Estimate
    missing: int  # prompts whose margin could not be read (not in the figures)
    shift_harmful: Estimate | None = omit_none()
    shift_benign: Estimate | None = omit_none()
    shift_by_subset: dict[str, Estimate] | None = omit_none()


@dataclass(frozen=True)
class PopulationCall(Result):
    """How one population (harmful or benign prompts) moved against the reference, by flips judged against
    the noise run and by the margin's shift judged against +-delta."""

    population: str  # harmful | benign
    direction: str  # toward refusal | away from refusal | none (equivalent) | unclear
    flips: str  # the flips' judgement against the noise run (kvedge.audit.noise)
    refusals: str  # "10/20 vs 4/20": refused here vs at the reference
    shift: Estimate | None  # the margin's mean paired shift; None when no margin could be read
    prompts_to_decide: int | None  # roughly how many prompts would decide an unclear population


@dataclass(frozen=True)
class Verdict(Result):
    """The one verdict of a configuration against its reference (kvedge.audit.verdict)."""

    verdict: str  # equivalent | over-refuses | loses refusals | loses refusals and over-refuses | inconclusive
    line: str  # the verdict in words, with the evidence that decided it
    delta: float  # the equivalence margin on the mean margin shift, nats
    harmful: PopulationCall
    benign: PopulationCall
    more_prompts: int | None  # inconclusive: roughly how many more prompts a population would need


@dataclass(frozen=True)
class Memory(Result):
    bytes_per_token: int
    ctx: int
    mib_at_ctx: float
    vs_f16: float | None
    source: str


@dataclass(frozen=True)
class Speed(Result):
    decode_tokens: int
    decode_tokens_per_s: float | None
    prompt_tokens: int
    prompt_tokens_per_s: float | None
    generations: int
    truncated_by_ctx: int
    clock: str | None = omit_none()  # server runs: whose clock timed them


@dataclass(frozen=True, kw_only=True)
class RunResult(Result):
    """One llama.cpp configuration of the audit (or one server's settings)."""

    label: str
    key: str
    type_k: str
    type_v: str
    layers_k: list[list[Any]] | None = omit_none()  # per-layer maps: [[layer, type], ...] that differ
    layers_v: list[list[Any]] | None = omit_none()
    rotation: bool | None
    variant: str | None
    reference: bool
    noise_run: bool
    flash_attn: bool
    refusal_harmful: Rate
    refusal_by_subset: dict[str, Rate]
    over_refusal_benign: Rate
    over_refusal_by_subset: dict[str, Rate]
    memory: Memory
    speed: Speed
    kld: Estimate
    ppl_ratio: Estimate
    ppl: float | None
    top1_agreement: Rate
    max_abs_logprob_diff: float | None
    vs_reference: VsReference | None = omit_none()
    vs_noise: VsNoise | None = omit_none()
    margin: MarginStats | None = omit_none()  # None: no margin could be read (a server without logprobs)
    verdict: Verdict | None = omit_none()  # quantized runs beside a noise run
    # server audits (kvedge.server.annotate): where the run ran, who answered and how
    where: str | None = omit_none()  # "server" | "in-process"
    served_by: dict[str, int] | None = omit_none()
    server_settings: dict[str, Any] | None = omit_none()
    request: str | None = omit_none()
    prompt_tokens_match: Rate | None = omit_none()
    retried: int | None = omit_none()
    kld_note: str | None = omit_none()
    margin_note: str | None = omit_none()  # where the margins came from (a server's top log-probabilities), or why none
    # the rotation llama.cpp says it applied per cache side ({"k", "v", "source"}; None: not recorded, or a server)
    applied_rotation: dict[str, Any] | None = omit_none()
    rotation_note: str | None = omit_none()  # llama.cpp applied another rotation than the one asked for

    @property
    def quantized_run(self) -> bool:
        """Neither the reference nor the noise run: a configuration the audit judges."""
        return not self.reference and not self.noise_run


@dataclass(frozen=True)
class NoiseFloor(Result):
    label: str
    how: str
    flip_rate: Rate
    harmful: FlipCounts
    benign: FlipCounts
    arithmetic_changed: bool
    max_abs_logprob_diff: float | None
    kld: Estimate
    unstable_prompts: list[str]


@dataclass(frozen=True)
class Gate(Result):
    threshold: float
    failing: list[str]
    undefined: list[str]
    passed: bool


@dataclass(frozen=True, kw_only=True)
class PromptResult(Result):
    id: str
    subset: str
    harmful: bool
    text_sha256: str
    benchmark: str
    split: str
    category: str = ""
    text: str | None = None  # None only in reports from kvedge versions that did not store it
    unstable: bool
    refused: dict[str, bool]  # run label -> verdict
    rule: dict[str, str]  # run label -> the detector's rule that decided
    margin: dict[str, float | None] | None = omit_none()  # run label -> first-token refusal margin
    answers: dict[str, str] | None = omit_none()  # every run's answer, where the verdicts disagree


@dataclass(frozen=True)
class Equivalence(Result):
    """How configurations are judged (kvedge.audit.verdict): the margin `delta` and where it came from."""

    delta: float
    source: str  # "--delta", or how the default was derived from the noise run
    noise_shift_bound: float | None  # the largest |bound| of the noise run's margin shift intervals


@dataclass(frozen=True)
class AuditReport(Result):
    """report.json."""

    schema: str
    kvedge_version: str
    model: ModelDoc
    adapter: AdapterDoc | None
    backend: dict[str, Any]  # kind, llama_cpp_python, gpu_offload_supported, system_info, library
    settings: Settings
    prompts_summary: PromptsSummary
    detector: DetectorDoc
    noise_floor: NoiseFloor | None
    equivalence: Equivalence | None
    runs: list[RunResult]
    gate: Gate | None
    prompts: list[PromptResult]
    # server audits: a note when the noise floor spans a server and this process, and every server with each
    # setting and how kvedge knows it (docs/server.md)
    noise_floor_note: str | None = omit_none()
    servers: list[dict[str, Any]] | None = omit_none()

    @property
    def reference(self) -> RunResult:
        return next(r for r in self.runs if r.reference)

    @property
    def noise_run(self) -> RunResult | None:
        return next((r for r in self.runs if r.noise_run), None)

    @property
    def quantized(self) -> list[RunResult]:
        return [r for r in self.runs if r.quantized_run]

    def run(self, label: str) -> RunResult:
        return next(r for r in self.runs if r.label == label)

    def verdicts(self, label: str) -> dict[str, bool]:
        """Prompt id -> refused, for one run."""
        return {p.id: p.refused[label] for p in self.prompts}


@dataclass(frozen=True)
class Attempt(Result):
    """One line of attempts.jsonl: one prompt x one configuration."""

    prompt_id: str
    prompt_sha256: str
    benchmark: str
    subset: str
    label: str  # harmful | benign
    split: str
    prompt: str
    config: str
    run_key: str
    response: str
    stop_reason: str
    n_tokens: int
    refused: bool
    rule: str
    score: float | None
    flipped_vs_reference: bool | None
    unstable: bool
    detector: DetectorDoc
    # the first-token refusal margin of this answer (nats, + toward refusal); None where none was read
    margin: float | None = None
