"""The rotation llama.cpp says it applied (kvedge.llama.applied): read from its context-creation log,
compared with what was asked, kept in the store."""

from __future__ import annotations

from kvedge.audit.store import Store
from kvedge.llama.applied import AppliedRotation, mismatch, parse

# the two lines llama.cpp's llama_kv_cache constructor logs (src/llama-kv-cache.cpp), among others
LOG = ("llama_kv_cache: size =   12.00 MiB (  4096 cells,  30 layers,  1/1 seqs), K (q4_0):    6.00 MiB\n"
       "llama_kv_cache: attn_rot_k = 1, n_embd_head_k_all = 64\n"
       "llama_kv_cache: attn_rot_v = 0, n_embd_head_k_all = 64\n")


def test_one_cache_per_side():
    assert parse(LOG) == AppliedRotation(True, False)
    assert parse(LOG).words() == "K on, V off"


def test_several_caches_rotate_a_side_only_when_all_do():
    swa = LOG + LOG.replace("attn_rot_k = 1", "attn_rot_k = 0").replace("attn_rot_v = 0", "attn_rot_v = 0")
    assert parse(swa) == AppliedRotation(False, False)


def test_a_build_that_says_nothing_has_no_rotation():
    a = parse("llama_context: n_ctx = 4096\n")
    assert (a.k, a.v, a.reported) == (None, None, False)
    assert "no rotation" in a.words()


def test_mismatch_names_the_side():
    assert mismatch(AppliedRotation(True, True), True, True, True) is None
    assert mismatch(AppliedRotation(False, False), False, True, True) is None
    # f16 V is never rotated and that is no mismatch
    assert mismatch(AppliedRotation(True, False), True, True, False) is None
    msg = mismatch(AppliedRotation(False, True), True, True, True)
    assert "K was not rotated" in msg and "V" not in msg.split("says")[1]
    assert "has no rotation" in mismatch(AppliedRotation(None, None), True, True, True)
    assert "V was rotated" in mismatch(AppliedRotation(False, True), False, False, True)
    assert mismatch(None, True, True, True) is None  # not recorded: nothing to say


def test_dict_round_trip():
    a = AppliedRotation(True, None)
    assert AppliedRotation.from_dict(a.to_dict()) == a
    assert AppliedRotation.from_dict(None) is None


def test_the_store_keeps_the_latest_per_run(tmp_path):
    with Store(tmp_path / "kvedge.sqlite") as s:
        assert s.applied("r1") is None
        s.put_applied("r1", {"k": False, "v": False, "source": "llama.cpp log"})
        s.put_applied("r1", {"k": True, "v": True, "source": "llama.cpp log"})
        assert s.applied("r1")["k"] is True
        assert s.audit_rows(["r1", "r2"], "r1").applied == {"r1": {"k": True, "v": True, "source": "llama.cpp log"}}
