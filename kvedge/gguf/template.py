"""Chat templates from untrusted GGUF files, rendered only inside Jinja's immutable sandbox, in a child
process with a memory limit and a deadline.

A GGUF's `tokenizer.chat_template` is code written by whoever made the file (the CVE-2024-34359 class:
templates that walk `__globals__` to `os`). Jinja's sandbox forbids attribute access to Python internals
and mutation of passed-in objects; it does not bound time or memory (`'x' * 10**10`, nested loops, a
string doubled in a loop). So the sandbox runs in a child process of its own: an address-space limit
(Linux) turns a memory bomb into an error, a deadline kills a template that loops, and a size cap stops
one that floods output. Each ChatTemplate keeps one child for its lifetime and a cache of its renderings
(one round trip of well under a millisecond per new prompt).

Rendering is a pure function of the template, the messages and the render time: `strftime_now` reads a
time frozen when the ChatTemplate is made (the audit freezes it per audit directory), and Jinja's
random `lipsum` is removed, so a resumed audit renders every prompt exactly as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import TemplateError

if TYPE_CHECKING:
    from .model import ModelInfo

MAX_RENDERED_CHARS = 1_000_000
MAX_TEMPLATE_CHARS = 1_000_000  # real templates are under 20,000 characters
RENDER_SECONDS = 20.0  # per rendering (the first includes the child's start, ~0.2 s)
RENDER_MEMORY = 1 << 30  # the child's address space, where the platform enforces it (Linux)

# Used when a GGUF carries no template: plain ChatML, the format of most small instruct models.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""
    from_gguf: bool = True
    now: str = field(default_factory=_now)  # what `strftime_now` reads: ISO time, frozen
    _child: "_Renderer" = field(default=None, init=False, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_child", _Renderer(self.source, self.bos_token, self.eos_token, self.now))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    @property
    def uses_clock(self) -> bool:
        """Whether the template can call `strftime_now`: then what the model sees depends on `now`."""
        return self._child.uses_clock()

    def render(self, user_message: str, system: str | None = None) -> str:
        return self._child.render(_messages(user_message, system))

    def close(self) -> None:
        self._child.close()


def _messages(user_message: str, system: str | None) -> list[dict[str, str]]:
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user_message})
    return messages


def chat_template_for(model: "ModelInfo", now: str | None = None) -> ChatTemplate:
    """The model's own template, or ChatML (marked `from_gguf=False`, which the report says) if it has none.
    `now` (ISO time) is what a dated template renders; default: the current time, frozen from here on."""
    kw = {"now": now} if now else {}
    if model.chat_template:
        return ChatTemplate(model.chat_template, model.bos_token, model.eos_token, True, **kw)
    return ChatTemplate(FALLBACK_TEMPLATE, model.bos_token, model.eos_token, False, **kw)


# -- the parent's side -------------------------------------------------------------------------------


class _Renderer:
    """One sandboxed child per template, started on first use and ended with the template (or the
    process). Requests and answers are JSON lines on its stdin and stdout."""

    def __init__(self, source: str, bos: str, eos: str, now: str):
        self.setup = {"source": source, "bos": bos, "eos": eos, "now": now}
        self.proc: subprocess.Popen | None = None
        self.clock: bool | None = None
        self.cache: dict[str, str] = {}
        self.lock = threading.Lock()

    def _start(self) -> None:
        if len(self.setup["source"]) > MAX_TEMPLATE_CHARS:
            raise TemplateError(f"chat template of {len(self.setup['source']):,} characters exceeds "
                                f"{MAX_TEMPLATE_CHARS:,}")
        root = str(Path(__file__).resolve().parents[2])
        code = f"import sys; sys.path.insert(0, {root!r}); from kvedge.gguf.template import _serve; _serve()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            # its own session: a Ctrl-C meant for kvedge does not reach it (kvedge ends it on exit)
            start_new_session=os.name == "posix",
        )
        self.clock = self._ask(self.setup)["clock"]

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        fired = threading.Event()
        proc = self.proc

        def expire() -> None:
            fired.set()
            proc.kill()

        timer = threading.Timer(RENDER_SECONDS, expire)
        timer.start()
        try:
            self.proc.stdin.write(json.dumps(request).encode("utf-8") + b"\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError:
            line = b""
        finally:
            timer.cancel()
        if not line:
            self.close()
            if fired.is_set():
                raise TemplateError(f"chat template did not finish rendering within {RENDER_SECONDS:.0f} s "
                                    "(it loops or recurses without end)")
            raise TemplateError("chat template rendering ended its sandbox (it exhausted the memory limit)")
        answer = json.loads(line)
        if "error" in answer:
            raise TemplateError(answer["error"])
        return answer

    def uses_clock(self) -> bool:
        with self.lock:
            if self.proc is None:
                self._start()
            return bool(self.clock)

    def render(self, messages: list[dict[str, str]]) -> str:
        key = json.dumps(messages, sort_keys=True)
        with self.lock:
            if key not in self.cache:
                if self.proc is None:
                    self._start()
                self.cache[key] = self._ask({"messages": messages})["text"]
            return self.cache[key]

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.kill()
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            for pipe in (proc.stdin, proc.stdout):
                try:
                    pipe.close()  # type: ignore[union-attr]
                except OSError:
                    pass

    def __del__(self) -> None:
        self.close()


# -- the child's side ----------------------------------------------------------------------------------


def _raise(message: str) -> None:
    raise TemplateError(f"chat template raised: {message}")


def _environment(now: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.globals.pop("lipsum", None)  # random text: a rendering must be a function of its inputs
    env.globals["raise_exception"] = _raise
    frozen = datetime.fromisoformat(now)
    env.globals["strftime_now"] = lambda fmt: frozen.strftime(str(fmt))
    return env


def render_sandboxed(source: str, messages: list[dict[str, str]], bos_token: str, eos_token: str,
                     now: str | None = None, env=None) -> str:
    """Render in this process, in the sandbox with the output cap: what the child runs. Time and memory
    are bounded only by the child's limits, so kvedge renders untrusted templates through ChatTemplate."""
    from jinja2 import TemplateError as JinjaTemplateError
    from jinja2.sandbox import SecurityError

    env = env or _environment(now or _now())
    try:
        template = env.from_string(source)
        out: list[str] = []
        size = 0
        for chunk in template.generate(
            messages=messages, add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token
        ):
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                raise TemplateError(f"chat template output exceeds {MAX_RENDERED_CHARS:,} characters")
            out.append(chunk)
    except TemplateError:
        raise
    except SecurityError as exc:
        raise TemplateError(f"chat template blocked by the sandbox: {exc}") from None
    except MemoryError:
        raise TemplateError("chat template exhausted the memory limit of its sandbox") from None
    except RecursionError:
        raise TemplateError("chat template recursed too deeply") from None
    except (JinjaTemplateError, TypeError, ValueError, KeyError, AttributeError, OverflowError, IndexError,
            ZeroDivisionError) as exc:
        raise TemplateError(f"chat template failed to render: {str(exc)[:200]}") from None
    return "".join(out)


def _limit_memory() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (RENDER_MEMORY, RENDER_MEMORY))
    except (ImportError, ValueError, OSError):  # not enforceable here (Windows, macOS): the deadline still is
        pass


def _serve() -> None:
    """The child: the first line sets the template up, each further line renders one conversation."""
    _limit_memory()
    setup = json.loads(sys.stdin.readline())
    reply: dict[str, Any]
    try:
        from jinja2 import nodes

        env = _environment(setup["now"])
        # any use of the global is a Name node (a sandboxed template has no other way to reach globals)
        clock = any(n.name == "strftime_now" for n in env.parse(setup["source"]).find_all(nodes.Name))
        reply = {"clock": clock}
    except Exception as exc:  # a template that does not even parse: reported on every request
        env, reply = None, {"error": f"chat template does not parse: {str(exc)[:200]}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            if env is None:
                raise TemplateError(reply["error"])
            text = render_sandboxed(setup["source"], json.loads(line)["messages"], setup["bos"], setup["eos"],
                                    env=env)
            answer: dict[str, Any] = {"text": text}
        except TemplateError as exc:
            answer = {"error": str(exc)}
        except MemoryError:
            answer = {"error": "chat template exhausted the memory limit of its sandbox"}
        except Exception as exc:  # whatever else a hostile template provokes is its error, not kvedge's
            answer = {"error": f"chat template failed to render ({type(exc).__name__})"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
