"""LoRA adapters written by kvedge load in the real llama.cpp and act exactly as (alpha/r)·B·A."""

import numpy as np
import pytest

from kvedge.errors import ModelFileError
from kvedge.lora import LoraAdapter, LoraPair, read_adapter, write_adapter
from kvedge.model import inspect_model
from kvedge.runtime import KVConfig, Runtime, RuntimeOptions
from kvedge.template import chat_template_for


def _adapter(scale_b: float, seed: int = 0) -> LoraAdapter:
    rng = np.random.default_rng(seed)
    pairs = {}
    for layer in range(2):
        for name, (n_out, n_in) in {"attn_q": (576, 576), "attn_v": (192, 576), "ffn_down": (576, 1536)}.items():
            a = rng.normal(0, 0.05, (4, n_in)).astype(np.float32)
            b = (scale_b * rng.normal(0, 0.05, (n_out, 4))).astype(np.float32)
            pairs[f"blk.{layer}.{name}.weight"] = LoraPair(a, b)
    return LoraAdapter("llama", 8.0, pairs, {"kvedge.purpose": "test"})


def _last_logprobs(model_path, lora):
    m = inspect_model(model_path)
    with Runtime(m, KVConfig("f16", "f16"), True, RuntimeOptions(n_ctx=512), lora) as rt:
        return next(rt.score(rt.tokenize(chat_template_for(m).render("Name three colours.")), [0]))


def test_round_trip(tmp_path):
    ad = _adapter(1.0)
    write_adapter(tmp_path / "a.gguf", ad)
    back = read_adapter(tmp_path / "a.gguf")
    assert back.alpha == 8.0 and back.architecture == "llama" and back.metadata == {"kvedge.purpose": "test"}
    for name, pair in ad.pairs.items():
        np.testing.assert_allclose(back.pairs[name].delta(8.0), pair.delta(8.0), atol=1e-3)


@pytest.mark.e2e
def test_llama_cpp_applies_the_adapter(tmp_path, model_path):
    write_adapter(tmp_path / "zero.gguf", _adapter(0.0))
    write_adapter(tmp_path / "rand.gguf", _adapter(1.0))
    base = _last_logprobs(model_path, None)
    assert np.abs(_last_logprobs(model_path, tmp_path / "zero.gguf") - base).max() == 0
    assert np.abs(_last_logprobs(model_path, tmp_path / "rand.gguf") - base).max() > 1e-2


def test_a_model_is_not_an_adapter(model_path):
    with pytest.raises(ModelFileError):
        read_adapter(model_path)
