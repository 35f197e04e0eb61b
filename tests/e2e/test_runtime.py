"""The runtime on the real default model: KV bytes per token from ggml's sizes, and llama.cpp's generation
logprobs against its teacher-forced scores. Parsing KV configs: tests/unit/test_runtime.py."""

import pytest

from kvedge.gguf.kvtypes import bytes_per_value
from kvedge.gguf.model import inspect_model
from kvedge.llama.runtime import KVConfig


def test_bytes_per_token_from_ggml_sizes(model_path):
    m = inspect_model(model_path)
    assert bytes_per_value("f16") == 2 and bytes_per_value("q8_0") == 34 / 32 and bytes_per_value("q4_0") == 18 / 32
    f16 = KVConfig("f16", "f16").bytes_per_token(m)
    assert f16 == m.n_layer * 2 * m.n_head_kv * m.head_dim_k * 2
    assert KVConfig("q4_0", "q4_0").bytes_per_token(m) / f16 == pytest.approx(18 / 64)

def test_generation_logprobs_are_the_teacher_forced_scores(model_path):
    """generate(logprobs=True) keeps each step's distribution; teacher-forcing the same tokens reproduces
    them exactly (same contexts, same arithmetic), so the PCR fidelity check can reuse them."""
    import numpy as np

    from kvedge.gguf.model import inspect_model
    from kvedge.llama.runtime import F16, Runtime, RuntimeOptions
    from kvedge.gguf.template import chat_template_for

    model = inspect_model(model_path)
    with Runtime(model, F16, True, RuntimeOptions(n_ctx=512)) as rt:
        prompt = rt.tokenize(chat_template_for(model).render("Name three colours."))
        gen = rt.generate(prompt, 6, logprobs=True)
        assert len(gen.tokens) == 6 and len(gen.logprobs) == 6
        scored = list(rt.score(prompt, gen.tokens))
    for kept, again, tok in zip(gen.logprobs, scored, gen.tokens):
        np.testing.assert_array_equal(kept, again)
        assert int(np.argmax(kept)) == tok
