"""Export's choice as pure functions: the fixed sequence from the safest candidate down (by PCR's carrier
and KV bytes), PCR's prescription, the f16 fallback, and verify's recoveries with their paired intervals.
The judgement of each candidate is the one verdict function's (tests/unit/test_verdict.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvedge.gguf.kvmap import parse_kv
from kvedge.gguf.model import ModelInfo
from kvedge.llama.runtime import KVConfig
from kvedge.mitigate import candidates as cands
from kvedge.mitigate.export import Run
from kvedge.mitigate.verify import flip_recovery, margin_recovery


def _model() -> ModelInfo:
    return ModelInfo(Path("m.gguf"), "0" * 64, 1, "llama", "m", n_layer=30, n_head=9, n_head_kv=3, head_dim_k=64,
                     head_dim_v=64, n_ctx_train=8192, chat_template=None, file_type="Q4_1")


def test_the_sequence_runs_from_the_safest_down_along_the_carrier():
    base = KVConfig("q4_0", "q4_0")
    verdict = {"mode": "outlier-crushes-safety", "suggested": {"type_k": "q8_0", "type_v": "q4_0"}}
    order = cands.sequence(_model(), base, False, "K", True, verdict)
    assert [c.label for c in order] == [
        "k=q8_0/v=q4_0 rot=off", "k=q5_1/v=q4_0 rot=off", "k=q5_0/v=q4_0 rot=off", "k=q4_1/v=q4_0 rot=off",
        "k=iq4_nl/v=q4_0 rot=off", "q4_0 rot=off smoothed", "q4_0 rot=off"]
    b = [c.bytes_per_token(_model()) for c in order]
    assert b == sorted(b, reverse=True) and order[-1] == cands.Candidate("kv", base, False)
    # no unquantized cache in the ladder: f16 is the reference and the fallback, not a candidate
    assert all(c.kv.type_k != "f16" for c in order)
    both = cands.sequence(_model(), base, True, "K and V", False, {})
    assert [c.kv.name for c in both] == ["q8_0", "q5_1", "q5_0", "q4_1", "iq4_nl", "q4_0"]
    assert [c.kv for c in cands.sequence(_model(), base, True, "V", False, {})][0] == KVConfig("q4_0", "q8_0")


def test_the_k_transform_is_tested_right_after_the_widest_rung():
    # declared before any measurement: it costs no bytes over the unmitigated config, so it is tried before
    # the intermediate rungs, any of which (inconclusive) would otherwise keep it from ever being tested
    base = KVConfig("q4_0", "q4_0")
    order = cands.sequence(_model(), base, False, "K", True, {}, transformed=True)
    # the intermediate rungs leave: after the transform only candidates of no more bytes (the last shown
    # equivalent is deployed, so it must be the cheapest)
    assert [c.label for c in order] == ["k=q8_0/v=q4_0 rot=off", "q4_0 rot=off k-transform", "k=iq4_nl/v=q4_0 rot=off",
                                        "q4_0 rot=off smoothed", "q4_0 rot=off"]
    kt = order[1]
    assert kt.transformed and kt.modified and not kt.smoothed and kt.kv == base
    assert kt.bytes_per_token(_model()) == base.bytes_per_token(_model())  # 1.00x the unmitigated cache
    assert order[-1] == cands.Candidate("kv", base, False)
    assert not any(c.transformed for c in cands.sequence(_model(), base, False, "K", True, {}))
    # a sequence with nothing wider than the unmitigated config still tests the transform before it
    q8 = KVConfig("q8_0", "q8_0")
    assert [c.kind for c in cands.sequence(_model(), q8, True, "K", False, {}, transformed=True)] == ["k-transform", "kv"]


def test_prescription_is_the_smoothed_model_or_the_suggested_types():
    base = KVConfig("q4_0", "q4_0")
    verdict = {"mode": "outlier-crushes-safety", "suggested": {"type_k": "q8_0", "type_v": "q4_0"}}
    assert cands.prescription(verdict, base, False, smoothed=True).smoothed
    assert cands.prescription(verdict, base, False, smoothed=False) == cands.Candidate("kv", KVConfig("q8_0", "q4_0"), False)
    assert cands.prescription({"mode": "none"}, base, True, False) == cands.Candidate("kv", base, True)


def test_per_layer_candidates_join_the_sequence_by_their_bytes():
    m = _model()
    per_layer = cands.Candidate("per-layer", parse_kv("k=q4_0@11+17+19:q8_0/v=q4_0").resolve(m), False)
    assert per_layer.layer_types(m)[11] == ["q8_0", "q4_0"] and per_layer.layer_types(m)[0] == ["q4_0", "q4_0"]
    assert cands.Candidate("kv", KVConfig("q4_0", "q4_0"), False).layer_types(m) is None
    cands.PER_LAYER_SOURCES.append(lambda model, base, rot, verdict: [per_layer])
    try:
        order = cands.sequence(m, KVConfig("q4_0", "q4_0"), False, "K", False, {})
    finally:
        cands.PER_LAYER_SOURCES.clear()
    i = order.index(per_layer)
    assert order[i - 1].kv == KVConfig("q4_1", "q4_0") and order[i + 1].kv == KVConfig("iq4_nl", "q4_0")


def test_nothing_shown_equivalent_means_f16():
    unmit = cands.Candidate("kv", KVConfig("q4_0", "q4_0"), False)
    run = Run([unmit], unmit, unmit)
    assert run.final.kv == KVConfig("f16", "f16") and run.final.label == "f16"
    run.chosen = unmit
    assert run.final == unmit


def test_flip_recovery_is_two_sided_and_paired():
    ref = [True] * 10 + [False] * 10
    unmit = [True] * 8 + [False] * 2 + [True] * 4 + [False] * 6  # 2 lost, 4 gained: 6 flips
    mit = [True] * 10 + [True] * 1 + [False] * 9  # 1 flip
    r = flip_recovery(ref, mit, unmit)
    assert r.value == pytest.approx(1 - 1 / 6) and r.n == 20 and r.lo <= r.value <= r.hi
    assert flip_recovery(ref, unmit, unmit).value == pytest.approx(0.0)
    assert flip_recovery(ref, ref, ref).value is None  # nothing to recover


def test_margin_recovery_is_the_share_of_the_mean_shift_removed():
    ref = [0.0, 1.0, -1.0, 2.0]
    unmit = [0.8, 1.6, -0.4, 2.8]  # +0.7 on average
    mit = [0.2, 1.2, -0.8, 2.2]  # +0.2 on average
    r = margin_recovery(ref, mit, unmit)
    assert r.value == pytest.approx(1 - 0.2 / 0.7) and r.n == 4
    assert margin_recovery(ref, unmit, unmit).value == pytest.approx(0.0)
    assert margin_recovery([None], [1.0], [2.0]) is None  # no prompt with all three margins
