"""Per-layer KV configs on the default model's shapes (its header; no llama.cpp): canonical names, resolving
a map, per-layer bytes, layer ranges. Parsing alone: tests/unit/test_kvmap.py."""

import pytest

from kvedge.errors import KVTypeError
from kvedge.gguf.kvmap import KVConfig, parse_kv, parse_kv_list
from kvedge.gguf.model import inspect_model


@pytest.fixture(scope="module")
def model(model_path):
    return inspect_model(model_path)


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


def test_layers_out_of_range_are_refused(model):
    with pytest.raises(KVTypeError, match=f"names layer {model.n_layer}, but .* has layers 0-{model.n_layer - 1}"):
        parse_kv(f"q4_0@{model.n_layer}:q8_0").resolve(model)
