"""The K-cache transform in simulation (mitigate/ktransform_sim.py): the scale fit's normalisation, the read-back
(identity without a quantizer; equal to what the deployment computes with Q scaled and no mu added back, for any
cache), and the decision rule (two-sided in both populations, chosen only when better). Small synthetic tensors
and a tiny in-memory model; nothing is loaded from disk."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvedge.gguf.archs import ARCHS  # noqa: E402
from kvedge.gguf.kvmap import KVConfig  # noqa: E402
from kvedge.gguf.ktransform import KTransform  # noqa: E402
from kvedge.gguf.model import Geometry  # noqa: E402
from kvedge.mitigate.ktransform_sim import (  # noqa: E402
    AMAX_FLOOR,
    RECIPES,
    KRecipe,
    KStats,
    KTransformChoice,
    choose_k_transform,
    decide,
    fit,
    fit_scale,
    k_statistics,
    objective,
    transformed,
)
from kvedge.mitigate.simulate import REALIZATIONS, Scored  # noqa: E402
from kvedge.pcr.calibset import CalibPrompt, CalibSet  # noqa: E402
from kvedge.pcr.engine import Engine  # noqa: E402
from kvedge.pcr.torch.gguf_torch import Hparams, Layer, Linear, TorchModel, causal_attention  # noqa: E402
from kvedge.pcr.torch.kvquant import cache_roundtrip, parse_scheme  # noqa: E402

N_LAYER, N_HEAD, N_HEAD_KV, HEAD_DIM, N_VOCAB = 2, 4, 2, 64, 48
ROW = N_HEAD_KV * HEAD_DIM


def _identity(layer: int, kind: str, x):
    return x


# --- the fit ----------------------------------------------------------------------------------------
def test_each_heads_scales_have_geometric_mean_one_and_follow_amax_to_the_alpha():
    rng = np.random.default_rng(0)
    amax = rng.uniform(0.5, 20.0, ROW)
    for alpha in (0.25, 0.5, 1.0):
        s = fit_scale(amax, alpha, N_HEAD_KV)
        assert s.dtype == np.float32 and s.shape == (ROW,)
        for h in range(N_HEAD_KV):
            head = s[h * HEAD_DIM:(h + 1) * HEAD_DIM].astype(np.float64)
            assert math.exp(np.log(head).mean()) == pytest.approx(1.0, rel=1e-6)
            a = amax[h * HEAD_DIM:(h + 1) * HEAD_DIM]
            # proportional to amax^alpha within the head
            np.testing.assert_allclose(head / head[0], (a / a[0]) ** alpha, rtol=1e-5)


def test_dead_channels_are_floored_and_an_all_zero_head_keeps_scale_one():
    amax = np.ones(ROW)
    amax[:HEAD_DIM] = 0.0  # head 0 dead
    amax[HEAD_DIM] = 0.0  # one dead channel in head 1
    amax[HEAD_DIM + 1] = 100.0
    s = fit_scale(amax, 1.0, N_HEAD_KV)
    assert np.all(s[:HEAD_DIM] == 1.0)
    head = s[HEAD_DIM:]
    # the dead channel is treated as AMAX_FLOOR of the head's largest: 100x below it, not infinitely
    assert head[1] / head[0] == pytest.approx(1 / AMAX_FLOOR, rel=1e-5)
    assert np.all(np.isfinite(s)) and np.all(s > 0)


def test_recipes_are_declared_in_advance_and_fit_on_the_statistics_they_name():
    assert [r.label for r in RECIPES] == ["centre"] + [f"scale alpha={a:g}" for a in (0.25, 0.5, 0.75, 1.0)] + \
        [f"centre+scale alpha={a:g}" for a in (0.25, 0.5, 0.75, 1.0)]
    rng = np.random.default_rng(1)
    stats = {l: KStats(10, rng.normal(size=ROW), rng.uniform(1, 5, ROW), rng.uniform(1, 5, ROW), np.ones(ROW))
             for l in range(N_LAYER)}
    c = fit(KRecipe(True, None), stats, N_HEAD_KV)
    assert c.scale is None and c.mu.dtype == np.float32 and c.mu.shape == (N_LAYER, ROW)
    np.testing.assert_allclose(c.mu[1], stats[1].mean, rtol=1e-6)
    s = fit(KRecipe(False, 0.5), stats, N_HEAD_KV)
    assert s.mu is None and s.scale.shape == (N_LAYER, ROW)
    np.testing.assert_array_equal(s.scale[0], fit_scale(stats[0].absmax, 0.5, N_HEAD_KV))
    cs = fit(KRecipe(True, 0.5), stats, N_HEAD_KV)
    np.testing.assert_array_equal(cs.scale[1], fit_scale(stats[1].absmax_centred, 0.5, N_HEAD_KV))


# --- the read-back ----------------------------------------------------------------------------------
def _kt(rng, centre=True, scale=True) -> KTransform:
    mu = rng.normal(scale=3.0, size=(N_LAYER, ROW)).astype(np.float32) if centre else None
    s = np.stack([fit_scale(rng.uniform(0.1, 10, ROW), 0.75, N_HEAD_KV) for _ in range(N_LAYER)]) if scale else None
    return KTransform(mu=mu, scale=s)


def test_the_read_back_is_the_identity_without_a_quantizer_and_leaves_v_alone():
    rng = np.random.default_rng(2)
    kt = _kt(rng)
    x = torch.randn(7, ROW) * 4 + 2
    t = transformed(_identity, kt)
    torch.testing.assert_close(t(1, "k", x), x, rtol=1e-6, atol=1e-5)
    assert t(1, "v", x) is x
    assert transformed(_identity, KTransform(mu=None, scale=None))(0, "k", x) is x


@pytest.mark.parametrize("rotation", [False, True], ids=["norot", "rot"])
def test_the_read_back_is_what_the_deployment_computes_through_a_q4_0_cache(rotation):
    """The deployment stores k' = (k - mu) / s and multiplies Q by s (per query head, its KV head's s), adding
    nothing back; the simulation reads s * cache(k') + mu with the plain Q. Softmax ignores the per-query
    constant q . mu, so the two attention outputs agree whatever the cache did to k'."""
    rng = np.random.default_rng(3)
    kt = _kt(rng)
    scheme = parse_scheme("q4_0", rotation=rotation)

    def q4(layer, kind, x):
        return cache_roundtrip(x, scheme, kind, HEAD_DIM)

    n = 9
    q = torch.randn(n, N_HEAD, HEAD_DIM)
    k = torch.randn(n, ROW) * 2 + torch.as_tensor(kt.mu[0])
    v = torch.randn(n, N_HEAD_KV, HEAD_DIM)
    mu, s = torch.as_tensor(kt.mu[0]), torch.as_tensor(kt.scale[0])
    stored = q4(0, "k", (k - mu) / s).view(n, N_HEAD_KV, HEAD_DIM)
    q_scaled = q * s.view(N_HEAD_KV, HEAD_DIM).repeat_interleave(N_HEAD // N_HEAD_KV, dim=0)
    deployed = causal_attention(q_scaled, stored, v, N_HEAD_KV)
    simulated = causal_attention(q, transformed(q4, kt)(0, "k", k).view(n, N_HEAD_KV, HEAD_DIM), v, N_HEAD_KV)
    torch.testing.assert_close(simulated, deployed, rtol=1e-4, atol=1e-5)
    # and the cache did change something: the transform is not a no-op through q4_0
    plain = causal_attention(q, k.view(n, N_HEAD_KV, HEAD_DIM), v, N_HEAD_KV)
    assert not torch.allclose(simulated, plain, atol=1e-4)


def _tiny_model(seed: int = 0) -> TorchModel:
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale / math.sqrt(shape[-1])

    d = N_HEAD * HEAD_DIM
    geom = Geometry("llama", N_LAYER, d, N_HEAD, N_HEAD_KV, HEAD_DIM, HEAD_DIM, HEAD_DIM, 512)
    hp = Hparams(ARCHS["llama"], geom, 10000.0, 1.0, 1e-5, N_VOCAB)
    layers = []
    for _ in range(N_LAYER):
        # a K bias gives the cache a mean for centring to remove
        k = Linear(w(ROW, d, scale=2.0), torch.randn(ROW, generator=g) * 3)
        layers.append(Layer(torch.ones(d), Linear(w(d, d, scale=2.0)), k, Linear(w(ROW, d)), Linear(w(d, d)),
                            torch.ones(d), Linear(w(64, d)), Linear(w(64, d)), Linear(w(d, 64))))
    return TorchModel(hp, torch.randn(N_VOCAB, d, generator=g), layers, torch.ones(d), Linear(w(N_VOCAB, d, scale=8.0)))


def test_centring_and_scaling_leave_the_real_forward_unchanged_with_an_f32_cache():
    tm = _tiny_model()
    kt = _kt(np.random.default_rng(4))
    toks = [1, 5, 9, 14, 3, 22, 7, 40, 2, 11]
    with torch.inference_mode():
        ref = tm.forward(toks).logits
        out = tm.forward(toks, transformed(_identity, kt)).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# --- the decision -----------------------------------------------------------------------------------
def _scored(label: str, kld: float, benign: float, harmful: float = 0.0) -> Scored:
    return Scored(label, kld, 0.0, (kld,) * 3, 0.9, (harmful - 0.01, harmful, harmful + 0.01),
                  (benign - 0.01, benign, benign + 0.01))


BASE = _scored("untransformed", 0.40, 0.72, harmful=-0.10)


def test_the_objective_is_the_larger_absolute_shift_of_either_population():
    assert objective(BASE) == pytest.approx(0.72)
    assert objective(_scored("r", 0.1, 0.1, harmful=-0.5)) == pytest.approx(0.5)


def test_reversing_the_benign_bias_is_not_a_fix():
    # the prototype's finding: centring alone moved the benign shift from +0.7 to about -0.9
    reversed_ = _scored("centre", 0.20, -0.90)
    i, reason = decide(BASE, [reversed_])
    assert i is None and "no recipe lowers" in reason and "-0.900" in reason and "+0.720" in reason


def test_a_recipe_that_fixes_benign_by_breaking_harmful_is_not_chosen():
    i, _ = decide(BASE, [_scored("scale alpha=1", 0.10, 0.05, harmful=-0.80)])
    assert i is None


def test_the_lowest_objective_wins_whatever_its_kld_and_ties_go_to_the_lower_kld():
    a = _scored("scale alpha=0.5", 0.30, 0.30, harmful=-0.2)
    b = _scored("centre+scale alpha=0.5", 0.50, -0.20, harmful=0.1)
    c = _scored("centre+scale alpha=1", 0.45, 0.20, harmful=0.05)
    i, reason = decide(BASE, [a, b, c])
    assert i == 2 and reason.startswith("centre+scale alpha=1: predicted |shift| 0.200")
    i, _ = decide(BASE, [b, c])
    assert i == 1  # equal objective 0.20: the lower KLD


def test_only_a_strictly_better_objective_is_chosen():
    same = _scored("centre", 0.01, -0.72, harmful=0.0)
    assert decide(BASE, [same])[0] is None
    assert decide(BASE, [])[0] is None


def test_the_choice_round_trips_through_json():
    kt = _kt(np.random.default_rng(5))
    scored = tuple(_scored(r.label, 0.3, 0.8 - 0.05 * i) for i, r in enumerate(RECIPES))
    i, reason = decide(BASE, list(scored))
    choice = KTransformChoice("q4_0", True, BASE, scored, RECIPES, RECIPES[i], kt, reason)
    d = json.loads(json.dumps(choice.to_dict()))
    assert d["predicted"]["without"]["objective"] == pytest.approx(0.72)
    assert d["predicted"]["with"]["benign"] == pytest.approx(0.8 - 0.05 * i)
    back = KTransformChoice.from_dict(d)
    assert back.chosen == RECIPES[i] and back.baseline == BASE and back.scored == scored and back.reason == reason
    np.testing.assert_array_equal(back.transform.mu, kt.mu)
    np.testing.assert_array_equal(back.transform.scale, kt.scale)
    none = KTransformChoice("q4_0", False, BASE, scored[:1], RECIPES[:1], None, None, "none")
    back = KTransformChoice.from_dict(json.loads(json.dumps(none.to_dict())))
    assert back.chosen is None and back.transform is None and back.recipes == RECIPES[:1]


# --- the whole choice on a tiny model ---------------------------------------------------------------
def _tiny_calib() -> CalibSet:
    rng = np.random.default_rng(6)
    prefix = (1, 2, 3, 4)
    prompts = []
    for i in range(6):
        toks = prefix + tuple(int(t) for t in rng.integers(5, N_VOCAB, 5))
        cont = tuple(int(t) for t in rng.integers(5, N_VOCAB, 3))
        prompts.append(CalibPrompt(f"p{i}", "x", i < 2, toks, cont, np.zeros((3, N_VOCAB), np.float32)))
    return CalibSet(tuple(prompts), prefix, (5, 6), (7, 8), ("I",), ("Sure",))


def test_the_choice_scores_every_recipe_and_follows_its_own_rule():
    torch.set_num_threads(1)
    tm, cal = _tiny_model(), _tiny_calib()
    stats = k_statistics(Engine(tm, cal))
    assert sorted(stats) == list(range(N_LAYER)) and stats[0].mean.shape == (ROW,)
    assert stats[0].n_tokens == 4 + 6 * (5 + 2)  # the prefix once, each prompt and its continuation but the last
    logs: list[str] = []
    choice = choose_k_transform(tm, cal, KVConfig("q4_0", "q4_0"), True, log=logs.append)
    assert len(logs) == 1 + len(RECIPES) and choice.recipes == RECIPES
    assert all(len(s.klds) == REALIZATIONS for s in (choice.baseline, *choice.scored))
    better = [objective(s) < objective(choice.baseline) for s in choice.scored]
    assert (choice.chosen is not None) == any(better)
    if choice.chosen is not None:
        want = fit(choice.chosen, stats, N_HEAD_KV)
        for got, exp in ((choice.transform.mu, want.mu), (choice.transform.scale, want.scale)):
            assert (got is None and exp is None) or np.array_equal(got, exp)
    json.dumps(choice.to_dict())
