"""The first-token refusal margin's two readings (kvedge.detectors.openings): from a full distribution
(in-process) and from a server's top-N, on constructed cases over a one-byte-a-token vocabulary; and the
in-process fake path, which must read exactly what it read before servers gave margins."""

from __future__ import annotations

import math

import numpy as np
import pytest

from support.fakes import VOCAB, FakeRuntime, refuse_harmful_words
from kvedge.detectors.openings import FirstMargin, OpeningTokens, margin, opening_tokens, top_ids, top_margin
from kvedge.llama.decode import GenJob
from kvedge.llama.runtime import KVConfig, RuntimeOptions


def _bytes_vocab() -> OpeningTokens:
    return opening_tokens(lambda s: list(s.encode("utf-8")), lambda t: bytes(t).decode("utf-8", "replace"))


TOKENS = _bytes_vocab()
I, H, C, S, X = (ord(c) for c in "IHCSx")  # I, S open refusals; H, C compliance; x neither


def _lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def test_the_byte_vocabulary_splits_as_the_detector_reads():
    assert {I, S} <= set(TOKENS.refusal) and {H, C} <= set(TOKENS.compliance)
    assert X not in TOKENS.refusal + TOKENS.compliance and TOKENS.usable
    assert dict(zip(TOKENS.refusal, TOKENS.refusal_pieces))[I] == "I"


def test_top_margin_with_both_sides_is_the_formula_over_the_tokens_present():
    top = {I: -0.5, S: -2.0, H: -1.5, C: -3.0, X: -0.7}  # x opens neither side: left out
    assert top_margin(top, TOKENS) == pytest.approx(_lse(-0.5, -2.0) - _lse(-1.5, -3.0))
    assert top_ids(top, TOKENS) == {I: -0.5, S: -2.0, H: -1.5, C: -3.0}


@pytest.mark.parametrize("top", [
    {I: -0.1, S: -2.0, X: -3.0},  # no compliance opening in the top-N
    {H: -0.1, X: -1.0},  # no refusal opening
    {X: -0.1},
    {},
])
def test_a_side_missing_from_the_top_n_gives_none_not_a_guess(top):
    assert top_margin(top, TOKENS) is None


def test_token_texts_map_to_ids_through_the_opening_pieces():
    by_text = {"I": -0.5, "S": -2.0, "H": -1.5, "C": -3.0, "x": -0.7, "Hello": -4.0}  # "Hello" is no opening token
    by_id = {I: -0.5, S: -2.0, H: -1.5, C: -3.0}
    assert top_ids(by_text, TOKENS) == by_id
    assert top_margin(by_text, TOKENS) == pytest.approx(top_margin(by_id, TOKENS))


def test_a_text_that_stands_for_both_sides_is_left_out():
    # two tokens with one text, one on each side: the text cannot say which it is
    tokens = OpeningTokens((1, 2), (3,), ("I", "No"), ("I",))
    assert top_ids({"I": -0.1, "No": -1.0}, tokens) == {2: -1.0}
    assert top_margin({"I": -0.1, "No": -1.0}, tokens) is None  # no compliance token is known to be there


def test_without_both_sides_in_the_vocabulary_there_is_no_margin():
    tokens = OpeningTokens((1,), (), ("I",), ())
    assert top_margin({1: -0.1}, tokens) is None and margin(np.zeros(4), tokens) is None


def test_a_top_n_that_holds_every_opening_gives_the_full_distributions_margin():
    logits = np.random.default_rng(3).normal(0, 1, VOCAB)
    logits[list(TOKENS.refusal) + list(TOKENS.compliance)] += 8.0  # every opening above every other token
    logp = logits - np.log(np.exp(logits).sum())
    n = len(TOKENS.refusal) + len(TOKENS.compliance)
    top = {int(t): float(logp[t]) for t in np.argsort(-logp)[:n]}
    assert top_margin(top, TOKENS) == pytest.approx(margin(logp, TOKENS))
    # the margin of raw logits equals that of their log-probabilities: normalisation cancels
    assert margin(logits, TOKENS) == pytest.approx(margin(logp, TOKENS))


def test_first_margin_reads_logits_in_process_and_a_top_n_from_a_server():
    first = FirstMargin(TOKENS)
    logits = np.random.default_rng(0).normal(0, 2, VOCAB)
    assert first(logits) == margin(logits, TOKENS)
    assert first.from_top({I: -0.2, H: -1.0}) == pytest.approx(0.8)


def test_the_in_process_fake_path_is_unchanged():
    """FakeRuntime calls GenJob.first with its first-position logits, as the decoder does: the session's
    FirstMargin gives what the closure it replaced gave, the margin of those logits."""
    rt = FakeRuntime(KVConfig("q4_0", "q4_0"), True, RuntimeOptions(), refuse_harmful_words, None)
    toks = opening_tokens(rt.tokenize_piece, rt.detokenize)
    prompts = [rt.tokenize(t) for t in ("How do I build a bomb?", "What is the capital of France?")]
    got = {i: g.margin for i, g in rt.generate_many([GenJob(p, 16, first=FirstMargin(toks)) for p in prompts])}
    before = {i: g.margin for i, g in rt.generate_many(
        [GenJob(p, 16, first=lambda logits: margin(logits, toks)) for p in prompts])}
    assert got == before
    assert got[0] == margin(rt._first_logits(prompts[0], True), toks)  # the bomb is refused: leaning to "I"
    assert got[1] == margin(rt._first_logits(prompts[1], False), toks)
