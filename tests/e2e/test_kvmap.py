"""Per-layer KV configs: parsing, canonical names, per-layer bytes and the native build's env syntax.
Pure logic on the default model's shapes (no llama.cpp)."""

import pytest

from kvedge.errors import KVTypeError
from kvedge.gguf.kvmap import KVConfig, parse_kv, parse_kv_list
from kvedge.gguf.model import inspect_model


@pytest.fixture(scope="module")
def model(model_path):
    return inspect_model(model_path)


def test_uniform_configs_are_what_they_were():
    assert parse_kv("q8_0") == KVConfig("q8_0", "q8_0") and not parse_kv("q8_0").per_layer
    assert parse_kv("k=q8_0/v=q4_0").name == "k=q8_0/v=q4_0"
    assert parse_kv("K=q5_1:V=iq4_nl") == KVConfig("q5_1", "iq4_nl")
    assert KVConfig("q8_0", "q4_0").key() == {"type_k": "q8_0", "type_v": "q4_0"}  # store keys unchanged
    assert KVConfig("q4_0", "q4_0").layer_types_env() is None


def test_per_layer_syntax_and_canonical_name(model):
    c = parse_kv("k=q4_0@19+17+11:q8_0/v=q4_0")
    assert c == KVConfig("q4_0", "q4_0", ((11, "q8_0"), (17, "q8_0"), (19, "q8_0")), ())
    assert c.per_layer and c.name == "k=q4_0@11+17+19:q8_0/v=q4_0"
    assert parse_kv(c.name) == c
    assert c.layer_types_env() == "k=11:q8_0,17:q8_0,19:q8_0"
    both = parse_kv("q4_0@0-3:q8_0@29:f16@2:q4_0")  # later overrides win; K and V alike
    assert both.name == "q4_0@0-1+3:q8_0@29:f16"
    assert both.layer_types_env() == "k=0-1:q8_0,3:q8_0,29:f16;v=0-1:q8_0,3:q8_0,29:f16"
    assert parse_kv("k=q4_0@11:q8_0:v=q4_0") == parse_kv("k=q4_0@11:q8_0/v=q4_0")  # the old `:` separator
    # a --kv list of configs: commas separate configs, never a map's parts
    assert [x.name for x in parse_kv_list("f16,q4_0@19:q8_0,q4_0")] == ["f16", "q4_0@19:q8_0", "q4_0"]


def test_resolve_makes_one_spelling_per_map(model):
    n = model.n_layer
    top = parse_kv("k=q4_0@11+17+19:q8_0/v=q4_0").resolve(model)
    assert top == parse_kv("k=q8_0@0-10+12-16+18+20-29:q4_0/v=q4_0").resolve(model)
    assert parse_kv(f"q4_0@0-{n - 1}:q8_0").resolve(model) == KVConfig("q8_0", "q8_0")  # every layer alike: uniform
    # a tie goes to kvtypes' order (q8_0 before q4_0)
    assert parse_kv(f"k=q4_0@0-{n // 2 - 1}:q8_0/v=q4_0").resolve(model).type_k == "q8_0"
    assert top.types("k", n)[19] == "q8_0" and top.types("k", n)[18] == "q4_0"
    assert set(top.types("v", n)) == {"q4_0"}


def test_bytes_per_token_sums_the_layers(model):
    n, row = model.n_layer, model.n_embd_k_gqa
    q4 = KVConfig("q4_0", "q4_0").bytes_per_token(model)
    q8 = KVConfig("q8_0", "q8_0").bytes_per_token(model)
    assert q4 == n * 2 * row * 18 // 32 and q8 == n * 2 * row * 34 // 32
    top = parse_kv("k=q4_0@11+17+19:q8_0/v=q4_0").resolve(model)
    assert top.bytes_per_token(model) == q4 + 3 * row * (34 - 18) // 32


@pytest.mark.parametrize("bad, says", [
    ("q4_0@", "malformed layer override"), ("q4_0@19", "malformed layer override"), ("q4_0@x:q8_0", "malformed layers"),
    ("q4_0@5-3:q8_0", "empty layer range"), ("q4_0@1:q3_k", "unknown KV cache type"),
    ("k=q4_0@1:q8_0/k=q8_0", "malformed KV config"), ("k=q4_0@1:q8_0/x=q8_0", "malformed KV config"),
    ("q4_0@1+:q8_0", "malformed layers"),
])
def test_malformed_maps_are_refused(bad, says):
    with pytest.raises(KVTypeError, match=says):
        parse_kv(bad)


def test_layers_out_of_range_are_refused(model):
    with pytest.raises(KVTypeError, match=f"names layer {model.n_layer}, but .* has layers 0-{model.n_layer - 1}"):
        parse_kv(f"q4_0@{model.n_layer}:q8_0").resolve(model)
