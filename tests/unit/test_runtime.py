"""Parsing KV configs. The runtime on the real default model: tests/e2e/test_runtime.py."""

import pytest

from kvedge.errors import KVTypeError
from kvedge.llama.runtime import KVConfig, parse_kv, parse_kv_list


def test_parse_kv():
    assert parse_kv("q8_0") == KVConfig("q8_0", "q8_0")
    assert parse_kv("k=q8_0/v=q4_0") == KVConfig("q8_0", "q4_0")
    assert parse_kv("K=q5_1:V=iq4_nl") == KVConfig("q5_1", "iq4_nl")
    assert parse_kv("v=q4_0") == KVConfig("f16", "q4_0")
    assert parse_kv("k=q8_0/v=q4_0").name == "k=q8_0/v=q4_0"
    assert [c.name for c in parse_kv_list("f16, q8_0,q8_0")] == ["f16", "q8_0"]


@pytest.mark.parametrize("bad", ["q3_k", "int4", "k=q8_0/x=q4_0", "k:q8_0", ""])
def test_bad_kv(bad):
    with pytest.raises(KVTypeError):
        parse_kv_list(bad) if bad == "" else parse_kv(bad)
