"""Loopback fakes of the server APIs kvedge talks to, for unit tests of the server audit's logic (probing,
provenance, the queue, retries, resume): each answers with the response shapes recorded in
tests/data/server_shapes (see its README for where each comes from), filling in the answer text and the
counts. The real thing runs in tests/e2e/test_server.py: llama-cpp-python's server on the real default model."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from support.fakes import ANSWER, REFUSAL

SHAPES = Path(__file__).parents[1] / "data" / "server_shapes"
HARMFUL_WORDS = ("bomb", "steal", "hack", "kill", "poison", "weapon")


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

    def detokenize(self, tokens: list[int]) -> str:
        return bytes(tokens).decode("utf-8", "replace")

    def close(self) -> None:
        pass


class FakeServer:
    """One server of `kind` (llama-server, llama-cpp-python, ollama, openai) on 127.0.0.1.

    `fail_next` answers that many generation requests with HTTP `fail_status` (503); `context_chars` answers prompts
    longer than that with the kind's context error; `stop()` and `start()` take it down and bring it
    back on the same port (a restart), optionally as another model (`model_path`)."""

    def __init__(self, kind: str, model_path: Path, model_sha256: str = "", adapter: Path | None = None,
                 adapter_sha256: str = "", policy: Callable[[str], bool] = refuses):
        self.kind, self.model_path, self.model_sha256 = kind, model_path, model_sha256
        self.adapter, self.adapter_sha256, self.policy = adapter, adapter_sha256, policy
        self.requests: list[tuple[str, str, Any]] = []
        self.fail_next = 0
        self.fail_status = 503
        self.context_chars: int | None = None
        self.drop_text = False  # answer without the text field (a broken or unknown API)
        self.port = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode("utf-8")
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
                self._send(status, out)

        ThreadingHTTPServer.allow_reuse_address = True
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self.url

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

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
        routes = {"llama-cpp-python": ("/v1/completions", "/v1/chat/completions"),
                  "openai": ("/v1/completions", "/v1/chat/completions"),
                  "llama-server": ("/completion", "/v1/chat/completions"),
                  "ollama": ("/api/generate", "/api/chat")}[self.kind]
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
        text = REFUSAL if self.policy(prompt) else ANSWER
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

