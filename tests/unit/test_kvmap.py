"""Per-layer KV configs: parsing, canonical names and the native build's env syntax, without a model.
What needs the default model's shapes (resolving a map, per-layer bytes, layer ranges): tests/e2e/test_kvmap.py."""

import pytest

from kvedge.errors import KVTypeError
from kvedge.gguf.kvmap import KVConfig, parse_kv


def test_uniform_configs_are_what_they_were():
    assert parse_kv("q8_0") == KVConfig("q8_0", "q8_0") and not parse_kv("q8_0").per_layer
    assert parse_kv("k=q8_0/v=q4_0").name == "k=q8_0/v=q4_0"
    assert parse_kv("K=q5_1:V=iq4_nl") == KVConfig("q5_1", "iq4_nl")
    assert KVConfig("q8_0", "q4_0").key() == {"type_k": "q8_0", "type_v": "q4_0"}  # store keys unchanged
    assert KVConfig("q4_0", "q4_0").layer_types_env() is None

@pytest.mark.parametrize("bad, says", [
    ("q4_0@", "malformed layer override"), ("q4_0@19", "malformed layer override"), ("q4_0@x:q8_0", "malformed layers"),
    ("q4_0@5-3:q8_0", "empty layer range"), ("q4_0@1:q3_k", "unknown KV cache type"),
    ("k=q4_0@1:q8_0/k=q8_0", "malformed KV config"), ("k=q4_0@1:q8_0/x=q8_0", "malformed KV config"),
    ("q4_0@1+:q8_0", "malformed layers"),
])
def test_malformed_maps_are_refused(bad, says):
    with pytest.raises(KVTypeError, match=says):
        parse_kv(bad)
