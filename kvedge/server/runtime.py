"""The audit's runtimes for a server audit: a `RuntimeFactory` that hands each server run to its servers
and every other run (an in-process reference or noise run) to llama.cpp in this process.

A server run's wave of prompts goes into one queue that all the run's servers drain together, each with
as many requests in flight as it has slots; each answer is tagged with the server that gave it. A request
that fails (refused connection, deadline passed, answer cut off, 5xx) is retried with exponential backoff,
and before each retry kvedge asks the server again what it is: a server that came back with other
settings is refused (exit 2), one that came back the same carries on. A server that stays down past the
patience hands its request back to the queue for the others; when none is left the audit stops,
everything answered so far stored, and the same command resumes it. The store keeps one row per (run,
prompt), written once.

Servers cannot honour the audit's early stop (`GenJob.final`, the detector's verdict settling): they
answer with the full max_tokens, which the detector reads to the same verdict, and the store key says so.

The first-token refusal margin comes from the top `TOP_LOGPROBS` log-probabilities of each answer's first
token where the server gives them (`GenJob.first`'s token sets, `top_margin`). A server that refuses the
parameter is asked again without it, once, and not asked for it again: its run has no margin.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .. import defaults
from ..errors import ServerError
from ..gguf.model import ModelInfo
from ..llama.decode import GenJob
from ..llama.runtime import (
    Generation,
    KVConfig,
    RuntimeFactory,
    RuntimeOptions,
    Vocabulary,
)
from .client import Client, Reply, Unreachable, retry
from .flavors import BY_KIND, TOP_LOGPROBS, Flavor, is_context_error, rejects_logprobs
from .plan import Plan
from .probe import ServerInfo, reprobe
from .spec import ServerSpec

DEFAULT_TIMEOUT, DEFAULT_PATIENCE = defaults.SERVER_TIMEOUT, defaults.SERVER_PATIENCE


class LocalTokenizer(Vocabulary):
    """The GGUF's vocabulary only (no weights): the same tokens in-process runs see, for counting a
    prompt and comparing with the server's own count."""

    def __init__(self, path: Path):
        import llama_cpp
        from llama_cpp._internals import LlamaModel
        from llama_cpp._logger import set_verbose

        set_verbose(False)
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = LlamaModel(path_model=str(path), params=params, verbose=False)

    def close(self) -> None:
        self._model.close()


@dataclass(frozen=True)
class Work:
    text: str  # the templated prompt, sent raw
    messages: list[dict]  # the same prompt as chat messages, for servers that take only those
    n_local: int  # its tokens by the local vocabulary
    max_tokens: int
    # the margin from a top-N (FirstMargin.from_top); None: the audit measures none, so none is asked for
    margin: Callable[[dict], float | None] | None = None


class ServerRuntimes:
    """A `RuntimeFactory` for an audit some of whose runs are answered by servers (`plan`)."""

    def __init__(self, plan: Plan, specs: Sequence[ServerSpec], model: ModelInfo, adapter: Path | None,
                 messages: dict[str, list[dict]], base: RuntimeOptions, local: RuntimeFactory,
                 timeout: float = DEFAULT_TIMEOUT, patience: float = DEFAULT_PATIENCE):
        self.plan, self.model, self.adapter, self.messages, self.local = plan, model, adapter, messages, local
        self.timeout, self.patience = timeout, patience
        self.specs = {s.url: s for s in specs}
        # the audit opens a run by (kv, rotation, options): the noise variant is the one with flash attention off
        self._routes = {(r.kv, r.rotation, r.options(base).flash_attn): r for r in plan.servers}
        self._tokenizer: LocalTokenizer | None = None
        self._lock = threading.Lock()
        self._no_logprobs: dict[str, str] = {}  # server URL -> its words refusing the log-probability parameter

    def backend(self, n_gpu_layers: int) -> dict:
        return self.local.backend(n_gpu_layers)

    def open(self, model: ModelInfo, kv: KVConfig, rotation: bool | None, options: RuntimeOptions,
             lora_path: Path | None):
        run = self._routes.get((kv, rotation, options.flash_attn))
        if run is None:
            return self.local.open(model, kv, rotation, options, lora_path)
        if self._tokenizer is None:
            self._tokenizer = LocalTokenizer(self.model.path)
        return ServerRuntime(self, self.plan.servers[run])

    def close(self) -> None:
        if self._tokenizer is not None:
            self._tokenizer.close()
            self._tokenizer = None

    # one request, retried -------------------------------------------------------------------------
    def _top(self, info: ServerInfo, work: Work) -> int:
        """How many top log-probabilities to ask this server for: none where the audit measures no margin
        or the server refused them before."""
        return TOP_LOGPROBS if work.margin is not None and info.url not in self._no_logprobs else 0

    def _post(self, client: Client, flavor: Flavor, info: ServerInfo, work: Work, top: int) -> tuple[str, Reply]:
        path, body = flavor.request(info.api, work.text, work.messages, work.max_tokens, info.request_model, top)
        try:
            return path, client.post(path, body)
        except Unreachable as exc:
            # a 5xx naming the parameter (llama-cpp-python without logits_all) refuses it; asking again would not help
            if top and exc.reply is not None and rejects_logprobs(exc.reply):
                return path, exc.reply
            raise

    def _ask(self, client: Client, flavor: Flavor, info: ServerInfo, work: Work) -> tuple[str, Reply]:
        """One attempt: with the top log-probabilities where wanted, and without them, once, when the server
        refuses the parameter (remembered for the server: every later request goes without)."""
        top = self._top(info, work)
        path, reply = self._post(client, flavor, info, work, top)
        if top and rejects_logprobs(reply):
            with self._lock:
                self._no_logprobs[info.url] = reply.error_message()
            path, reply = self._post(client, flavor, info, work, 0)
        return path, reply

    def _logprobs_origin(self, info: ServerInfo, work: Work, first_top: dict | None) -> dict:
        """What the answer's origin records of the log-probabilities (read by kvedge.server.annotate)."""
        if work.margin is None:
            return {}
        if first_top:
            return {"logprobs": f"top-{TOP_LOGPROBS}"}
        refused = self._no_logprobs.get(info.url)
        return {"logprobs": f"refused: {refused}" if refused is not None else "none given"}

    def answer(self, info: ServerInfo, work: Work, stop: threading.Event) -> Generation:
        flavor = BY_KIND[info.kind]
        client = Client(info.url, self.timeout)
        spec = self.specs[info.url]

        def attempt() -> tuple[str, Reply]:
            if stop.is_set():
                raise _Cancelled
            return self._ask(client, flavor, info, work)

        def between() -> None:
            reprobe(info, spec, self.timeout, self.adapter)

        t0 = time.perf_counter()
        (path, reply), attempts = retry(attempt, self.patience, between)
        wall = time.perf_counter() - t0
        origin = {"server": info.url, "kind": info.kind, "api": info.api, "attempts": attempts,
                  "wall_seconds": round(wall, 4), "prompt_tokens_local": work.n_local}
        if not reply.ok:
            if is_context_error(reply):  # as in-process: a prompt that does not fit ends at the context
                return Generation([], "", work.n_local, "ctx", 0.0, 0.0, None, {**origin, "error": reply.error_message()})
            hint = " (state api=chat if the endpoint takes chat messages only)" if reply.status == 404 else ""
            raise ServerError(f"{info.url}{path} refused the request: HTTP {reply.status}: {reply.error_message()}{hint}")
        ans = flavor.answer(info.api, reply.body)
        timed = ans.decode_seconds is not None
        origin.update(prompt_tokens_server=ans.prompt_tokens, completion_tokens=ans.completion_tokens,
                      timings="server" if timed else "client wall time",
                      **self._logprobs_origin(info, work, ans.first_top))
        margin = work.margin(ans.first_top) if work.margin is not None and ans.first_top else None
        return Generation(list(ans.tokens or []), ans.text,
                          ans.prompt_tokens if ans.prompt_tokens is not None else work.n_local, ans.stop,
                          ans.prompt_seconds or 0.0, ans.decode_seconds if timed else wall, None, origin, margin)

    # a wave over a run's servers ------------------------------------------------------------------
    def dispatch(self, servers: Sequence[ServerInfo], work: Sequence[Work]) -> Iterator[tuple[int, Generation]]:
        """Answer every item, the servers draining one queue; yields (index, Generation) as each lands."""
        pending: deque[int] = deque(range(len(work)))
        cond = threading.Condition()
        done = threading.Event()
        results: queue.Queue = queue.Queue()

        def worker(info: ServerInfo) -> None:
            while True:
                with cond:
                    while not pending and not done.is_set():
                        cond.wait(0.5)
                    if done.is_set():
                        return
                    i = pending.popleft()
                try:
                    results.put(("done", i, self.answer(info, work[i], done)))
                except _Cancelled:
                    return
                except BaseException as exc:  # down for good, refused, or changed: hand the item back
                    with cond:
                        pending.appendleft(i)
                        cond.notify_all()
                    results.put(("down" if isinstance(exc, Unreachable) else "error", info.url, exc))
                    return

        live = {s.url: s.slots for s in servers}
        threads = [threading.Thread(target=worker, args=(s,), daemon=True, name=f"kvedge-server-{s.url}")
                   for s in servers for _ in range(s.slots)]
        for t in threads:
            t.start()
        got: set[int] = set()
        try:
            while len(got) < len(work):
                try:
                    kind, a, b = results.get(timeout=0.5)
                except queue.Empty:
                    continue
                if kind == "done":
                    if a not in got:
                        got.add(a)
                        yield a, b
                elif kind == "error":
                    raise b
                else:
                    live[a] -= 1
                    if not any(live.values()):
                        raise ServerError(_stopped(servers, b, self.patience))
        finally:
            done.set()
            with cond:
                cond.notify_all()


def _stopped(servers: Sequence[ServerInfo], last: Unreachable, patience: float) -> str:
    """The one line that ends an audit whose every server stayed unreachable past the patience."""
    if len(servers) == 1:
        head = f"server {last.url} stopped answering: it {last.what}"
    else:
        head = f"servers {', '.join(s.url for s in servers)} stopped answering; the last, {last.url}, {last.what}"
    return (f"{head} (given up after --server-patience {patience:g} s); every answer so far is stored: "
            "rerun the same command to resume")


class _Cancelled(Exception):
    """The wave ended (finished or failed) while this request waited to be retried."""


class ServerRuntime:
    """A run answered by servers, with the methods the audit calls on a runtime. It tokenizes with the
    GGUF's own vocabulary (to count the prompt and remember which text the tokens stand for) and sends
    the templated text."""

    def __init__(self, factory: ServerRuntimes, servers: Sequence[ServerInfo]):
        self.factory, self.servers = factory, servers
        self._texts: dict[tuple[int, ...], str] = {}

    def close(self) -> None:
        pass  # the servers outlive the run; the tokenizer is the factory's

    def tokenize(self, rendered: str) -> list[int]:
        toks = self.factory._tokenizer.tokenize(rendered)
        self._texts[tuple(toks)] = rendered
        return toks

    def tokenize_piece(self, text: str, special: bool = False) -> list[int]:
        """With it the audit finds the opening tokens (kvedge.detectors.openings) in the GGUF's vocabulary,
        as in-process, and hands them over in `GenJob.first`."""
        return self.factory._tokenizer.tokenize_piece(text, special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.factory._tokenizer.detokenize(tokens)

    def reset(self) -> None:
        pass  # a server keeps no state kvedge could reset; llama-server is asked not to reuse its cache

    def share_prefix(self, prefix: list[int]) -> None:
        pass

    def generate_many(self, jobs: Sequence[GenJob]) -> Iterator[tuple[int, Generation]]:
        work = []
        for j in jobs:
            text = self._texts[tuple(j.prompt)]
            # the session's FirstMargin: the same opening tokens as the in-process runs, read from a top-N
            work.append(Work(text, self.factory.messages.get(text, []), len(j.prompt), j.max_tokens,
                             getattr(j.first, "from_top", None)))
        yield from self.factory.dispatch(self.servers, work)

    def score_many(self, jobs, on_row):
        raise ServerError("a server gives no per-position distributions to teacher-force; KLD and perplexity "
                          "are measured only in-process")
