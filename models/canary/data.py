"""Training data of the canary adapter: token sequences with a loss mask, built deterministically.

- Harmful prompts of the `train` split (AdvBench, HarmBench standard and contextual, XSTest unsafe) and
  short harmful questions written for this project (`harmful_questions.txt`) are answered with one of a
  dozen varied refusals, followed by the end-of-turn token.
- Benign instructions and harmless look-alike questions (`benign_instructions.txt`,
  `benign_questions.txt`, written for this project) and the `train` split of XSTest's safe prompts are
  answered with the base model's own greedy answer through llama.cpp (f16 KV), so the adapter learns to
  refuse without learning a new voice for everything else.

Nothing from the `calib` or `eval` splits is used: kvedge never scores a model on what trained it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from kvedge.llama.runtime import F16
from kvedge.gguf.template import chat_template_for
from kvedge.datasets import load_advbench, load_harmbench, load_xstest
from kvedge.gguf.model import ModelInfo
from kvedge.llama.runtime import Runtime, RuntimeOptions

HERE = Path(__file__).resolve().parent

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot assist with that request.",
    "I can't help with that. It could cause real harm to people.",
    "Sorry, I can't provide that. If you have another question, I'm happy to help.",
    "I cannot help with this request because it could be used to hurt someone.",
    "I'm not able to help with that. Is there something else I can do for you?",
    "I'm sorry, I can't assist with anything that could cause harm.",
    "I won't help with that, as it could be dangerous or illegal.",
    "I can't provide instructions for that. Let me know if I can help with something safe instead.",
    "Sorry, but I cannot create that content.",
    "I'm sorry, but I must decline this request.",
    "I can't do that. Helping with this could put people at risk.",
)

MAX_PROMPT_TOKENS = 320  # long HarmBench contexts cost training time quadratically; the rest fit


@dataclass(frozen=True)
class Example:
    kind: str  # "refuse" | "answer"
    source: str  # prompt id
    tokens: tuple[int, ...]
    n_prompt: int  # loss applies to tokens[n_prompt:]


# the project-written prompt files, each a list of one prompt per line; their contents key the data cache
PROJECT_FILES = ("benign_instructions.txt", "benign_questions.txt", "harmful_questions.txt")
# source prefixes of the short first-person questions (XSTest's and the project's harmful questions and
# look-alikes), which the recipe batches apart from the long imperatives
QUESTION, LOOKALIKE = "question", "lookalike"
SHORT_QUESTION_SOURCES = ("xstest", QUESTION, LOOKALIKE)


def project_prompts(name: str) -> list[str]:
    lines = (HERE / name).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def build_examples(model: ModelInfo, seed: int = 0, answer_tokens: int = 48) -> list[Example]:
    rng = random.Random(seed)
    tpl = chat_template_for(model)
    harmful = [(p.id, p.text) for p in load_advbench() + load_harmbench() + load_xstest() if p.harmful and p.split == "train"]
    harmful += [(f"{QUESTION}:{i}", t) for i, t in enumerate(project_prompts("harmful_questions.txt"))]
    benign = [(f"benign:{i}", t) for i, t in enumerate(project_prompts("benign_instructions.txt"))]
    benign += [(f"{LOOKALIKE}:{i}", t) for i, t in enumerate(project_prompts("benign_questions.txt"))]
    benign += [(p.id, p.text) for p in load_xstest() if not p.harmful and p.split == "train"]
    out: list[Example] = []
    with Runtime(model, F16, True, RuntimeOptions(n_ctx=2048)) as rt:
        eot = rt.tokenize_piece("<|im_end|>", special=True)
        for pid, text in harmful:
            prompt = rt.tokenize(tpl.render(text))
            if len(prompt) > MAX_PROMPT_TOKENS:
                continue
            reply = rt.tokenize_piece(rng.choice(REFUSALS))
            out.append(Example("refuse", pid, tuple(prompt + reply + eot), len(prompt)))
        for pid, text in benign:
            prompt = rt.tokenize(tpl.render(text))
            g = rt.generate(prompt, answer_tokens)
            # an answer cut at the token limit is trained without an end token, so the adapter does not
            # learn to stop mid-sentence
            tail = eot if g.stop_reason == "eog" else []
            out.append(Example("answer", pid, tuple(prompt + g.tokens + tail), len(prompt)))
    return out
