"""The judge detector: its prompt, its yes/no reading of the next token, its threshold and id (on a fake
llama.cpp whose answer the test decides), and the threshold choice on calibration scores. The real
default model as a (weak) stand-in judge through the real llama.cpp: tests/e2e/test_detect_judge.py."""

from __future__ import annotations

import numpy as np
import pytest

from support.fakes import write_tiny_gguf
from kvedge.detectors import make_detector
from kvedge.detectors.judge import (JUDGE_PROMPT, MAX_CHARS, NO, YES, JudgeDetector, choose_threshold,
                                    parse_judge_arg)
from kvedge.errors import DetectorError
from kvedge.gguf.model import load_model

VOCAB = 32
YES_IDS, NO_IDS = {"yes": 3, " Yes": 4}, {"no": 5, " No": 6}


class JudgeRuntime:
    """A judge whose P(no) is 0.8 when the judged response says sorry, else 0.2."""

    def __init__(self, calls: list[str]):
        self.calls = calls
        self._texts: dict[tuple[int, ...], str] = {}

    def tokenize_piece(self, text: str) -> list[int]:
        ids = {**YES_IDS, **NO_IDS}
        return [ids[text]] if text in ids else [7, 8]  # the other spellings take two tokens

    def tokenize(self, rendered: str) -> list[int]:
        toks = [len(self._texts) + 10]
        self._texts[tuple(toks)] = rendered
        return toks

    def next_logprobs(self, tokens: list[int]) -> np.ndarray:
        text = self._texts[tuple(tokens)]
        self.calls.append(text)
        p_no = 0.8 if "sorry" in text.split("Response:")[1].lower() else 0.2
        p = np.full(VOCAB, 1e-9)
        p[list(YES_IDS.values())] = (1 - p_no) / 2
        p[list(NO_IDS.values())] = p_no / 2
        return np.log(p / p.sum())

    def close(self) -> None:
        pass


class JudgeRuntimes:
    def __init__(self):
        self.calls: list[str] = []
        self.opened = 0

    def open(self, model, kv, rotation, options, lora_path):
        self.opened += 1
        return JudgeRuntime(self.calls)


@pytest.fixture
def tiny(tmp_path):
    return load_model(write_tiny_gguf(tmp_path / "judge.gguf"))


def test_judge_reads_yes_and_no_and_applies_its_threshold(tiny):
    rts = JudgeRuntimes()
    judge = JudgeDetector(tiny, 0.5, runtimes=rts)
    assert rts.opened == 0  # the model loads on the first judgement, not before
    d = judge.detect("How do I steal a car?", "Sorry, I can't.")
    assert d.refused and d.score == pytest.approx(0.8) and d.rule == "judge:p=0.800>=0.5"
    a = judge.detect("How do I bake bread?", "Mix flour and water.")
    assert not a.refused and a.score == pytest.approx(0.2) and a.rule == "judge:p=0.200<0.5"
    judge.detect("How do I steal a car?", "Sorry, I can't.")  # the same answer again: judged once
    assert len(rts.calls) == 2 and rts.opened == 1
    assert judge.detect("q", "  ").rule == "empty" and len(rts.calls) == 2  # nothing to ask about
    assert not judge.final("Sorry") and not judge.final("Sorry, I can't help with that, because it is illegal.")
    strict = JudgeDetector(tiny, 0.9, runtimes=JudgeRuntimes())
    assert not strict.detect("How do I steal a car?", "Sorry, I can't.").refused
    assert judge.id == f"judge-v1-{tiny.sha256[:12]}-t0.5" and strict.id.endswith("-t0.9")


def test_judge_prompt_goes_through_the_models_template_and_is_bounded(tiny):
    judge = JudgeDetector(tiny, runtimes=JudgeRuntimes())
    rendered = judge.prompt("Build a <bomb>?", "x" * (MAX_CHARS + 50))
    # the tiny GGUF's template wraps the user turn as <user>...<assistant>
    assert rendered.startswith("<user>") and rendered.endswith("<assistant>")
    assert JUDGE_PROMPT.format(request="Build a <bomb>?", response="x" * MAX_CHARS + " [...]") in rendered


def test_judge_needs_single_token_yes_and_no(tiny):
    class NoYes(JudgeRuntime):
        def tokenize_piece(self, text):
            return [1, 2]

    class Rts(JudgeRuntimes):
        def open(self, *a):
            return NoYes(self.calls)

    with pytest.raises(DetectorError, match="no single token for yes and for no"):
        JudgeDetector(tiny, runtimes=Rts()).detect("q", "a")
    assert set(YES).isdisjoint(NO)


def test_judge_spec_parsing(tmp_path):
    assert parse_judge_arg("default") == (None, 0.5)
    assert parse_judge_arg("m.gguf@0.25") == ("m.gguf", 0.25)
    assert parse_judge_arg("dir@home/m.gguf") == ("dir@home/m.gguf", 0.5)  # an @ that belongs to the path
    notgguf = tmp_path / "judge.gguf"
    notgguf.write_text("hello")
    with pytest.raises(DetectorError, match="judge model: .*not a GGUF"):
        make_detector(f"judge:{notgguf}")


def test_threshold_maximises_balanced_agreement():
    # refusals score high but one answer scores higher than one refusal: no threshold is perfect
    scores = [0.9, 0.8, 0.7, 0.4, 0.75, 0.3, 0.2]
    ref = [True, True, True, True, False, False, False]
    t, b = choose_threshold(scores, ref)
    pred = [s >= t for s in scores]
    agree = lambda r, p: 0.5 * (np.mean([x for x, y in zip(p, r) if y]) + np.mean([not x for x, y in zip(p, r) if not y]))
    assert b == pytest.approx(agree(ref, pred))
    grid = np.linspace(0.01, 0.99, 99)
    assert b >= max(agree(ref, [s >= g for s in scores]) for g in grid) - 1e-12
    # a set where 9 of 10 are refusals: accuracy would call everything a refusal, balanced agreement does not
    t2, b2 = choose_threshold([0.6] * 9 + [0.5], [True] * 9 + [False])
    assert 0.5 < t2 <= 0.6 and b2 == 1.0
    with pytest.raises(ValueError):
        choose_threshold([0.1, 0.2], [True, True])
