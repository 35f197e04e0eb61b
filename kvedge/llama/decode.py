"""Continuous batching over one llama.cpp context: many sequences share each `llama_decode` call, and a
finished sequence's slot is refilled from the queue at once (the way llama-server serves its slots).

Why it is shaped so:
- On a small model llama.cpp's decode throughput grows with the sequences per call, because the weights
  are read once per call for all of them (measured on 2 cores, SmolLM2-135M: 165 tok/s for one sequence,
  263 for 8, 321 for 16, 337 for 32; `bench/audit_throughput.py` measures it again).
- The cache is unified: sequences of any length share its cells, and a sequence is admitted only when its
  prompt and its longest answer fit beside the others, so a decode never runs out of cells.
- A prefix every prompt shares (a chat template's system prompt) can be computed once per context and
  copied into each sequence (`llama_memory_seq_cp`), instead of once per prompt.
- A sequence retires the moment it ends, reaches its token or context limit, or its `final` says its
  verdict can no longer change.
- Teacher forcing (scoring a given continuation) runs the same loop, feeding the given tokens instead of
  the argmax: one token per sequence per decode, like generation. Feeding a whole continuation in one
  decode would be faster still, but it changed the per-position distributions by as much as the f16
  noise floor, and at q4_0 without rotation by a quarter of the quantization's own effect (measured,
  tests/e2e/test_decode.py), so it is not used.

The one-sequence path (`n_seq=1`, no shared prefix) makes exactly the calls kvedge's earlier one-prompt-at-
a-time loop made: the whole prompt in one decode (chunked by n_batch), then one token per decode.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .scoring import log_softmax


@dataclass(frozen=True)
class GenJob:
    prompt: Sequence[int]
    max_tokens: int
    # called with the tokens generated so far; True once the answer's verdict can no longer change
    final: Callable[[list[int]], bool] | None = None
    logprobs: bool = False  # keep the log-softmax of every step (the step that chose the end included)
    # teacher forcing: feed these tokens instead of the argmax (the job ends after the last)
    forced: Sequence[int] | None = None
    # read at the first answer position, from the raw logits that choose the answer's first token (the
    # first-token refusal margin): its value is kept in the result. The audit passes a
    # kvedge.detectors.openings.FirstMargin, whose token sets a server runtime reads for its top-N instead
    first: Callable[[np.ndarray], float | None] | None = None


@dataclass(frozen=True)
class GenResult:
    tokens: list[int]
    stop_reason: str  # "eog" | "max_tokens" | "ctx" | "final" | "forced" (a teacher-forced job's end)
    n_prompt_tokens: int
    prompt_seconds: float  # this sequence's share of the decode calls that carried its prompt
    decode_seconds: float  # and of those that carried its answer
    logprobs: list[np.ndarray] | None
    first: float | None = None  # GenJob.first at the first answer position


@dataclass
class _Seq:
    job: int
    slot: int
    tokens: list[int]  # the prompt
    fed: int  # tokens already in the cache, a shared prefix included
    reserved: int  # cells held for it
    out: list[int] = field(default_factory=list)
    kept: list[np.ndarray] | None = None
    prompt_s: float = 0.0
    decode_s: float = 0.0
    stop: str = ""
    first: float | None = None


class Decoder:
    """Batched decoding on a llama.cpp context created with `n_seq_max >= n_seq + 1` and a unified cache
    (sequence `n_seq` holds the shared prefix)."""

    def __init__(self, lib, ctx, vocab, n_vocab: int, n_ctx_seq: int, n_batch: int, n_seq: int):
        self.lib, self.ctx, self.vocab, self.n_vocab = lib, ctx, vocab, n_vocab
        self.mem = lib.llama_get_memory(ctx)
        self.capacity = int(lib.llama_n_ctx(ctx))  # cells of the unified cache
        self.n_ctx_seq = n_ctx_seq  # what one sequence may hold: the context a deployment runs with
        self.n_batch, self.n_seq = n_batch, n_seq
        self.batch = lib.llama_batch_init(n_batch, 0, 1)
        self.prefix: tuple[int, ...] = ()
        # tokens through the model, for throughput accounting: prompt rows (prompts, shared prefixes) and
        # answer rows (one per sequence per step, generated or teacher-forced)
        self.prompt_rows = self.answer_rows = 0
        self.seconds = 0.0

    def close(self) -> None:
        if self.batch is not None:
            self.lib.llama_batch_free(self.batch)
            self.batch = None

    # -- the one llama.cpp call ----------------------------------------------------------------------
    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> float:
        """rows: (token, position, sequence, wants logits). Returns the call's wall time."""
        b = self.batch
        for i, (tok, pos, seq, out) in enumerate(rows):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = out
        b.n_tokens = len(rows)
        t0 = time.perf_counter()
        ret = self.lib.llama_decode(self.ctx, b)
        dt = time.perf_counter() - t0
        self.seconds += dt
        if ret != 0:
            raise RuntimeError(f"llama_decode failed with status {ret} on a batch of {len(rows)} tokens")
        return dt

    def logits(self, i: int) -> np.ndarray:
        """The logits of batch row `i` of the last decode (a view into llama.cpp's buffer: copy to keep)."""
        ptr = self.lib.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.mem, True)
        self.prefix = ()

    def set_prefix(self, prefix: Sequence[int]) -> None:
        """Compute `prefix` once into the prefix sequence; later jobs that start with it share its cells."""
        prefix = tuple(prefix)
        if prefix == self.prefix:
            return
        self.lib.llama_memory_seq_rm(self.mem, self.n_seq, -1, -1)
        self.prefix = ()
        for start in range(0, len(prefix), self.n_batch):
            chunk = prefix[start:start + self.n_batch]
            self._decode([(t, start + i, self.n_seq, False) for i, t in enumerate(chunk)])
            self.prompt_rows += len(chunk)
        self.prefix = prefix

    def _shared(self, tokens: Sequence[int]) -> int:
        n = len(self.prefix)
        return n if n and len(tokens) > n and tuple(tokens[:n]) == self.prefix else 0

    def _start(self, job: int, slot: int, tokens: list[int], reserve: int) -> _Seq:
        shared = self._shared(tokens)
        if shared:
            self.lib.llama_memory_seq_cp(self.mem, self.n_seq, slot, -1, -1)
        return _Seq(job, slot, tokens, shared, reserve - shared)

    def _free(self, s: _Seq) -> None:
        self.lib.llama_memory_seq_rm(self.mem, s.slot, -1, -1)

    def _schedule(self, queue: deque, need: Callable[[int], tuple[list[int], int]], active: dict[int, _Seq],
                  free: list[int], used: list[int]) -> None:
        """Admit queued jobs while slots and cells allow (a lone job always runs: its own limit stops it)."""
        while queue and free:
            tokens, reserve = need(queue[0])
            shared = self._shared(tokens)
            if active and used[0] + reserve - shared > self.capacity - len(self.prefix):
                return
            s = self._start(queue.popleft(), free.pop(), tokens, reserve)
            active[s.slot] = s
            used[0] += s.reserved

    # -- generation ------------------------------------------------------------------------------------
    def generate(self, jobs: Sequence[GenJob], on_row: Callable[[int, int, np.ndarray], None] | None = None
                 ) -> Iterator[tuple[int, GenResult]]:
        """Greedy generation for every job; yields (job index, result) as each finishes, in any order.
        `on_row(job, k, logp)` receives the log-softmax of each job's k-th answer position as it is
        computed (and dropped right after, so scoring a long answer never holds its whole matrix)."""
        queue: deque[int] = deque()
        for i, j in enumerate(jobs):
            if j.forced is not None and not j.forced:
                yield i, GenResult([], "forced", len(j.prompt), 0.0, 0.0, [] if j.logprobs else None)
            elif len(j.prompt) >= self.n_ctx_seq:
                yield i, GenResult([], "ctx", len(j.prompt), 0.0, 0.0, [] if j.logprobs else None)
            else:
                queue.append(i)
        active: dict[int, _Seq] = {}
        free = list(range(self.n_seq))[::-1]
        used = [0]

        def need(i: int) -> tuple[list[int], int]:
            j = jobs[i]
            return list(j.prompt), min(len(j.prompt) + j.max_tokens, self.n_ctx_seq)

        while queue or active:
            self._schedule(queue, need, active, free, used)
            rows: list[tuple[int, int, int, bool]] = []
            owners: list[tuple[_Seq, bool, bool]] = []  # per row: sequence, is a prompt token, wants logits
            for s in active.values():  # sequences that are answering feed their last token
                if s.out:
                    rows.append((s.out[-1], len(s.tokens) + len(s.out) - 1, s.slot, True))
                    owners.append((s, False, True))
            for s in active.values():  # then prompt chunks, as far as the batch allows
                if s.out or s.fed >= len(s.tokens):
                    continue
                room = self.n_batch - len(rows)
                if room <= 0:
                    break
                chunk = s.tokens[s.fed:s.fed + room]
                for k, t in enumerate(chunk):
                    last = s.fed + k == len(s.tokens) - 1
                    rows.append((t, s.fed + k, s.slot, last))
                    owners.append((s, True, last))
                s.fed += len(chunk)
            dt = self._decode(rows)
            n_prompt = sum(1 for _, is_prompt, _ in owners if is_prompt)
            self.prompt_rows += n_prompt
            self.answer_rows += len(rows) - n_prompt
            share = dt / len(rows)
            finished: list[_Seq] = []
            for i, (s, is_prompt, out) in enumerate(owners):
                if is_prompt:
                    s.prompt_s += share
                else:
                    s.decode_s += share
                if not out:
                    continue
                j = jobs[s.job]
                logits = self.logits(i)
                if not s.out and j.first is not None:
                    s.first = j.first(logits)
                if on_row is not None:
                    on_row(s.job, len(s.out), log_softmax(logits))
                if j.logprobs:
                    s.kept = (s.kept or []) + [log_softmax(logits)]
                if j.forced is not None:
                    if len(s.out) + 1 >= len(j.forced):
                        finished.append(self._finish(s, "forced"))
                        continue
                    s.out.append(int(j.forced[len(s.out)]))
                    continue
                tok = int(np.argmax(logits))
                if self.lib.llama_vocab_is_eog(self.vocab, tok):
                    finished.append(self._finish(s, "eog"))
                    continue
                s.out.append(tok)
                if len(s.out) >= j.max_tokens:
                    finished.append(self._finish(s, "max_tokens"))
                elif j.final is not None and j.final(s.out):
                    finished.append(self._finish(s, "final"))
                elif len(s.tokens) + len(s.out) >= self.n_ctx_seq:
                    finished.append(self._finish(s, "ctx"))
            for s in finished:
                del active[s.slot]
                free.append(s.slot)
                used[0] -= s.reserved
                j = jobs[s.job]
                yield s.job, GenResult(s.out, s.stop, len(s.tokens), s.prompt_s, s.decode_s,
                                       (s.kept or []) if j.logprobs else None, s.first)

    def _finish(self, s: _Seq, reason: str) -> _Seq:
        s.stop = reason
        self._free(s)
        return s
