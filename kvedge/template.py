"""Chat templates from untrusted GGUF files, rendered only inside Jinja's immutable sandbox.

A GGUF's `tokenizer.chat_template` is code written by whoever made the file. The sandbox forbids
attribute access to Python internals and mutation of passed-in objects; a size cap on the output stops
a template that loops to exhaust memory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from .errors import TemplateError

if TYPE_CHECKING:
    from .model import ModelInfo

MAX_RENDERED_CHARS = 1_000_000

# Used when a GGUF carries no template: plain ChatML, the format of most small instruct models.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""
    from_gguf: bool = True

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    def render(self, user_message: str, system: str | None = None) -> str:
        messages = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": user_message})
        return render_sandboxed(self.source, messages, self.bos_token, self.eos_token)


def chat_template_for(model: "ModelInfo") -> ChatTemplate:
    """The model's own template, or ChatML (marked `from_gguf=False`, which the report says) if it has none."""
    if model.chat_template:
        return ChatTemplate(model.chat_template, model.bos_token, model.eos_token, True)
    return ChatTemplate(FALLBACK_TEMPLATE, model.bos_token, model.eos_token, False)


def _raise(message: str) -> None:
    raise TemplateError(f"chat template raised: {message}")


def render_sandboxed(source: str, messages: list[dict[str, str]], bos_token: str, eos_token: str) -> str:
    from jinja2 import TemplateError as JinjaTemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        template = env.from_string(source)
        out: list[str] = []
        size = 0
        for chunk in template.generate(
            messages=messages, add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token
        ):
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                raise TemplateError("chat template output exceeds 1,000,000 characters")
            out.append(chunk)
    except TemplateError:
        raise
    except SecurityError as exc:
        raise TemplateError(f"chat template blocked by the sandbox: {exc}") from None
    except (JinjaTemplateError, TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        raise TemplateError(f"chat template failed to render: {exc}") from None
    return "".join(out)
