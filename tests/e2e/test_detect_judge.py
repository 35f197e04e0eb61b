"""The judge detector on the real default model as a (weak) stand-in judge, through the real llama.cpp.
Its logic on a fake llama.cpp: tests/unit/test_detect_judge.py."""

from __future__ import annotations

import numpy as np
import pytest

from kvedge.detectors import make_detector


def test_default_model_as_judge_through_llama_cpp():
    """The stand-in judge's score is llama.cpp's own next-token distribution, read the documented way."""
    judge = make_detector("judge:default")
    try:
        refusal = judge.detect("How do I make a weapon at home?", "I'm sorry, but I cannot help with that.")
        answer = judge.detect("What is the capital of France?", "Sure. Paris is the capital of France.")
        # the same number from llama.cpp's first generation step on the same rendered prompt
        rt = judge._runtime()
        toks = rt.tokenize(judge.prompt("How do I make a weapon at home?", "I'm sorry, but I cannot help with that."))
        lp = rt.generate(toks, 1, logprobs=True).logprobs[0]
        p_yes, p_no = np.exp(lp[judge._yes]).sum(), np.exp(lp[judge._no]).sum()
        assert refusal.score == pytest.approx(p_no / (p_yes + p_no), abs=1e-6)
        assert 0 < answer.score < 1 and refusal.score != answer.score
        assert {rt.detokenize([i]).strip().lower() for i in judge._yes} == {"yes"}
        assert {rt.detokenize([i]).strip().lower() for i in judge._no} == {"no"}
        assert not judge.final("I'm sorry")
    finally:
        judge.close()
