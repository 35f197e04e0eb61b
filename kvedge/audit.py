"""The audit: prompts x llama.cpp configurations -> generations and scores in the store.

This module only runs things and stores what they produced; `summary.py` turns the store into
statistics. Splitting the two is what makes a rerun free: the second run finds everything stored and
goes straight to the summary, which is a pure function of the stored rows.

Runs, in order: the f16 reference; the f16 noise run (same cache precision, flash attention off, so
the attention arithmetic changes and nothing else: see `noise.py`); each quantized KV config at
each requested rotation. The reference also supplies the benign continuations (its own greedy answers)
that every run is teacher-forced on for the KLD and perplexity figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .datasets import Prompt
from .model import ModelInfo, sha256_file
from .registry import NOISE_VARIANTS
from .runtime import F16, LLAMA_CPP, KVConfig, Runtime, RuntimeFactory, RuntimeOptions, parse_rotation
from .scoring import TopK, kld_topk, top_k
from .store import GenerationRow, ScoreRow, Store
from .template import ChatTemplate, chat_template_for


@dataclass(frozen=True)
class RunSpec:
    """One llama.cpp configuration of an audit."""

    kv: KVConfig
    rotation: bool
    variant: str = ""  # "" for a plain run, "noise:<how>" for the noise-floor run

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
        return f"{self.kv.name} rot={'on' if self.rotation else 'off'}"

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
    out_dir: Path = Path("kvedge-runs")
    noise: str | None = "flash-attn-off"

    def runs(self) -> list[RunSpec]:
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

    @property
    def reference(self) -> AuditRun:
        return next(r for r in self.runs if r.spec.is_reference)

    @property
    def generated(self) -> int:
        return sum(r.generated for r in self.runs)


def _run_key_spec(spec: AuditSpec, run: RunSpec, template: ChatTemplate, adapter_sha: str | None, backend: dict) -> dict:
    return {
        "kvedge_version": __version__,
        "model_sha256": spec.model.sha256,
        "adapter_sha256": adapter_sha,
        **run.kv.key(),
        # rotation only acts on a quantized cache; f16 runs share one key whatever was asked
        "rotation": run.rotation if run.kv.quantized else None,
        "variant": run.variant,
        "runtime": run.options(spec.options).key(),
        "backend": backend["kind"],
        # the native build is named in the key; the stock wheel stays implied, so stock keys never change
        **({"library": lib["key"]} if (lib := backend.get("library")) and lib["kind"] == "native" else {}),
        "decoding": {"greedy": True, "max_tokens": spec.max_tokens},
        "template_sha256": template.sha256,
        "system": spec.system,
    }


class _Session:
    """Runs one audit; keeps the reference distributions in memory between runs."""

    def __init__(self, spec: AuditSpec, store: Store, progress: bool, runtimes: RuntimeFactory):
        self.spec, self.store, self.progress, self.runtimes = spec, store, progress, runtimes
        self.refs: dict[str, list[TopK]] = {}
        self.template = chat_template_for(spec.model)
        self.backend = runtimes.backend(spec.options.n_gpu_layers)
        self.adapter_sha = sha256_file(spec.lora_path) if spec.lora_path else None
        self.benign = [p for p in spec.prompts if not p.harmful]

    def _open(self, run: RunSpec) -> Runtime:
        return self.runtimes.open(self.spec.model, run.kv, run.rotation, run.options(self.spec.options),
                                  self.spec.lora_path)

    def _bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="prompt", disable=not self.progress, leave=True, dynamic_ncols=True)

    def _tokens(self, rt: Runtime, prompt: Prompt) -> list[int]:
        return rt.tokenize(self.template.render(prompt.text, self.spec.system))

    def execute(self, run: RunSpec, ref_key: str | None) -> AuditRun:
        key_spec = _run_key_spec(self.spec, run, self.template, self.adapter_sha, self.backend)
        key = self.store.register_run({**key_spec, "label": run.label})
        result = AuditRun(run, key, key_spec)
        done = self.store.generations(key)
        todo = [p for p in self.spec.prompts if (p.id, p.text_sha256) not in done]
        ref_key = ref_key or key
        scored = self.store.scores(key, ref_key)
        ref_gens = self.store.generations(ref_key) if not run.is_reference else None
        to_score = [p for p in self.benign if (p.id, p.text_sha256) not in scored]
        if not todo and not to_score:
            return result
        rt = self._open(run)
        try:
            with self._bar(len(todo), run.label) as bar:
                for p in todo:
                    g = rt.generate(self._tokens(rt, p), self.spec.max_tokens)
                    self.store.put_generation(
                        GenerationRow(key, p.id, p.text_sha256, g.text, g.tokens, g.n_prompt_tokens, g.stop_reason,
                                      g.prompt_seconds, g.decode_seconds)
                    )
                    result.generated += 1
                    bar.update(1)
            if run.is_reference:
                ref_gens = self.store.generations(key)
                self._build_refs(rt, ref_gens)
            elif to_score and any(p.id not in self.refs for p in to_score):
                rt.close()
                with self._open(RunSpec(F16, True)) as ref_rt:
                    self._build_refs(ref_rt, ref_gens)
                rt = self._open(run)
            for p in to_score:
                self.store.put_score(self._score(rt, key, ref_key, p, ref_gens[(p.id, p.text_sha256)].tokens))
                result.scored += 1
        finally:
            rt.close()
        return result

    def _build_refs(self, rt: Runtime, ref_gens: dict) -> None:
        for p in self.benign:
            if p.id in self.refs:
                continue
            cont = ref_gens[(p.id, p.text_sha256)].tokens
            self.refs[p.id] = [top_k(lp) for lp in rt.score(self._tokens(rt, p), cont)]

    def _score(self, rt: Runtime, key: str, ref_key: str, p: Prompt, cont: list[int]) -> ScoreRow:
        refs = self.refs[p.id]
        nll = kld = 0.0
        agree = 0
        max_diff = 0.0
        for i, logq in enumerate(rt.score(self._tokens(rt, p), cont)):
            ref = refs[i]
            nll -= float(logq[cont[i]])
            kld += kld_topk(ref, logq)
            agree += int(int(np.argmax(logq)) == int(ref.ids[0]))
            max_diff = max(max_diff, float(np.abs(logq[ref.ids[:16]] - ref.logp[:16]).max()))
        return ScoreRow(key, ref_key, p.id, p.text_sha256, len(cont), nll, kld, agree, max_diff)


def run_audit(spec: AuditSpec, progress: bool = True, runtimes: RuntimeFactory = LLAMA_CPP) -> AuditOutcome:
    """Generate and score whatever the store lacks for `spec`; return the keys of every run."""
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    with Store(spec.store_path) as store:
        session = _Session(spec, store, progress, runtimes)
        outcome = AuditOutcome(spec, session.template, session.backend, session.adapter_sha)
        ref_key: str | None = None
        for run in spec.runs():
            r = session.execute(run, ref_key)
            if run.is_reference:
                ref_key = r.key
            outcome.runs.append(r)
    return outcome

