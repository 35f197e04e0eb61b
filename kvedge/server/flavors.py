"""The server kinds kvedge talks to, each in its own words: how to tell it answers, what it reports
about itself, how to ask it for one greedy answer, and how to read that answer.

- `llama-server` (llama.cpp's own): `/props` (model path, context, slots, build), `/v1/models` (the
  model's parameter and vocabulary counts), `/lora-adapters`; answers on `/completion`, which takes the
  prompt raw, can switch prompt caching off and returns the generated token ids and its own timings.
- `llama-cpp-python` (`python -m llama_cpp.server`): `/openapi.json` (its version), `/v1/models` (the
  model path); one request at a time; answers on `/v1/completions`.
- `ollama`: `/api/version`, `/api/show` (the model's blob digest, which is the GGUF's sha256, its
  adapters and metadata), `/api/ps` (the context it loaded with); answers on `/api/generate` with
  `raw: true`. It reports neither its cache type (`OLLAMA_KV_CACHE_TYPE`, one type for K and V, used
  only with flash attention) nor its parallelism (`OLLAMA_NUM_PARALLEL`).
- `openai`: any other OpenAI-compatible endpoint (LM Studio, vLLM, ...): `/v1/models` and
  `/v1/completions`, or `/v1/chat/completions` when the user states `api=chat`.

None of them reports the KV cache types, flash attention or llama.cpp's attention rotation: those are
stated by the user (`spec.py`) and marked so in the report. Every request is greedy (temperature 0,
no repetition penalty, one fixed seed) and asks for `max_tokens` tokens.

For the first-token refusal margin a request may also ask for the top `TOP_LOGPROBS` log-probabilities of
each generated token (llama-server's `n_probs`, OpenAI's `logprobs` / `top_logprobs`, Ollama's
`logprobs` / `top_logprobs` from 0.12.11): all of them compute these from the full distribution beside
the sampler, so asking does not change the greedy answer. `Answer.first_top` holds the first position's.
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ServerError
from .client import RETRYABLE, Client, Reply, Unreachable, one_line

SEED = 0  # as in-process (RuntimeOptions.seed); greedy decoding does not read it
# Top log-probabilities asked for at each generated token, for the first-token margin: 20 is the most that
# Ollama and OpenAI's chat API accept (0-20) and vLLM's default --max-logprobs, so a larger N would be
# refused where this is not; the openings that move the margin sit near the top of the distribution.
TOP_LOGPROBS = 20
# how a server that refuses the parameter names it (OpenAI's legacy completions take at most 5;
# llama-cpp-python answers HTTP 500 "logprobs is not supported ... logits_all=False")
_LOGPROBS_PARAM = re.compile(r"logprob|n_probs", re.I)
_CTX_ERROR = re.compile(r"context (length|size|window)|exceed_context_size|context_length_exceeded", re.I)


@dataclass(frozen=True)
class Setting:
    """One setting of a server and how kvedge knows it."""

    value: Any
    source: str  # "observed: GET /props", "stated", "implied: ...", "assumed: ...", or "unknown"

    @property
    def provenance(self) -> str:
        return self.source.split(":", 1)[0]

    def to_dict(self) -> dict:
        return {"value": self.value, "source": self.source}


UNKNOWN = Setting(None, "unknown")


@dataclass(frozen=True)
class Observation:
    """What one server said about itself."""

    kind: str
    settings: dict[str, Setting]  # model, build, n_ctx, slots, adapter (those it reports)
    facts: dict[str, Any] = field(default_factory=dict)  # for identity checks and the report
    request_model: str | None = None  # the name requests must carry (Ollama, OpenAI)


@dataclass(frozen=True)
class Answer:
    """One greedy answer, in kvedge's terms."""

    text: str
    stop: str  # "eog" | "max_tokens"
    tokens: list[int] | None = None  # generated ids, where the server returns them
    prompt_tokens: int | None = None  # the server's own count of the prompt
    completion_tokens: int | None = None
    prompt_seconds: float | None = None  # the server's own timings
    decode_seconds: float | None = None
    # the first generated token's top log-probabilities, by token id where the server names ids, else by
    # text (kvedge.detectors.openings.TopN); None where the server gave none
    first_top: dict[int | str, float] | None = None


def _json(reply: Reply, what: str) -> Any:
    if not reply.ok or reply.body is None:
        raise ServerError(f"{what} answered HTTP {reply.status}: {reply.error_message()}")
    return reply.body


def _get(client: Client, path: str) -> Reply | None:
    """A probe GET: the reply when the server answers at all, None for a 4xx (no such endpoint)."""
    r = client.get(path)
    return r if r.ok else None


def _observed(value: Any, path: str) -> Setting:
    return Setting(value, f"observed: GET {path}") if value is not None else UNKNOWN


def is_context_error(reply: Reply) -> bool:
    return reply.status == 400 and bool(_CTX_ERROR.search(reply.text))


def rejects_logprobs(reply: Reply) -> bool:
    """Whether a failed answer refuses the log-probability parameter (naming it), rather than failing for
    another reason: a 4xx, or a 5xx that names it (a server error that asking again would only repeat)."""
    return not reply.ok and reply.status not in RETRYABLE and bool(_LOGPROBS_PARAM.search(reply.error_message()))


def _text(entry: dict) -> str | None:
    """A top entry's token text: its bytes where given (exact, where `token` may drop a partial UTF-8
    character), decoded as kvedge decodes its own pieces."""
    raw = entry.get("bytes")
    if isinstance(raw, list) and raw and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        return bytes(raw).decode("utf-8", errors="replace")
    token = entry.get("token")
    return token if isinstance(token, str) else None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _top_entries(entries: Any) -> dict[int | str, float] | None:
    """One position's top entries ([{id?, token, bytes?, logprob}]: llama-server, OpenAI chat, Ollama),
    keyed by id where the server names it, else by text. A text listed twice (two tokens with one piece)
    keeps the mass of both: the answer opens with that text either way."""
    out: dict[int | str, float] = {}
    for e in entries if isinstance(entries, list) else []:
        if not isinstance(e, dict) or not _finite(e.get("logprob")):
            continue
        key = e["id"] if isinstance(e.get("id"), int) and not isinstance(e.get("id"), bool) else _text(e)
        if key is not None:
            lp = float(e["logprob"])
            out[key] = lp if key not in out else max(lp, out[key]) + math.log1p(math.exp(-abs(lp - out[key])))
    return out or None


def _openai_top(choice: dict) -> dict[int | str, float] | None:
    """The first generated token's top log-probabilities in an OpenAI choice: the chat shape
    (`logprobs.content[0].top_logprobs`, which llama-server also uses on /v1/completions) or the legacy
    completions shape (`logprobs.top_logprobs[0]`, a {text: logprob} object)."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    content = lp.get("content")
    if isinstance(content, list):
        return _top_entries(content[0].get("top_logprobs")) if content and isinstance(content[0], dict) else None
    tops = lp.get("top_logprobs")
    if isinstance(tops, list) and tops and isinstance(tops[0], dict):
        return {str(k): float(v) for k, v in tops[0].items() if _finite(v)} or None
    return None


def _finish(reason: Any) -> str:
    return "max_tokens" if reason in ("length", "limit") else "eog"


def _field(body: Any, *path: Any) -> Any:
    """body[path...], or ServerError: an answer without its text must never be read as an empty answer
    (which the detector would count as a refusal)."""
    try:
        for p in path:
            body = body[p]
    except (KeyError, IndexError, TypeError):
        where = "/".join(map(str, path))
        raise ServerError(f"the server's answer has no {where}: {one_line(str(body))[:200]}") from None
    return body


def _openai_completion(body: dict) -> Answer:
    choice = _field(body, "choices", 0)
    usage = body.get("usage") or {}
    timings = body.get("timings") or {}  # llama-server adds its own timings to OpenAI answers
    text = _field(choice, "message", "content") if "message" in choice else _field(choice, "text")
    return Answer(
        text or "", _finish(choice.get("finish_reason")), None, usage.get("prompt_tokens"),
        usage.get("completion_tokens"),
        timings["prompt_ms"] / 1000 if "prompt_ms" in timings else None,
        timings["predicted_ms"] / 1000 if "predicted_ms" in timings else None,
        _openai_top(choice),
    )


def _first_top(positions: Any) -> dict[int | str, float] | None:
    """The first position's top log-probabilities from a list of generated positions, each
    {id?, token, logprob, top_logprobs: [...]} (llama-server's `completion_probabilities`, Ollama's
    `logprobs`). llama-server's `top_probs` (post-sampling probabilities) are not read: after greedy
    sampling they hold the chosen token alone."""
    if not isinstance(positions, list) or not positions or not isinstance(positions[0], dict):
        return None
    return _top_entries(positions[0].get("top_logprobs"))


def _openai_request(api: str, text: str, messages: list[dict], max_tokens: int, model: str | None,
                    extra: dict | None = None, top: int = 0) -> tuple[str, dict]:
    body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0, "seed": SEED,
                            "stream": False, **(extra or {})}
    if model:
        body["model"] = model
    if api == "chat":
        return "/v1/chat/completions", {**body, "messages": messages,
                                        **({"logprobs": True, "top_logprobs": top} if top else {})}
    return "/v1/completions", {**body, "prompt": text, **({"logprobs": top} if top else {})}


class Flavor:
    """One server kind. `detect` answers whether this server is of the kind (None if not); `request`
    and `answer` translate one greedy generation, asking for the top `top` log-probabilities when `top`."""

    kind = ""
    default_api = "completion"

    def detect(self, client: Client) -> Any:
        raise NotImplementedError

    def observe(self, client: Client, found: Any, model: str | None) -> Observation:
        raise NotImplementedError

    def request(self, api: str, text: str, messages: list[dict], max_tokens: int, model: str | None,
                top: int = 0) -> tuple[str, dict]:
        return _openai_request(api, text, messages, max_tokens, model, top=top)

    def answer(self, api: str, body: dict) -> Answer:
        return _openai_completion(body)


class LlamaServer(Flavor):
    kind = "llama-server"

    def detect(self, client: Client) -> Any:
        r = _get(client, "/props")
        if r and isinstance(r.body, dict) and ("total_slots" in r.body or "build_info" in r.body):
            return r.body
        return None

    def observe(self, client: Client, props: dict, model: str | None) -> Observation:
        meta: dict = {}
        models = _get(client, "/v1/models")
        if models and isinstance(models.body, dict) and models.body.get("data"):
            meta = models.body["data"][0].get("meta") or {}
        adapters = _get(client, "/lora-adapters")
        adapter = UNKNOWN
        if adapters and isinstance(adapters.body, list):
            active = [posixpath.basename(str(a.get("path", ""))) for a in adapters.body if a.get("scale", 1) != 0]
            adapter = _observed(", ".join(active) or "none", "/lora-adapters")
        path = props.get("model_path")
        settings = {
            "model": _observed(posixpath.basename(path) if path else None, "/props"),
            "build": _observed(props.get("build_info"), "/props"),
            "n_ctx": _observed((props.get("default_generation_settings") or {}).get("n_ctx"), "/props"),
            "slots": _observed(props.get("total_slots"), "/props"),
            "adapter": adapter,
        }
        facts = {"model_path": path, "n_params": meta.get("n_params"), "n_vocab": meta.get("n_vocab"),
                 "n_ctx_train": meta.get("n_ctx_train")}
        return Observation(self.kind, settings, facts, model)

    def request(self, api: str, text: str, messages: list[dict], max_tokens: int, model: str | None,
                top: int = 0) -> tuple[str, dict]:
        # cache_prompt off: a prompt must not reuse the cache cells of whichever prompt ran before it
        if api == "chat":
            return _openai_request(api, text, messages, max_tokens, model, {"cache_prompt": False, "top_k": 1}, top)
        # post_sampling_probs off (its default): the probabilities of the full distribution; after top_k 1
        # only the chosen token would be left, with probability 1
        probs = {"n_probs": top, "post_sampling_probs": False} if top else {}
        return "/completion", {"prompt": text, "n_predict": max_tokens, "temperature": 0.0, "top_k": 1,
                               "repeat_penalty": 1.0, "seed": SEED, "cache_prompt": False,
                               "return_tokens": True, "stream": False, **probs}

    def answer(self, api: str, body: dict) -> Answer:
        if api == "chat":
            return _openai_completion(body)
        t = body.get("timings") or {}
        tokens = list(body.get("tokens") or [])
        if body.get("stop_type") == "eos" and tokens:
            tokens = tokens[:-1]  # it lists the end-of-generation token; in-process runs store the answer only
        return Answer(
            _field(body, "content"), "max_tokens" if body.get("stop_type") == "limit" else "eog",
            tokens or None, body.get("tokens_evaluated"), body.get("tokens_predicted"),
            t["prompt_ms"] / 1000 if "prompt_ms" in t else None,
            t["predicted_ms"] / 1000 if "predicted_ms" in t else None,
            _first_top(body.get("completion_probabilities")),
        )


class LlamaCppPython(Flavor):
    kind = "llama-cpp-python"

    def detect(self, client: Client) -> Any:
        r = _get(client, "/openapi.json")
        info = (r.body or {}).get("info", {}) if r and isinstance(r.body, dict) else {}
        return info if "llama.cpp python" in str(info.get("title", "")).lower() else None

    def observe(self, client: Client, info: dict, model: str | None) -> Observation:
        models = _json(client.get("/v1/models"), "GET /v1/models")
        path = (models.get("data") or [{}])[0].get("id")
        settings = {
            "model": _observed(posixpath.basename(path) if path else None, "/v1/models"),
            "build": _observed(f"llama-cpp-python {info['version']}" if info.get("version") else None, "/openapi.json"),
            # its FastAPI app holds one lock around the model: requests are served one at a time
            "slots": Setting(1, "known: llama-cpp-python's server answers one request at a time"),
        }
        return Observation(self.kind, settings, {"model_path": path}, model)

    def request(self, api: str, text: str, messages: list[dict], max_tokens: int, model: str | None,
                top: int = 0) -> tuple[str, dict]:
        # its request defaults sample (temperature 0.8, repeat_penalty 1.1): greedy needs all of these
        return _openai_request(api, text, messages, max_tokens, model,
                               {"top_k": 1, "min_p": 0.0, "repeat_penalty": 1.0, "presence_penalty": 0.0,
                                "frequency_penalty": 0.0}, top)


_BLOB = re.compile(r"sha256[-:]([0-9a-f]{64})")


def _modelfile_lines(modelfile: str, verb: str) -> list[str]:
    return [ln.split(None, 1)[1].strip() for ln in modelfile.splitlines()
            if ln.strip().upper().startswith(verb + " ") and len(ln.split(None, 1)) == 2]


class Ollama(Flavor):
    kind = "ollama"

    def detect(self, client: Client) -> Any:
        r = _get(client, "/api/version")
        return r.body if r and isinstance(r.body, dict) and "version" in r.body else None

    def observe(self, client: Client, version: dict, model: str | None) -> Observation:
        running = (_get(client, "/api/ps") or Reply(200, {}, "")).body or {}
        loaded = [m for m in running.get("models") or [] if isinstance(m, dict)]
        if model is None:
            if len(loaded) != 1:
                names = ", ".join(m.get("name", "?") for m in loaded) or "none loaded"
                raise ServerError(f"{client.base_url} is Ollama: state the model to audit with #model=NAME "
                                  f"(running: {names})")
            model = loaded[0].get("name") or loaded[0].get("model")
        show = client.post("/api/show", {"model": model})
        if show.status == 404:
            raise ServerError(f"Ollama at {client.base_url} has no model {model!r}")
        shown = _json(show, "POST /api/show")
        modelfile = str(shown.get("modelfile", ""))
        froms = [m.group(1) for ln in _modelfile_lines(modelfile, "FROM") if (m := _BLOB.search(ln))]
        adapters = [m.group(1) for ln in _modelfile_lines(modelfile, "ADAPTER") if (m := _BLOB.search(ln))]
        params = str(shown.get("parameters", ""))
        num_ctx = next((int(ln.split()[1]) for ln in params.splitlines() if ln.split()[:1] == ["num_ctx"]), None)
        ps = next((m for m in loaded if model in (m.get("name"), m.get("model"))), {})
        n_ctx = (_observed(ps["context_length"], "/api/ps") if ps.get("context_length")
                 else Setting(num_ctx, "observed: POST /api/show (num_ctx)") if num_ctx else UNKNOWN)
        info = shown.get("model_info") or {}
        settings = {
            "model": Setting(f"{model} (sha256 {froms[0][:12]})" if froms else model, "observed: POST /api/show"),
            "build": _observed(f"ollama {version['version']}", "/api/version"),
            "n_ctx": n_ctx,
            "adapter": Setting(", ".join(f"sha256 {a[:12]}" for a in adapters) or "none", "observed: POST /api/show"),
            "slots": Setting(1, "assumed: Ollama does not report OLLAMA_NUM_PARALLEL"),
        }
        facts = {"model_sha256": froms[0] if froms else None, "adapter_sha256": adapters,
                 "n_params": info.get("general.parameter_count"),
                 "offload": (f"{ps['size_vram']}/{ps['size']} bytes in GPU memory"
                             if ps.get("size") and "size_vram" in ps else None)}
        return Observation(self.kind, settings, facts, model)

    def request(self, api: str, text: str, messages: list[dict], max_tokens: int, model: str | None,
                top: int = 0) -> tuple[str, dict]:
        # Ollama's defaults sample and penalise repeats (repeat_penalty 1.1): greedy needs these options
        options = {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0,
                   "seed": SEED, "num_predict": max_tokens}
        # from 0.12.11; an older Ollama ignores fields it does not know and answers without them
        probs = {"logprobs": True, "top_logprobs": top} if top else {}
        if api == "chat":
            return "/api/chat", {"model": model, "messages": messages, "stream": False, "options": options, **probs}
        return "/api/generate", {"model": model, "prompt": text, "raw": True, "stream": False, "options": options,
                                 **probs}

    def answer(self, api: str, body: dict) -> Answer:
        text = _field(body, "message", "content") if api == "chat" else _field(body, "response")
        ns = 1e9
        return Answer(
            text or "", _finish(body.get("done_reason")), None, body.get("prompt_eval_count"),
            body.get("eval_count"),
            body["prompt_eval_duration"] / ns if "prompt_eval_duration" in body else None,
            body["eval_duration"] / ns if "eval_duration" in body else None,
            _first_top(body.get("logprobs")),
        )


class OpenAI(Flavor):
    kind = "openai"

    def detect(self, client: Client) -> Any:
        r = _get(client, "/v1/models")
        return r.body if r and isinstance(r.body, dict) and isinstance(r.body.get("data"), list) else None

    def observe(self, client: Client, models: dict, model: str | None) -> Observation:
        ids = [str(m.get("id")) for m in models["data"] if isinstance(m, dict) and m.get("id")]
        if model is None:
            if len(ids) != 1:
                raise ServerError(f"{client.base_url} serves {len(ids)} models ({', '.join(ids[:8]) or 'none'}): "
                                  "state the one to audit with #model=NAME")
            model = ids[0]
        elif model not in ids:
            raise ServerError(f"{client.base_url} does not list model {model!r} (it lists {', '.join(ids[:8])})")
        settings = {"model": Setting(model, "observed: GET /v1/models"),
                    "slots": Setting(1, "assumed: the server does not report its parallel slots")}
        return Observation(self.kind, settings, {}, model)


# Asked in this order: a llama-server or a llama-cpp-python server also answers /v1/models.
FLAVORS: tuple[Flavor, ...] = (LlamaServer(), Ollama(), LlamaCppPython(), OpenAI())
BY_KIND = {f.kind: f for f in FLAVORS}


def identify(client: Client, model: str | None) -> Observation:
    """Which kind of server this is and what it reports; `Unreachable` if it does not answer."""
    for flavor in FLAVORS:
        found = flavor.detect(client)
        if found is not None:
            return flavor.observe(client, found, model)
    raise ServerError(f"{client.base_url} is not a llama-server, Ollama or OpenAI-compatible endpoint "
                      "(none of /props, /api/version, /v1/models answered)")


__all__ = ["Answer", "BY_KIND", "FLAVORS", "Observation", "Setting", "TOP_LOGPROBS", "UNKNOWN", "Unreachable",
           "identify", "is_context_error", "rejects_logprobs"]
