"""What an audit runs: the spec (model, prompts, KV configs, rotation, decoding, detector), its runs (one
llama.cpp configuration each: the f16 reference, the noise run, each quantized config at each rotation),
and what was run (each run's store key). The session (`session.py`) executes a spec; everything after
it reads the outcome."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .. import defaults
from ..datasets import Prompt
from ..detectors import Detector, default_detector
from ..gguf.model import ModelInfo
from ..gguf.template import ChatTemplate
from ..llama.runtime import (
    DEFAULT_SEQ_CELLS,
    F16,
    KVConfig,
    RuntimeOptions,
    parse_rotation,
)
from ..registry import NOISE_VARIANTS

MAX_BATCH = 64
CACHE_BUDGET = 256 * 2**20  # bytes of f16 KV cache a default batch may hold


def auto_batch(model: ModelInfo) -> int:
    """Prompts per wave: as many as fit `CACHE_BUDGET` of f16 cache at `DEFAULT_SEQ_CELLS` each, at most
    16 (llama.cpp's decode throughput on 2 cores barely grows past 16 sequences: 321 tok/s at 16, 337 at
    32), at least 1. A 135M model gets 16; a 7B model with an f16 KV of 0.5 MB a token gets 2."""
    per_seq = F16.bytes_per_token(model) * DEFAULT_SEQ_CELLS
    return max(1, min(16, CACHE_BUDGET // max(1, per_seq)))


_ROTATION_LABEL = {True: "on", False: "off", None: "?"}


@dataclass(frozen=True)
class RunSpec:
    """One llama.cpp configuration of an audit."""

    kv: KVConfig
    rotation: bool | None  # None: a server that neither reports nor was told whether it rotates
    variant: str = ""  # "" for a plain run, "noise:<how>" for the noise-floor run
    # the settings of the server(s) that answer this run (canonical JSON, kvedge.server.plan); "" in-process
    server: str = ""

    @property
    def is_reference(self) -> bool:
        return self.kv == F16 and not self.variant

    @property
    def is_noise(self) -> bool:
        return self.variant.startswith("noise:")

    @property
    def label(self) -> str:
        if self.is_noise:
            return f"{self.kv.name} noise ({self.variant[6:]})"
        if not self.kv.quantized:
            return self.kv.name
        return f"{self.kv.name} rot={_ROTATION_LABEL[self.rotation]}"

    def options(self, base: RuntimeOptions) -> RuntimeOptions:
        if self.is_noise:
            return NOISE_VARIANTS.get(self.variant[6:])(base)
        return base


@dataclass(frozen=True)
class AuditSpec:
    model: ModelInfo
    prompts: tuple[Prompt, ...]
    kv: tuple[KVConfig, ...]
    rotation: str = "on"  # on | off | both
    lora_path: Path | None = None
    max_tokens: int = 64
    options: RuntimeOptions = RuntimeOptions()
    system: str | None = None
    out_dir: Path = defaults.RUNS_DIR
    noise: str | None = defaults.NOISE
    batch: int = 1  # prompts decoded together (a wave); 1: one at a time
    # the runs, when they are not the product of `kv` and `rotation` (a server audit's come from its servers)
    explicit_runs: tuple[RunSpec, ...] | None = None
    # whose verdicts the report computes, and whose `final` ends a generation early
    detector: Detector = field(default_factory=default_detector)

    @property
    def runtime_options(self) -> RuntimeOptions:
        return dataclasses.replace(self.options, n_seq=self.batch)

    def runs(self) -> list[RunSpec]:
        if self.explicit_runs is not None:
            return list(self.explicit_runs)
        rotations = parse_rotation(self.rotation)
        runs = [RunSpec(F16, True)]
        if self.noise:
            runs.append(RunSpec(F16, True, f"noise:{self.noise}"))
        for kv in self.kv:
            if not kv.quantized:
                if kv != F16:
                    runs.append(RunSpec(kv, True))
                continue
            runs.extend(RunSpec(kv, r) for r in rotations)
        return list(dict.fromkeys(runs))

    @property
    def store_path(self) -> Path:
        return self.out_dir / "kvedge.sqlite"


@dataclass
class AuditRun:
    """What the audit did for one RunSpec: its store key and how much it generated this time."""

    spec: RunSpec
    key: str
    key_spec: dict
    generated: int = 0
    scored: int = 0


@dataclass
class AuditOutcome:
    spec: AuditSpec
    template: ChatTemplate
    backend: dict
    adapter_sha256: str | None
    runs: list[AuditRun] = field(default_factory=list)
    render_time: str | None = None  # the frozen time a dated template rendered (None: not dated)

    @property
    def reference(self) -> AuditRun:
        return next(r for r in self.runs if r.spec.is_reference)

    @property
    def generated(self) -> int:
        return sum(r.generated for r in self.runs)
