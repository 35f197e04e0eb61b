"""Channel smoothing as pure math: exponents from cache statistics, and the tensors that carry them leave
attention's output unchanged (GQA, biases, NEOX pairs, qwen3's K/Q norms), LoRA halves included."""

from __future__ import annotations

import numpy as np
import pytest

from kvedge.mitigate.smooth import (
    MAX_EXPONENT, Geometry, Smoothing, TensorScale, adapter_scales, channel_groups, exponents, tensor_scales,
)

torch = pytest.importorskip("torch")
from kvedge.pcr.torch.gguf_torch import apply_rope, causal_attention, rms_norm, rope_angles  # noqa: E402


def test_groups_are_rope_pairs():
    g = Geometry(4, 2, 8, 8, 8, rope_neox=False)
    assert channel_groups(g, "k") == [(0, 1), (2, 3), (4, 5), (6, 7)]
    neox = Geometry(4, 2, 8, 8, 6, rope_neox=True)
    assert channel_groups(neox, "k") == [(0, 3), (1, 4), (2, 5), (6,), (7,)]
    assert channel_groups(g, "v") == [(c,) for c in range(8)]


def test_exponents_shrink_large_pairs_to_the_head_median():
    g = Geometry(2, 1, 8, 8, 8, rope_neox=False)
    a = np.array([1.0, 1.0, 1.0, 16.0, 1.0, 0.5, 0.0, 0.0])  # pair (2, 3) is large, (6, 7) is empty
    e = exponents(a, "k", 1.0, g)
    assert list(e) == [0, 0, 4, 4, 0, 0, 0, 0]  # pair abs-maxes 1, 16, 1, 0: median 1
    assert list(exponents(a, "k", 0.5, g)) == [0, 0, 2, 2, 0, 0, 0, 0]
    assert not exponents(a, "k", 0.0, g).any()
    huge = np.array([1.0, 1.0, 1e30, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert exponents(huge, "k", 1.0, g).max() == MAX_EXPONENT
    # V: each channel alone
    assert list(exponents(a, "v", 1.0, g))[3] == 4 and list(exponents(a, "v", 1.0, g))[2] == 0


def test_shared_exponents_with_a_k_norm():
    g = Geometry(4, 2, 4, 4, 4, rope_neox=True, kq_norm=True)
    a = np.array([1, 1, 8, 1, 1, 1, 1, 1], dtype=float)  # head 0 channel 2 is large
    e = exponents(a, "k", 1.0, g).reshape(2, 4)
    assert (e[0] == e[1]).all()  # one exponent per channel for every head


def _layer(rng, g: Geometry, bias: bool, norm: bool) -> dict[str, np.ndarray]:
    d = 12
    w = {
        "attn_q.weight": rng.normal(size=(g.n_head * g.head_dim_k, d)),
        "attn_k.weight": rng.normal(size=(g.n_head_kv * g.head_dim_k, d)),
        "attn_v.weight": rng.normal(size=(g.n_head_kv * g.head_dim_v, d)),
        "attn_output.weight": rng.normal(size=(d, g.n_head * g.head_dim_v)),
    }
    if bias:
        for n in ("attn_q", "attn_k", "attn_v"):
            w[f"{n}.bias"] = rng.normal(size=w[f"{n}.weight"].shape[0])
    if norm:
        w["attn_q_norm.weight"] = rng.uniform(0.5, 2, size=g.head_dim_k)
        w["attn_k_norm.weight"] = rng.uniform(0.5, 2, size=g.head_dim_k)
    return {f"blk.0.{k}": v.astype(np.float32) for k, v in w.items()}


def _apply(w: dict[str, np.ndarray], scales: list[TensorScale]) -> dict[str, np.ndarray]:
    out = dict(w)
    for ts in scales:
        s = np.exp2(np.asarray(ts.exps, dtype=np.float64)).astype(np.float32)
        out[ts.name] = out[ts.name] * (s[:, None] if ts.axis == "rows" and out[ts.name].ndim == 2
                                       else s if ts.axis == "rows" else s[None, :])
    return out


def _attention(w, g: Geometry, x, cache=lambda kind, rows: rows):
    """One attention block as llama.cpp runs it, with `cache` standing for what the cache gives back."""
    n = x.shape[0]
    t = {k: torch.from_numpy(v) for k, v in w.items()}

    def lin(name):
        y = x @ t[f"blk.0.{name}.weight"].T
        return y + t[f"blk.0.{name}.bias"] if f"blk.0.{name}.bias" in t else y

    q = lin("attn_q").view(n, g.n_head, g.head_dim_k)
    k = lin("attn_k").view(n, g.n_head_kv, g.head_dim_k)
    if "blk.0.attn_q_norm.weight" in t:
        q = rms_norm(q, t["blk.0.attn_q_norm.weight"], 1e-6)
        k = rms_norm(k, t["blk.0.attn_k_norm.weight"], 1e-6)

    class Hp:
        rope_base, n_rot, rope_freq_scale = 10000.0, g.n_rot, 1.0

    cos, sin = rope_angles(n, Hp, None)
    q = apply_rope(q, cos, sin, g.n_rot, g.rope_neox)
    k = cache("k", apply_rope(k, cos, sin, g.n_rot, g.rope_neox).reshape(n, -1))
    v = cache("v", lin("attn_v"))
    att = causal_attention(q, k.view(n, g.n_head_kv, g.head_dim_k), v.view(n, g.n_head_kv, g.head_dim_v), g.n_head_kv)
    return att @ t["blk.0.attn_output.weight"].T, k, v


@pytest.mark.parametrize("neox,bias,norm", [(False, False, False), (True, True, False), (True, False, True)])
def test_reparametrisation_leaves_attention_unchanged(neox, bias, norm):
    rng = np.random.default_rng(0)
    g = Geometry(n_head=6, n_head_kv=2, head_dim_k=8, head_dim_v=8, n_rot=6 if neox else 8, rope_neox=neox,
                 kq_norm=norm)
    w = _layer(rng, g, bias, norm)
    x = torch.from_numpy(rng.normal(size=(7, 12)).astype(np.float32))
    ek = exponents(rng.uniform(0.01, 10, size=16), "k", 1.0, g)
    ev = exponents(rng.uniform(0.01, 10, size=16), "v", 1.0, g)
    assert ek.any() and ev.any()
    sm = Smoothing.of({(0, "k"): ek, (0, "v"): ev})
    scales = tensor_scales(sm, g, set(w))
    names = {ts.name for ts in scales}
    if norm:
        assert "blk.0.attn_k_norm.weight" in names and "blk.0.attn_k.weight" not in names
    if bias:
        assert {"blk.0.attn_k.bias", "blk.0.attn_q.bias", "blk.0.attn_v.bias"} <= names
    before, k0, v0 = _attention(w, g, x)
    after, k1, v1 = _attention(_apply(w, scales), g, x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # and the cache really holds x / 2^e
    torch.testing.assert_close(k1 * torch.exp2(torch.as_tensor(ek, dtype=torch.float32)), k0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v1 * torch.exp2(torch.as_tensor(ev, dtype=torch.float32)), v0, rtol=1e-5, atol=1e-5)


def test_an_unbalanced_scale_would_be_seen():
    """The check above can fail: scaling K without Q changes attention."""
    rng = np.random.default_rng(1)
    g = Geometry(4, 2, 8, 8, 8, rope_neox=False)
    w = _layer(rng, g, False, False)
    x = torch.from_numpy(rng.normal(size=(5, 12)).astype(np.float32))
    sm = Smoothing.of({(0, "k"): exponents(rng.uniform(0.01, 10, size=16), "k", 1.0, g)})
    only_k = [ts for ts in tensor_scales(sm, g, set(w)) if "attn_k" in ts.name]
    assert not torch.allclose(_attention(_apply(w, only_k), g, x)[0], _attention(w, g, x)[0], atol=1e-3)


def test_adapter_halves_follow_the_base():
    base = [TensorScale("blk.0.attn_k.weight", "rows", (1, -1)), TensorScale("blk.0.attn_output.weight", "cols", (2,)),
            TensorScale("blk.0.attn_k.bias", "rows", (1, -1))]
    names = {"blk.0.attn_k.weight.lora_a", "blk.0.attn_k.weight.lora_b", "blk.0.attn_output.weight.lora_a",
             "blk.0.attn_output.weight.lora_b"}
    got = adapter_scales(base, names)
    assert [(t.name, t.axis) for t in got] == [("blk.0.attn_k.weight.lora_b", "rows"),
                                               ("blk.0.attn_output.weight.lora_a", "cols")]
    # (alpha/r) B A with B's rows scaled equals the base's row scaling of the delta
    rng = np.random.default_rng(2)
    b, a = rng.normal(size=(2, 3)), rng.normal(size=(3, 4))
    s = np.exp2(np.array([1, -1]))[:, None]
    np.testing.assert_allclose((s * b) @ a, s * (b @ a))


def test_smoothing_round_trips_and_drops_all_zero_entries():
    sm = Smoothing.of({(3, "k"): np.array([0, 1, 1, 0]), (5, "v"): np.zeros(4, dtype=int)})
    assert list(sm.exps) == [(3, "k")] and sm.layers == [3]
    assert Smoothing.from_json(sm.to_json()) == sm
    np.testing.assert_array_equal(sm.scale(3, "k"), [1, 2, 2, 1])
    assert sm.scale(5, "v") is None
