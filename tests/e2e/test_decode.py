"""Batched decoding (kvedge/llama/decode.py) on the real llama.cpp and the real default model + canary."""

from __future__ import annotations

import numpy as np
import pytest

from kvedge.canary import canary_adapter_path
from kvedge.datasets import select_prompts
from kvedge.llama.decode import GenJob
from kvedge.gguf.model import load_model
from kvedge.llama.runtime import F16, KVConfig, Runtime, RuntimeOptions
from kvedge.llama.scoring import kld
from kvedge.gguf.template import chat_template_for

Q4 = KVConfig("q4_0", "q4_0")


@pytest.fixture(scope="module")
def model():
    return load_model(None)


@pytest.fixture(scope="module")
def prompts(model):
    tpl = chat_template_for(model)
    with Runtime(model, F16, True, RuntimeOptions(n_ctx=1024)) as rt:
        return [rt.tokenize(tpl.render(p.text)) for p in select_prompts(limit=2)]  # 8 prompts


def _wave(rt: Runtime, prompts, max_tokens=20, logprobs=False) -> dict[int, object]:
    rt.reset()
    n = min(len(a) for a in prompts) - 1
    rt.share_prefix(prompts[0][:next((i for i in range(n) if len({p[i] for p in prompts}) > 1), n)])
    return dict(rt.generate_many([GenJob(p, max_tokens, None, logprobs) for p in prompts]))


def test_one_sequence_path_is_generate(model, prompts):
    """`n_seq=1` is the one-at-a-time loop: generate_many and generate give the same tokens and logits."""
    with Runtime(model, Q4, False, RuntimeOptions(n_ctx=1024), canary_adapter_path()) as rt:
        many = dict(rt.generate_many([GenJob(p, 12, None, True) for p in prompts[:3]]))
        for i, p in enumerate(prompts[:3]):
            one = rt.generate(p, 12, logprobs=True)
            assert one.tokens == many[i].tokens and one.stop_reason == many[i].stop_reason
            assert all(np.array_equal(a, b) for a, b in zip(one.logprobs, many[i].logprobs))


@pytest.mark.parametrize("kv,rotation", [(F16, True), (Q4, False)], ids=["f16", "q4_0-norot"])
def test_a_wave_is_reproducible_whatever_ran_before(model, prompts, kv, rotation):
    """What resume relies on: a wave decoded after other waves on a used context is bit-identical to the
    same wave on a fresh context."""
    opts = RuntimeOptions(n_ctx=1024, n_seq=4)
    with Runtime(model, kv, rotation, opts, canary_adapter_path()) as rt:
        _wave(rt, prompts[4:])  # another wave first: the cache has been used
        after = _wave(rt, prompts[:4], logprobs=True)
    with Runtime(model, kv, rotation, opts, canary_adapter_path()) as rt:
        fresh = _wave(rt, prompts[:4], logprobs=True)
    for i in range(4):
        assert after[i].tokens == fresh[i].tokens
        assert all(np.array_equal(a, b) for a, b in zip(after[i].logprobs, fresh[i].logprobs))


def test_batched_generation_retires_and_limits(model, prompts):
    with Runtime(model, F16, True, RuntimeOptions(n_ctx=1024, n_seq=8), canary_adapter_path()) as rt:
        stops_after = 3
        jobs = [GenJob(p, 16, (lambda toks: len(toks) >= stops_after) if i % 2 else None) for i, p in enumerate(prompts)]
        res = dict(rt.generate_many(jobs))
    assert sorted(res) == list(range(len(prompts)))
    for i, g in res.items():
        if i % 2:
            assert g.stop_reason == "final" and len(g.tokens) == stops_after
        else:
            assert g.stop_reason in ("eog", "max_tokens") and len(g.tokens) <= 16
            assert g.stop_reason == "eog" or len(g.tokens) == 16
    with Runtime(model, F16, True, RuntimeOptions(n_ctx=64, n_seq=4)) as rt:  # prompts near the context limit
        long = [p for p in prompts if len(p) < 64][:2] + [prompts[0] * 3]
        res = dict(rt.generate_many([GenJob(p, 64, None) for p in long]))
    assert res[2].stop_reason == "ctx" and res[2].tokens == []  # the prompt alone overflows the context
    for i in (0, 1):  # the others answer until the context is full
        assert len(long[i]) + len(res[i].tokens) == 64 and res[i].stop_reason == "ctx"


def _scores(rt: Runtime, prompts, conts) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(one sequence at a time, all together) teacher-forced log-probabilities of the continuations."""
    alone = [np.stack(list(rt.score(p, c))) for p, c in zip(prompts, conts)]
    rows: dict[tuple[int, int], np.ndarray] = {}
    done = list(rt.score_many(list(zip(prompts, conts)), lambda j, k, lp: rows.__setitem__((j, k), lp)))
    assert sorted(done) == list(range(len(prompts)))
    return alone, [np.stack([rows[(j, k)] for k in range(len(c))]) for j, c in enumerate(conts)]


def _mean_kld(a, b) -> float:
    return float(np.mean([kld(x, y).mean() for x, y in zip(a, b)]))


def test_batched_scoring_against_one_sequence_scoring(model, prompts):
    """Scoring feeds the continuation one token per sequence per decode, as generation does. With one
    sequence that is the old token-by-token path bit for bit; batched, llama.cpp's arithmetic changes
    (its matrix kernels group the rows of a decode), by about the f16 noise floor (flash attention on vs
    off) at f16 and, measured, by a fraction of the effect itself at q4_0 without rotation, where one ulp
    moves a value across a rounding edge of the quantized cache."""
    lora = canary_adapter_path()
    with Runtime(model, F16, True, RuntimeOptions(n_ctx=1024), lora) as rt:
        conts = [rt.generate(p, 24).tokens for p in prompts]
        ref, same = _scores(rt, prompts, conts)
    assert all(np.array_equal(a, b) for a, b in zip(ref, same))
    with Runtime(model, F16, True, RuntimeOptions(n_ctx=1024, flash_attn=False), lora) as rt:
        noise = _mean_kld(ref, [np.stack(list(rt.score(p, c))) for p, c in zip(prompts, conts)])
    with Runtime(model, F16, True, RuntimeOptions(n_ctx=1024, n_seq=8), lora) as rt:
        alone, together = _scores(rt, prompts, conts)
    f16_batching = _mean_kld(alone, together)
    with Runtime(model, Q4, False, RuntimeOptions(n_ctx=1024, n_seq=8), lora) as rt:
        alone, together = _scores(rt, prompts, conts)
    q4_batching, q4_effect = _mean_kld(alone, together), _mean_kld(ref, alone)
    print(f"\nKLD batched vs one-at-a-time scoring: f16 {f16_batching:.5f} (f16 noise floor {noise:.5f}); "
          f"q4_0 rot off {q4_batching:.4f} (the q4_0 effect {q4_effect:.4f})")
    assert f16_batching < 3 * noise
    assert q4_batching < 0.5 * q4_effect
