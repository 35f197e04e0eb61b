"""PCR's per-layer map search and the torch side of per-layer maps: pure logic, a constructed evaluator
(the e2e PCR test runs the real search on the canary)."""

import pytest

pytest.importorskip("torch")

from kvedge.gguf.kvmap import KVConfig, parse_kv  # noqa: E402
from kvedge.gguf.model import inspect_model  # noqa: E402
from kvedge.pcr.classify import Diagnosis  # noqa: E402
from kvedge.pcr.layermap import ranking, search_layer_map, upgraded  # noqa: E402
from kvedge.pcr.run import scheme_label  # noqa: E402
from kvedge.pcr.torch.kvquant import CachePlan, parse_scheme  # noqa: E402
from kvedge.results.pcr import CacheRun, LayerMap, NoiseFloor  # noqa: E402
from kvedge.stats import Estimate  # noqa: E402


@pytest.fixture(scope="module")
def model(model_path):
    return inspect_model(model_path)


def _verdict(mode="outlier-crushes-safety", carrier="K"):
    return Diagnosis(mode, carrier, (), "", {})


def _est(v, half=0.02):
    return Estimate(v, v - half, v + half, 10, "bootstrap")


def _run(benign, harmful=0.0):
    """A run whose benign margin shifts `benign` nats toward refusal and harmful `harmful` (signed)."""
    return CacheRun(_est(0.0), _est(0.0), _est(-harmful), _est(harmful), _est(benign), 0.0, _est(0.0), None)


NOISE = NoiseFloor("f32", _est(0.0, 1e-4), 1e-4, _est(0.0, 1e-4), 1e-4, _est(0.0, 1e-3), 1e-3, _est(0.0, 1e-3), 1e-3)


def _chosen(lm: LayerMap):
    return parse_kv(lm.chosen.kv) if lm.chosen else None


def test_plan_of_a_map_stores_each_layer_as_the_map_says(model):
    kv = parse_kv("k=q4_0@11+17+19:q8_0/v=q4_0").resolve(model)
    plan = CachePlan.of(kv, False)
    assert plan.scheme(11, "k") == parse_scheme("q8_0:norot") and plan.scheme(12, "k") == parse_scheme("q4_0:norot")
    assert plan.scheme(11, "v") == parse_scheme("q4_0:norot")
    assert CachePlan.of(kv, False, v=False).scheme(11, "v").name == "f16"  # K alone: V stays f16
    only = CachePlan.of(kv, False, v=False, layers=frozenset({17}))
    assert only.scheme(17, "k").name == "q8_0" and only.scheme(16, "k").name == "f16" and only.first_layer == 17
    assert only.stored_at(16, "k") is None and only.stored_at(17, "k").name == "q8_0"
    # a uniform config gives exactly the plan PCR has always run
    assert CachePlan.of(KVConfig("q4_0", "q4_0"), True) == CachePlan(parse_scheme("q4_0"), parse_scheme("q4_0"))
    # f16 and f32 caches are the reference's own (flash attention reads both as f16)
    assert CachePlan.of(KVConfig("f32", "q8_0"), True) == CachePlan(None, parse_scheme("q8_0"))
    assert CachePlan(k_at=((5, parse_scheme("q8_0")),)).first_layer == 5
    assert scheme_label(kv, "k", False) == "q4_0@11+17+19:q8_0:norot" and scheme_label(kv, "v", False) == "q4_0:norot"


def test_upgrade_and_ranking(model):
    kv = KVConfig("q4_0", "q4_0")
    up = upgraded(kv, [19, 17], ("k",), model)
    assert up.name == "k=q4_0@17+19:q8_0/v=q4_0"
    assert upgraded(up, [19, 3], ("k", "v"), model).name == "k=q4_0@3+17:q8_0@19:f16/v=q4_0@3+19:q8_0"
    assert upgraded(kv, list(range(model.n_layer)), ("k",), model) == KVConfig("q8_0", "q4_0")
    assert ranking({0: 0.1, 1: 0.3, 2: -0.1}, {0: 0.0, 1: 0.0, 2: 0.5}, ("k",)) == [1, 0]
    assert ranking({0: 0.1, 1: 0.3, 2: -0.1}, {0: 0.0, 1: 0.0, 2: 0.5}, ("k", "v")) == [2, 1, 0]


def test_search_returns_the_first_safe_prefix(model):
    per_k = {l: 0.0 for l in range(model.n_layer)}
    per_k.update({19: 0.05, 17: 0.03, 11: 0.02, 4: 0.01})
    per_v = {l: 0.0 for l in range(model.n_layer)}
    seen = []

    def evaluate(cand):  # the benign shift falls with each protected layer: safe from three layers on
        seen.append(cand)
        n = len(cand.layers_k) if cand.type_k == "q4_0" else model.n_layer
        return _run(max(0.0, 0.15 - 0.03 * n))

    kv = KVConfig("q4_0", "q4_0")
    lm = search_layer_map(_verdict(), kv, "benign", per_k, per_v, model, NOISE, evaluate)
    assert lm.searched and lm.ranking == (19, 17, 11, 4)
    assert [r.layers for r in lm.tried] == [(19,), (17, 19), (11, 17, 19)]
    c = lm.chosen
    assert c.kv == "k=q4_0@11+17+19:q8_0/v=q4_0" and c.safe and c.margin_shift_benign.hi < 0.1
    assert lm.population == "benign" and not lm.tried[1].safe
    assert c.bytes_per_token == parse_kv(c.kv).resolve(model).bytes_per_token(model)
    assert c.vs_audited == pytest.approx(c.bytes_per_token / kv.bytes_per_token(model))
    assert lm.uniform_upgrade.kv == "k=q8_0/v=q4_0" and seen[-1] == KVConfig("q8_0", "q4_0")
    assert _chosen(lm) == parse_kv(c.kv)
    # the document keeps its shape: rows name their layers, the uniform upgrade does not, and it reads back
    doc = lm.to_dict()
    assert list(doc["tried"][0])[0] == "layers" and "layers" not in doc["uniform_upgrade"]
    assert LayerMap.from_dict(doc) == lm


def test_search_only_for_concentrated_verdicts_and_says_when_nothing_is_safe(model):
    per = {l: 0.01 for l in range(model.n_layer)}
    kv = KVConfig("q4_0", "q4_0")
    for mode in ("none", "multi-layer dilution"):
        lm = search_layer_map(_verdict(mode), kv, "harmful", per, per, model, NOISE, lambda c: pytest.fail("ran"))
        assert not lm.searched and lm.reason.startswith(f"verdict {mode}")
        assert lm.to_dict() == {"searched": False, "reason": lm.reason}  # no `chosen` key when not searched
    lm = search_layer_map(_verdict("outlier-as-safety", "K and V"), kv, "benign", per, per, model, NOISE,
                          lambda c: _run(0.3), max_layers=4)
    assert lm.chosen is None and len(lm.tried) == 4
    assert lm.tried[-1].kv.startswith("q4_0@0-3:q8_0")  # both caches, ties ranked by layer
    assert _chosen(lm) is None and lm.to_dict()["chosen"] is None  # searched: `chosen` is there, null


def test_a_map_is_safe_only_when_both_populations_are():
    """Curing over-refusal by losing refusals is no cure: the criterion reads both populations, each in the
    direction that fails it (a harmful shift toward refusal, or a benign one away from it, is fine)."""
    from kvedge.pcr.layermap import predicted_safe

    assert predicted_safe(_run(0.0, 0.0))
    assert not predicted_safe(_run(0.0, -0.3))  # harmful prompts lose refusal margin
    assert not predicted_safe(_run(0.3, 0.0))  # benign prompts gain it
    assert predicted_safe(_run(-0.3, 0.3))  # both move the way that fails neither
