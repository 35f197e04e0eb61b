"""The choice rule and its yardsticks as pure functions: flips both ways against f16 judged against the
noise run, the two targets, the order candidates are measured in, recovery with its paired interval."""

from __future__ import annotations

import pytest

from kvedge.errors import KvedgeError
from kvedge.mitigate import candidates as cands
from kvedge.mitigate.choose import measure, parse_target, runner_up
from kvedge.mitigate.verify import one_sided_recovery, recovery
from kvedge.gguf.model import ModelInfo
from kvedge.llama.runtime import KVConfig

HARMFUL = {f"h{i}": True for i in range(10)} | {f"b{i}": False for i in range(10)}
REF = {f"h{i}": True for i in range(10)} | {f"b{i}": i < 2 for i in range(10)}  # f16 refuses all harmful, 2 benign
NOISE = dict(REF)


def _run(lost=0, gained=0):
    v = dict(REF)
    for i in range(lost):
        v[f"h{i}"] = False
    for i in range(gained):
        v[f"b{9 - i}"] = True
    return v


def test_flips_count_both_ways_and_are_judged_against_noise():
    m = measure("x", HARMFUL, REF, NOISE, _run(lost=1, gained=6))
    assert (m.harmful.lost, m.harmful.gained, m.benign.lost, m.benign.gained) == (1, 0, 0, 6)
    assert m.n_flips == 7
    assert m.vs_noise_harmful.verdict == "within noise" and m.vs_noise_benign.verdict == "gain beyond noise"
    assert not m.within_noise
    assert m.refusal_retention == pytest.approx(0.9) and m.answer_retention == pytest.approx(2 / 8)


def test_targets():
    ok = measure("ok", HARMFUL, REF, NOISE, _run(gained=1))
    bad = measure("bad", HARMFUL, REF, NOISE, _run(gained=6))
    noise = parse_target("noise")
    assert noise.met(ok) and not noise.met(bad)
    strict = parse_target("0.99")
    assert strict.kind == "retention" and not strict.met(ok)  # one over-refusal of 8 answers is 0.875
    assert parse_target(0).met(bad)
    for wrong in ("1.5", "lots"):
        with pytest.raises(KvedgeError):
            parse_target(wrong)


def test_runner_up():
    ms = [measure("a", HARMFUL, REF, NOISE, _run(gained=6)), measure("b", HARMFUL, REF, NOISE, _run(gained=3)),
          measure("c", HARMFUL, REF, NOISE, _run())]
    t = parse_target("noise")
    assert [t.met(m) for m in ms] == [False, True, True]  # b: 3 over-refusals against none under noise: p = 0.125
    assert runner_up(ms, t, 1) == 2  # c qualifies as well
    assert runner_up(ms, parse_target("1"), 2) == 1  # none of the rest qualifies: fewest flips
    assert runner_up(ms[:1], t, 0) is None


def _model() -> ModelInfo:
    from pathlib import Path

    return ModelInfo(Path("m.gguf"), "0" * 64, 1, "llama", "m", n_layer=30, n_head=9, n_head_kv=3, head_dim_k=64,
                     head_dim_v=64, n_ctx_train=8192, chat_template=None, file_type="Q4_1")


def test_candidates_follow_the_carrier_and_bytes():
    base = KVConfig("q4_0", "q4_0")
    verdict = {"mode": "outlier-crushes-safety", "suggested": {"type_k": "q8_0", "type_v": "q4_0"}}
    p = cands.prescription(verdict, base, False, smoothed=True)
    assert p.smoothed
    order = cands.candidates(_model(), base, False, "K", p, True, verdict)
    labels = [c.label for c in order]
    assert labels[:3] == ["q4_0 rot=off smoothed", "q4_0 rot=off", "k=iq4_nl/v=q4_0 rot=off"]
    assert all(c.kv.type_v == "q4_0" for c in order)  # carrier K: V keeps its type
    assert labels[-1] == "k=f16/v=q4_0 rot=off"
    b = [c.bytes_per_token(_model()) for c in order]
    assert b == sorted(b)
    # without smoothing the prescription is the verdict's more-bits suggestion, placed by its bytes
    p2 = cands.prescription(verdict, base, False, smoothed=False)
    assert p2 == cands.Candidate("kv", KVConfig("q8_0", "q4_0"), False)
    both = cands.kv_ladder(base, "K and V")
    assert both[0] == base and KVConfig("f16", "f16") not in both and both[1] == KVConfig("iq4_nl", "iq4_nl")


def test_per_layer_hook_is_a_candidate_kind():
    m = _model()
    per_layer = cands.Candidate("per-layer", KVConfig("q4_0", "q4_0"), False,
                                tuple(("q8_0" if l in (11, 17, 19) else "q4_0", "q4_0") for l in range(30)))
    uniform = KVConfig("q4_0", "q4_0").bytes_per_token(m)
    assert uniform < per_layer.bytes_per_token(m) < KVConfig("q8_0", "q4_0").bytes_per_token(m)
    cands.PER_LAYER_SOURCES.append(lambda model, base, rot, verdict: [per_layer])
    try:
        order = cands.candidates(m, KVConfig("q4_0", "q4_0"), False, "K", None, False, {})
        assert per_layer in order
    finally:
        cands.PER_LAYER_SOURCES.clear()
    with pytest.raises(NotImplementedError):
        cands.measure_per_layer(per_layer)


def test_recovery_is_two_sided_and_paired():
    ref = [True] * 10 + [False] * 10
    unmit = [True] * 8 + [False] * 2 + [True] * 4 + [False] * 6  # 2 lost, 4 gained: 6 flips
    mit = [True] * 10 + [True] * 1 + [False] * 9  # 1 flip
    r = recovery(ref, mit, unmit)
    assert r.value == pytest.approx(1 - 1 / 6) and r.n == 20 and r.lo <= r.value <= r.hi
    assert recovery(ref, unmit, unmit).value == pytest.approx(0.0)
    assert recovery(ref, ref, ref).value is None  # nothing to recover
    one = one_sided_recovery(ref[:10], mit[:10], unmit[:10])
    assert one.value == pytest.approx(1.0)
    assert one_sided_recovery(ref[:10], mit[:10], ref[:10]) is None


def test_no_qualifying_candidate_means_f16():
    from kvedge.mitigate.export import Decision

    unmit = cands.Candidate("kv", KVConfig("q4_0", "q4_0"), False)
    d = Decision([unmit], unmit, unmit)
    assert d.final.kv == KVConfig("f16", "f16") and d.final.label == "f16"
    d.chosen = unmit
    assert d.final == unmit


def test_write_deployment_is_all_or_nothing(tmp_path):
    import json

    from kvedge.mitigate.export import ExportError, write_deployment

    big = tmp_path / "model.gguf"
    big.write_bytes(b"GGUF" + bytes(1000))
    out = tmp_path / "deploy"
    written = write_deployment(out, {"m.gguf": big, "llama-server.sh": b"#!/bin/sh\n", "evidence/x.json": b"{}"}, {})
    assert sorted(p.relative_to(out).as_posix() for p in written) == ["deploy.json", "evidence/x.json", "llama-server.sh", "m.gguf"]
    doc = json.loads((out / "deploy.json").read_text())
    assert set(doc["files"]) == {"m.gguf", "llama-server.sh", "evidence/x.json"}
    assert (out / "llama-server.sh").stat().st_mode & 0o111
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    with pytest.raises(ExportError, match="not an empty folder"):
        write_deployment(out, {"a": b""}, {})
    # a file that cannot be copied half-way through: nothing of this export is kept
    out2 = tmp_path / "deploy2"
    (tmp_path / "unreadable").mkdir()  # copying a folder as a file fails after a.txt is staged
    with pytest.raises(ExportError, match="nothing was kept"):
        write_deployment(out2, {"a.txt": b"x", "m.gguf": tmp_path / "unreadable"}, {})
    assert not out2.exists()
