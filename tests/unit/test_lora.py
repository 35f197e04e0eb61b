"""LoRA adapters written by kvedge read back as written. Loading them in the real llama.cpp, and the
hostile adapters checked against the default model: tests/e2e/test_lora.py."""

import numpy as np

from kvedge.gguf.lora import read_adapter, write_adapter
from support.adapters import small_adapter as _adapter


def test_round_trip(tmp_path):
    ad = _adapter(1.0)
    write_adapter(tmp_path / "a.gguf", ad)
    back = read_adapter(tmp_path / "a.gguf")
    assert back.alpha == 8.0 and back.architecture == "llama" and back.metadata == {"kvedge.purpose": "test"}
    for name, pair in ad.pairs.items():
        np.testing.assert_allclose(back.pairs[name].delta(8.0), pair.delta(8.0), atol=1e-3)
