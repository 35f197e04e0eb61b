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

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from .. import __version__
from ..datasets import Prompt
from ..detectors.openings import FirstMargin, opening_tokens
from ..gguf.model import sha256_file
from ..gguf.template import ChatTemplate, chat_template_for
from ..llama.decode import GenJob
from ..llama.runtime import F16, LLAMA_CPP, Runtime, RuntimeFactory
from ..llama.scoring import TopK, kld_topk, top_k
from .spec import AuditOutcome, AuditRun, AuditSpec, RunSpec
from .store import GenerationRow, ScoreRow, Store


def _run_key_spec(spec: AuditSpec, run: RunSpec, template: ChatTemplate, adapter_sha: str | None, backend: dict) -> dict:
    key = {
        "kvedge_version": __version__,
        "model_sha256": spec.model.sha256,
        "adapter_sha256": adapter_sha,
        **run.kv.key(),
        # rotation only acts on a quantized cache; f16 runs share one key whatever was asked
        "rotation": run.rotation if run.kv.quantized else None,
        "variant": run.variant,
        "runtime": run.options(spec.runtime_options).key(),
        "backend": backend["kind"],
        # the native build is named in the key; the stock wheel stays implied, so stock keys never change
        **({"library": lib["key"]} if (lib := backend.get("library")) and lib["kind"] == "native" else {}),
        # an answer ends early once this detector's verdict on it is final (the stored text says so)
        "decoding": {"greedy": True, "max_tokens": spec.max_tokens, "stop_when_final": spec.detector.id},
        "template_sha256": template.sha256,
        "system": spec.system,
        # a dated template (strftime_now) renders what the frozen time says; undated keys stay as they were
        **({"render_time": template.now} if template.uses_clock else {}),
    }
    if run.server:
        # a server's arithmetic is what it reports or was told, not this machine's runtime; it answers
        # with the full max_tokens (it cannot consult the detector mid-answer)
        key.update(runtime=None, backend=None, server=json.loads(run.server),
                   decoding={"greedy": True, "max_tokens": spec.max_tokens, "stop_when_final": None})
    return key


class _Session:
    """Runs one audit; keeps the reference distributions in memory between runs.

    Prompts run in waves of `spec.batch` in the audit's own prompt order, each wave decoded together from
    a fresh cache that holds only the chat template's shared prefix. Not refilling a wave's finished slots
    from the queue costs a little throughput (`bench/audit_throughput.py` measures both), and buys
    reproducibility: which prompts share a decode call changes llama.cpp's arithmetic (its CPU matrix
    kernels group rows), so each prompt's result must depend on its wave alone, never on what ran before.
    Then a killed audit resumes (its unfinished waves rerun whole, storing what is missing) to the same
    report an uninterrupted one writes."""

    def __init__(self, spec: AuditSpec, store: Store, progress: bool, runtimes: RuntimeFactory):
        self.spec, self.store, self.progress, self.runtimes = spec, store, progress, runtimes
        self.refs: dict[str, list[TopK]] = {}
        # what the model sees, rendered once before llama.cpp loads anything (a hostile template fails
        # here), at a time frozen per audit directory, so a resume renders exactly what was rendered
        self.template = chat_template_for(spec.model, store.setting("render_time", datetime.now().isoformat(
            timespec="seconds")))
        self.rendered = {p.id: self.template.render(p.text, spec.system) for p in spec.prompts}
        self.backend = runtimes.backend(spec.options.n_gpu_layers)
        self.adapter_sha = sha256_file(spec.lora_path) if spec.lora_path else None
        self.benign = [p for p in spec.prompts if not p.harmful]
        self._prefix: list[int] | None = None

    def _open(self, run: RunSpec) -> Runtime:
        return self.runtimes.open(self.spec.model, run.kv, run.rotation, run.options(self.spec.runtime_options),
                                  self.spec.lora_path)

    def _bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="prompt", disable=not self.progress, leave=True, dynamic_ncols=True)

    def _tokens(self, rt: Runtime, prompt: Prompt) -> list[int]:
        return rt.tokenize(self.rendered[prompt.id])

    def _stored(self, key: str) -> set[tuple[str, str]]:
        """The prompts whose answers `key` already holds, rendered as now (rows from before kvedge
        recorded the rendering are trusted: their run key holds the template)."""
        return {k for k, g in self.store.generations(key).items()
                if g.rendered_sha256 in (None, _sha256(self.rendered.get(k[0], "")))}

    def _template_prefix(self, rt: Runtime) -> list[int]:
        """The tokens every rendering of the template starts with (its system prompt), whatever the user
        says: a property of the template, so a prompt's wave computes it the same way in every run."""
        if self._prefix is None:
            a, b = (rt.tokenize(self.template.render(m, self.spec.system)) for m in ("A", "Z"))
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            self._prefix = a[:max(0, n - 1)]  # one token short: the last may merge with the message
        return self._prefix

    def _waves(self, prompts: list[Prompt]) -> list[list[Prompt]]:
        n = max(1, self.spec.batch)
        return [prompts[i:i + n] for i in range(0, len(prompts), n)]

    def _start_wave(self, rt: Runtime) -> None:
        rt.reset()
        rt.share_prefix(self._template_prefix(rt))

    def _scorable(self, run: RunSpec) -> bool:
        """Teacher-forced scoring (KLD, perplexity) needs every position's distribution from the run and
        the reference; a server gives neither, so runs beside a server reference are not scored."""
        reference = next(r for r in self.spec.runs() if r.is_reference)
        return not run.server and not reference.server

    def _first(self, rt: Runtime):
        """The first-token refusal margin, read at every answer's first position (None: this vocabulary
        lacks a refusal or a compliance opening, or the runtime cannot say, so no margin is measured). A
        server runtime reads the same token sets from it for the servers' top log-probabilities."""
        tokenize = getattr(rt, "tokenize_piece", None)
        if tokenize is None:
            return None
        tokens = opening_tokens(tokenize, rt.detokenize)
        return FirstMargin(tokens) if tokens.usable else None

    def _final(self, rt: Runtime, run: RunSpec, p: Prompt):
        """When generation may stop early: once the detector's verdict is final, except where the whole
        answer is needed (the reference's benign answers are the continuations KLD and perplexity are
        scored on)."""
        if run.is_reference and not p.harmful:
            return None
        det = self.spec.detector
        return lambda toks: det.final(rt.detokenize(toks))

    def execute(self, run: RunSpec, ref_key: str | None) -> AuditRun:
        key_spec = _run_key_spec(self.spec, run, self.template, self.adapter_sha, self.backend)
        key = self.store.register_run({**key_spec, "label": run.label})
        result = AuditRun(run, key, key_spec)
        done = self._stored(key)
        waves = [w for w in self._waves(list(self.spec.prompts)) if any((p.id, p.text_sha256) not in done for p in w)]
        ref_key = ref_key or key
        scored = self.store.scores(key, ref_key)
        to_score = ({(p.id, p.text_sha256) for p in self.benign} - set(scored)) if self._scorable(run) else set()
        if not waves and not to_score:
            self._record_applied(run, key)
            return result
        rt = self._open(run)
        self._note_applied(key, rt)
        try:
            todo = sum((p.id, p.text_sha256) not in done for w in waves for p in w)
            first = self._first(rt) if waves else None
            with self._bar(todo, run.label) as bar:
                for wave in waves:
                    self._start_wave(rt)
                    jobs = [GenJob(self._tokens(rt, p), self.spec.max_tokens, self._final(rt, run, p), first=first)
                            for p in wave]
                    for i, g in rt.generate_many(jobs):
                        p = wave[i]
                        if (p.id, p.text_sha256) in done:
                            continue  # stored by an interrupted run of this wave: the same answer
                        stop = f"final:{self.spec.detector.id}" if g.stop_reason == "final" else g.stop_reason
                        self.store.put_generation(
                            GenerationRow(key, p.id, p.text_sha256, g.text, g.tokens, g.n_prompt_tokens, stop,
                                          g.prompt_seconds, g.decode_seconds, _sha256(self.rendered[p.id]),
                                          g.margin), g.origin)
                        result.generated += 1
                        bar.update(1)
            ref_gens = self.store.generations(ref_key)
            if not run.is_reference and to_score and any(p.id not in self.refs for p in self.benign):
                rt.close()
                with self._open(RunSpec(F16, True)) as ref_rt:
                    self._score(ref_rt, None, ref_key, ref_gens, set())
                rt = self._open(run)
            if self._scorable(run):  # a server gives no per-position distributions to teacher-force
                result.scored = self._score(rt, key, ref_key, ref_gens, to_score)
        finally:
            rt.close()
        return result

    def _note_applied(self, key: str, rt: Runtime) -> None:
        applied = getattr(rt, "applied", None)  # a server or a test's fake cannot say
        if applied is not None:
            self.store.put_applied(key, applied.to_dict())

    def _record_applied(self, run: RunSpec, key: str) -> None:
        """A run stored whole by a kvedge that did not record the applied rotation: make its context once
        to read it (a model load; nothing is generated)."""
        if run.server or self.runtimes is not LLAMA_CPP or self.store.applied(key) is not None:
            return
        with self._open(run) as rt:
            self._note_applied(key, rt)

    def _score(self, rt: Runtime, key: str | None, ref_key: str, ref_gens: dict, todo: set) -> int:
        """Teacher-force the reference's answers to the benign prompts through `rt`, in the same fixed waves
        as generation (so a prompt's figures never depend on which others were still to do). On the
        reference run (or with `key` None) this builds the reference distributions; the rows of `todo`
        (prompt id, text hash) are stored with each prompt's KLD, NLL and top-1 agreement against them.
        Returns how many score rows were stored."""
        building = key is None or key == ref_key
        stored = 0
        for wave in self._waves(self.benign):
            if not (building and any(p.id not in self.refs for p in wave)
                    or any((p.id, p.text_sha256) in todo for p in wave)):
                continue
            self._start_wave(rt)
            conts = [ref_gens[(p.id, p.text_sha256)].tokens for p in wave]
            jobs = [(self._tokens(rt, p), c) for p, c in zip(wave, conts)]
            acc = [_ScoreAcc() for _ in wave]
            if building:
                for p in wave:
                    self.refs[p.id] = [None] * len(ref_gens[(p.id, p.text_sha256)].tokens)  # type: ignore[list-item]

            def on_row(j: int, k: int, logq: np.ndarray) -> None:
                pid = wave[j].id
                if building:
                    self.refs[pid][k] = top_k(logq)
                acc[j].add(self.refs[pid][k], logq, conts[j][k])

            for j in rt.score_many(jobs, on_row):
                p = wave[j]
                if key is None or (p.id, p.text_sha256) not in todo:
                    continue
                self.store.put_score(acc[j].row(key, ref_key, p))
                stored += 1
        return stored


@dataclass
class _ScoreAcc:
    """Sums over one prompt's scored positions against the reference's top-k distributions."""

    n: int = 0
    nll: float = 0.0
    kld: float = 0.0
    agree: int = 0
    max_diff: float = 0.0

    def add(self, ref: TopK, logq: np.ndarray, token: int) -> None:
        self.n += 1
        self.nll -= float(logq[token])
        self.kld += kld_topk(ref, logq)
        self.agree += int(int(np.argmax(logq)) == int(ref.ids[0]))
        self.max_diff = max(self.max_diff, float(np.abs(logq[ref.ids[:16]] - ref.logp[:16]).max()))

    def row(self, key: str, ref_key: str, p: Prompt) -> ScoreRow:
        return ScoreRow(key, ref_key, p.id, p.text_sha256, self.n, self.nll, self.kld, self.agree, self.max_diff)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_audit(spec: AuditSpec, progress: bool = True, runtimes: RuntimeFactory = LLAMA_CPP) -> AuditOutcome:
    """Generate and score whatever the store lacks for `spec`; return the keys of every run."""
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    with Store(spec.store_path) as store:
        session = _Session(spec, store, progress, runtimes)
        try:
            t = session.template
            outcome = AuditOutcome(spec, t, session.backend, session.adapter_sha,
                                   render_time=t.now if t.uses_clock else None)
            ref_key: str | None = None
            for run in spec.runs():
                r = session.execute(run, ref_key)
                if run.is_reference:
                    ref_key = r.key
                outcome.runs.append(r)
        finally:
            session.template.close()
    return outcome

