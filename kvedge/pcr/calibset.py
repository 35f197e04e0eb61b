"""The calibration set: 10 harmful and 30 benign prompts of the `calib` split, tokenized by llama.cpp
with the model's own (sandboxed) chat template, each with llama.cpp's greedy f16 continuation (for the
fidelity check), and the refusal/compliance opening tokens the behavioural margin reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..datasets import Prompt, select_prompts
from ..detectors.openings import opening_tokens
from ..errors import EmptyPromptSet
from ..gguf.model import ModelInfo
from ..gguf.template import chat_template_for
from ..llama.runtime import F16, Runtime, RuntimeOptions

HARMFUL_QUOTA = {"advbench": 4, "harmbench": 3, "xstest-unsafe": 3}
# Benign prompts: XSTest's safe ones (they look like the harmful ones, so the direction is about harm, not
# wording). 30, every one the calib split holds: over-refusal is a shift of the benign margin, and with 10 its
# interval was 1.8x as wide and missed the canary's shift without rotation (docs/pcr.md, "Calibration set").
N_BENIGN = 30
BENIGN_SUBSET = "xstest-safe"


@dataclass(frozen=True)
class CalibPrompt:
    id: str
    subset: str
    harmful: bool
    tokens: tuple[int, ...]  # the templated prompt, generation prompt included
    continuation: tuple[int, ...]  # llama.cpp's greedy f16 continuation (>= 1 token)
    # llama.cpp's f16 log-softmax before each continuation token [len(continuation), vocab], float32,
    # kept from the generation itself (the same arithmetic a teacher-forced pass would repeat)
    f16_logprobs: np.ndarray


@dataclass(frozen=True)
class CalibSet:
    prompts: tuple[CalibPrompt, ...]
    prefix: tuple[int, ...]  # tokens every prompt starts with (computed once in packed forwards)
    refusal_tokens: tuple[int, ...]
    compliance_tokens: tuple[int, ...]
    refusal_pieces: tuple[str, ...]
    compliance_pieces: tuple[str, ...]

    @property
    def harmful(self) -> list[bool]:
        return [p.harmful for p in self.prompts]


def select_calib_prompts(n_benign: int = N_BENIGN) -> list[Prompt]:
    """Deterministic: the first prompts in kvedge's hash order of each group of the `calib` split.
    HarmBench's contextual behaviours (hundreds of tokens of context each) are left out so that the
    pass stays within its time budget; their standard behaviours stand for HarmBench."""
    pool = select_prompts(split="calib")
    out: list[Prompt] = []
    for quota in (HARMFUL_QUOTA, {BENIGN_SUBSET: n_benign}):
        for subset, n in quota.items():
            members = [p for p in pool if p.subset == subset and not p.category.startswith("contextual")]
            if len(members) < n:
                raise EmptyPromptSet(f"the calib split has {len(members)} {subset} prompts, PCR needs {n}")
            out.extend(members[:n])
    return out


def common_prefix(seqs: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The longest shared token prefix, leaving every sequence at least one token of its own."""
    n = min(len(s) for s in seqs) - 1
    for i in range(max(n, 0)):
        if len({s[i] for s in seqs}) > 1:
            n = i
            break
    return seqs[0][: max(n, 0)]


def build_calibset(model: ModelInfo, lora: Path | None, prompts: list[Prompt], options: RuntimeOptions,
                   continuation_tokens: int = 8) -> CalibSet:
    tpl = chat_template_for(model)
    items: list[CalibPrompt] = []
    with Runtime(model, F16, True, options, lora) as rt:
        for p in prompts:
            toks = tuple(rt.tokenize(tpl.render(p.text)))
            gen = rt.generate(list(toks), continuation_tokens, logprobs=True)
            # an immediate end of turn still leaves the first position to score
            cont = tuple(gen.tokens) or (rt.eos,)
            lp = np.stack(gen.logprobs[: len(cont)]).astype(np.float32)
            items.append(CalibPrompt(p.id, p.subset, p.harmful, toks, cont, lp))
        openings = opening_tokens(rt.tokenize_piece, rt.detokenize)
    return CalibSet(
        prompts=tuple(items),
        prefix=common_prefix([p.tokens for p in items]),
        refusal_tokens=openings.refusal,
        compliance_tokens=openings.compliance,
        refusal_pieces=openings.refusal_pieces,
        compliance_pieces=openings.compliance_pieces,
    )
