"""Loopback fakes of the server APIs kvedge talks to, for unit tests of the server audit's logic (probing,
provenance, the queue, retries, resume): each answers with the response shapes recorded in
tests/data/server_shapes (see its README for where each comes from), filling in the answer text and the
counts. The real thing runs in tests/e2e/test_server.py: llama-cpp-python's server on the real default model."""

from __future__ import annotations

import json
import math
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from support.fakes import ANSWER, REFUSAL

SHAPES = Path(__file__).parents[1] / "data" / "server_shapes"
HARMFUL_WORDS = ("bomb", "steal", "hack", "kill", "poison", "weapon")

# How a misbehaving server sends an answer (`FakeServer.fault`):
FAULTS = {
    "silent": "reads the request and sends nothing",
    "drip-headers": "sends its status line and headers a byte every `trickle_s`",
    "stall": "sends its headers, then nothing",
    "trickle": "sends its headers, then the body a byte every `trickle_s`",
    "cut": "declares the whole body, sends half of it and closes the connection",
    "long": "declares the body's length and sends more",
    "huge": "declares a body of HUGE bytes and sends it",
    "huge-undeclared": "sends a body of HUGE bytes without declaring its length, then closes",
    "badjson": "sends half the JSON, declared as the whole",
}
HUGE = 30 * 2**20
FAULT_LIMIT = 20.0  # seconds a misbehaving answer lasts at most: every fake ends by itself


def shape(name: str, **subs: str) -> Any:
    text = (SHAPES / f"{name}.json").read_text(encoding="utf-8")
    for k, v in subs.items():
        text = text.replace("{" + k + "}", v)
    return json.loads(text)


def refuses(prompt: str) -> bool:
    return any(w in prompt.lower() for w in HARMFUL_WORDS)


class ByteTokenizer:
    """Stands in for the GGUF's vocabulary in unit tests: one token a byte (the fakes count alike)."""

    def __init__(self, path: Path):
        pass

    def tokenize(self, rendered: str) -> list[int]:
        return list(rendered.encode("utf-8"))

    def tokenize_piece(self, text: str, special: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, tokens: list[int]) -> str:
        return bytes(tokens).decode("utf-8", "replace")

    def close(self) -> None:
        pass


# How a fake server treats a request for top log-probabilities (`FakeServer.logprobs`):
LOGPROBS = {
    "give": "answers with the first token's top log-probabilities in its kind's shape",
    "ignore": "answers without them (an Ollama older than 0.12.11, a server that drops unknown fields)",
    "reject": "refuses the parameter with HTTP `reject_status`, naming it (400; 500 as llama-cpp-python "
              "without logits_all)",
}


def first_top(prompt: str, refuse: bool) -> dict[str, float]:
    """The fakes' first-token log-probabilities over a few one-byte tokens (ByteTokenizer's vocabulary):
    leaning to a refusal opening ("I") or a compliance opening ("H", as in "Here") by a per-prompt amount,
    so margins follow the verdict and differ between prompts. "S" opens "Sorry" (refusal), "C" "Certainly"
    (compliance); "x" and "e" open neither."""
    lean = 2.0 + (zlib.crc32(prompt.encode("utf-8")) % 100) / 50
    logits = {"I": lean if refuse else 0.0, "H": 0.0 if refuse else lean, "S": -1.0, "C": -1.5, "x": -2.0, "e": -2.5}
    norm = math.log(sum(math.exp(v) for v in logits.values()))
    return {t: v - norm for t, v in logits.items()}


def _asked_top(kind: str, chat: bool, body: dict) -> int:
    """How many top log-probabilities a generation request asks for, in its kind's words."""
    if kind == "llama-server" and not chat:
        return int(body.get("n_probs") or 0)
    if chat or kind == "ollama":
        return int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
    return int(body.get("logprobs") or 0)


def _entries(template: dict, top: dict[str, float]) -> list[dict]:
    """`top` as entries shaped like `template` (its fields kept, its values replaced)."""
    out = []
    for text, lp in top.items():
        e = {k: v for k, v in template.items() if k != "top_logprobs"}
        e.update(token=text, logprob=lp)
        if "id" in e:
            e["id"] = text.encode("utf-8")[0]  # ByteTokenizer's id
        if isinstance(e.get("bytes"), list):
            e["bytes"] = list(text.encode("utf-8"))
        out.append(e)
    return out


def _with_logprobs(kind: str, chat: bool, out: Any, top: dict[str, float]) -> Any:
    """`out` with its first position's top log-probabilities (`top`, best first), in its kind's shape."""
    chosen = next(iter(top))
    if "choices" in out:  # llama-cpp-python, OpenAI
        if chat:
            lp = shape("llama_cpp_python_chat_logprobs")
            pos = lp["content"][0]
            pos.update(token=chosen, logprob=top[chosen], top_logprobs=_entries(pos["top_logprobs"][0], top))
        else:
            lp = shape("llama_cpp_python_completion_logprobs")
            lp.update(tokens=[chosen], token_logprobs=[top[chosen]], top_logprobs=[dict(top)])
        out["choices"][0]["logprobs"] = lp
        return out
    positions = shape("llama_server_completion_probabilities" if kind == "llama-server" else "ollama_logprobs")
    pos = positions[0]
    pos.update(_entries(pos, {chosen: top[chosen]})[0], top_logprobs=_entries(pos["top_logprobs"][0], top))
    out["completion_probabilities" if kind == "llama-server" else "logprobs"] = [pos]
    return out


class FakeServer:
    """One server of `kind` (llama-server, llama-cpp-python, ollama, openai) on 127.0.0.1.

    `fail_next` answers that many generation requests with HTTP `fail_status` (503); `context_chars` answers prompts
    longer than that with the kind's context error; `stop()` and `start()` take it down and bring it
    back on the same port (a restart), optionally as another model (`model_path`). `fault` (one of
    FAULTS) sends every generation answer wrongly, every answer with `fault_probes`; `sent` counts the
    body bytes a fault got out. `texts` are the answers to a refused and an answered prompt; `reshape`
    rewrites each generation answer's JSON. `logprobs` (one of LOGPROBS) says how it treats a request for
    top log-probabilities, which `top` gives: (prompt, refused) -> {token text: logprob}."""

    def __init__(self, kind: str, model_path: Path, model_sha256: str = "", adapter: Path | None = None,
                 adapter_sha256: str = "", policy: Callable[[str], bool] = refuses):
        self.kind, self.model_path, self.model_sha256 = kind, model_path, model_sha256
        self.adapter, self.adapter_sha256, self.policy = adapter, adapter_sha256, policy
        self.requests: list[tuple[str, str, Any]] = []
        self.fail_next = 0
        self.fail_status = 503
        self.context_chars: int | None = None
        self.drop_text = False  # answer without the text field (a broken or unknown API)
        self.texts = {True: REFUSAL, False: ANSWER}
        self.reshape: Callable[[Any], Any] | None = None
        self.logprobs = "give"
        self.reject_status = 400
        self.top: Callable[[str, bool], dict[str, float]] = first_top
        self.fault: str | None = None
        self.fault_probes = False
        self.trickle_s = 0.3
        self.sent = 0
        self.port = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()
        self._quit = threading.Event()  # set by stop(): misbehaving answers end at once

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: Any, generation: bool = False) -> None:
                data = json.dumps(body).encode("utf-8")
                if server.fault and (generation or server.fault_probes):
                    try:
                        server.misbehave(self, status, data)
                    except OSError:  # kvedge hung up, as it should
                        pass
                    return
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                server.requests.append(("GET", self.path, None))
                status, body = server.get(self.path)
                self._send(status, body)

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"null")
                server.requests.append(("POST", self.path, body))
                status, out = server.post(self.path, body)
                generation = self.path in server.routes()
                if generation and status == 200 and server.reshape is not None:
                    out = server.reshape(out)
                self._send(status, out, generation)

        ThreadingHTTPServer.allow_reuse_address = True
        self._quit.clear()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._httpd.server_address[1]
        # a short poll: stop() returns at once, not after serve_forever's default half second
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self.url

    def stop(self) -> None:
        self._quit.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def misbehave(self, h: BaseHTTPRequestHandler, status: int, data: bytes) -> None:
        """Send one answer the way `self.fault` says; returning closes the connection (HTTP/1.0)."""
        f = self.fault
        assert f in FAULTS, f
        if f == "silent":
            self._quit.wait(FAULT_LIMIT)
            return
        if f == "badjson":
            data = data[: len(data) // 2]
        declared = {"huge": HUGE, "huge-undeclared": None, "long": len(data)}.get(f, len(data))
        head = f"HTTP/1.0 {status} OK\r\nContent-Type: application/json\r\n".encode()
        if declared is not None:
            head += f"Content-Length: {declared}\r\n".encode()
        head += b"\r\n"
        if f == "drip-headers":
            self._drip(h, head)
            return
        h.wfile.write(head)
        if f == "stall":
            self._quit.wait(FAULT_LIMIT)
        elif f == "trickle":
            self._drip(h, data)
        elif f == "cut":
            self._write(h, data[: len(data) // 2])
        elif f == "long":
            self._write(h, data + b' {"and": "more"}')  # one write: it arrives with the body
        elif f in ("huge", "huge-undeclared"):
            block = b" " * 2**20
            for _ in range(HUGE // len(block)):
                if self._quit.is_set():
                    return
                self._write(h, block)
        else:
            self._write(h, data)

    def _write(self, h: BaseHTTPRequestHandler, data: bytes) -> None:
        h.wfile.write(data)
        self.sent += len(data)

    def _drip(self, h: BaseHTTPRequestHandler, data: bytes) -> None:
        for i in range(len(data)):
            if self._quit.wait(self.trickle_s) or i * self.trickle_s > FAULT_LIMIT:
                return
            self._write(h, data[i:i + 1])

    def routes(self) -> tuple[str, str]:
        """The paths that generate: (completion, chat)."""
        return {"llama-cpp-python": ("/v1/completions", "/v1/chat/completions"),
                "openai": ("/v1/completions", "/v1/chat/completions"),
                "llama-server": ("/completion", "/v1/chat/completions"),
                "ollama": ("/api/generate", "/api/chat")}[self.kind]

    def generations(self) -> list[Any]:
        return [b for m, p, b in self.requests if m == "POST" and p not in ("/api/show",)]

    # the APIs -----------------------------------------------------------------------------------
    def get(self, path: str) -> tuple[int, Any]:
        k = self.kind
        mp = str(self.model_path)
        if k == "llama-cpp-python":
            if path == "/openapi.json":
                return 200, shape("llama_cpp_python_openapi")
            if path == "/v1/models":
                return 200, shape("llama_cpp_python_models", MODEL_PATH=mp)
        if k == "llama-server":
            if path == "/props":
                return 200, shape("llama_server_props", MODEL_PATH=mp)
            if path == "/v1/models":
                return 200, shape("llama_server_models", MODEL_PATH=mp)
            if path == "/lora-adapters":
                return 200, shape("llama_server_lora_adapters", ADAPTER_PATH=str(self.adapter)) if self.adapter else []
        if k == "ollama":
            if path == "/api/version":
                return 200, shape("ollama_version")
            if path == "/api/ps":
                return 200, shape("ollama_ps")
        if k == "openai" and path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": "smollm2-canary", "object": "model", "owned_by": "lab"}]}
        return 404, {"error": {"message": "Not Found"}}

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        if self.kind == "ollama" and path == "/api/show":
            if body.get("model") != "smollm2-canary:latest":
                return 404, {"error": f"model '{body.get('model')}' not found"}
            shown = shape("ollama_show", MODEL_SHA256=self.model_sha256, ADAPTER_SHA256=self.adapter_sha256)
            if not self.adapter:
                shown["modelfile"] = "\n".join(ln for ln in shown["modelfile"].splitlines() if not ln.startswith("ADAPTER"))
            return 200, shown
        routes = self.routes()
        if path not in routes:
            return 404, {"error": {"message": "Not Found"}}
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return self.fail_status, {"error": {"message": "busy", "code": self.fail_status}}
        chat = path == routes[1]
        prompt = "".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
        if self.context_chars is not None and len(prompt) > self.context_chars:
            return 400, {"error": {"message": f"This model's maximum context length is {self.context_chars} tokens",
                                   "type": "invalid_request_error", "code": "context_length_exceeded"}}
        asked = _asked_top(self.kind, chat, body)
        if asked and self.logprobs == "reject":
            if self.reject_status >= 500:
                return self.reject_status, shape("llama_cpp_python_logprobs_error")
            return self.reject_status, {"error": {"message": "logprobs must be less than or equal to 5",
                                                  "type": "invalid_request_error", "param": "logprobs"}}
        refuse = bool(self.policy(prompt))
        status, out = self._answer(chat, prompt, self.texts[refuse])
        if asked and self.logprobs == "give" and status == 200:
            ranked = sorted(self.top(prompt, refuse).items(), key=lambda kv: -kv[1])[:asked]
            out = _with_logprobs(self.kind, chat, out, dict(ranked))
        return status, out

    def _answer(self, chat: bool, prompt: str, text: str) -> tuple[int, Any]:
        n_prompt, n_out = len(prompt.encode("utf-8")), len(text.encode("utf-8"))
        if self.kind in ("llama-cpp-python", "openai"):
            out = shape("llama_cpp_python_chat" if chat else "llama_cpp_python_completion", MODEL_PATH=str(self.model_path))
            choice = out["choices"][0]
            if chat:
                choice["message"]["content"] = text
            else:
                choice["text"] = text
            out["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
            if self.drop_text:
                choice.pop("message" if chat else "text")
            return 200, out
        if self.kind == "llama-server":
            out = shape("llama_server_completion", MODEL_PATH=str(self.model_path))
            out.update(content=text, tokens=list(text.encode("utf-8")) + [0], tokens_evaluated=n_prompt,
                       tokens_predicted=n_out, stop_type="eos")
            out["timings"].update(prompt_n=n_prompt, predicted_n=n_out)
            return 200, out
        out = shape("ollama_generate")
        out.update(response=text, prompt_eval_count=n_prompt, eval_count=n_out)
        if chat:
            out.pop("response")
            out["message"] = {"role": "assistant", "content": text}
        return 200, out

