"""A small LoRA adapter for the default model's shapes (SmolLM2-135M: width 576, KV width 192, FFN 1536),
random but seeded, for the adapter tests of both tiers."""

from __future__ import annotations

import numpy as np

from kvedge.gguf.lora import LoraAdapter, LoraPair


def small_adapter(scale_b: float, seed: int = 0) -> LoraAdapter:
    """Rank 4 on attn_q, attn_v and ffn_down of blocks 0 and 1, alpha 8; B scaled by `scale_b` (0: no effect)."""
    rng = np.random.default_rng(seed)
    pairs = {}
    for layer in range(2):
        for name, (n_out, n_in) in {"attn_q": (576, 576), "attn_v": (192, 576), "ffn_down": (576, 1536)}.items():
            a = rng.normal(0, 0.05, (4, n_in)).astype(np.float32)
            b = (scale_b * rng.normal(0, 0.05, (n_out, 4))).astype(np.float32)
            pairs[f"blk.{layer}.{name}.weight"] = LoraPair(a, b)
    return LoraAdapter("llama", 8.0, pairs, {"kvedge.purpose": "test"})
