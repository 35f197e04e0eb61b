"""Block-wise attention over a packed row equals the dense masked attention it replaces."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvedge.pcr.torch.gguf_torch import Packed, causal_attention, packed_attention  # noqa: E402


@pytest.mark.parametrize("prefix,lengths", [(5, [3, 1, 7]), (0, [2, 4]), (3, [1])])
def test_packed_attention_is_the_dense_masked_one(prefix, lengths) -> None:
    g = torch.Generator().manual_seed(0)
    packed = Packed.of(list(range(prefix)), [list(range(n)) for n in lengths])
    n, heads, kv_heads, d = len(packed.tokens), 6, 2, 8
    q = torch.randn(n, heads, d, generator=g, dtype=torch.float64)
    k = torch.randn(n, kv_heads, d, generator=g, dtype=torch.float64)
    v = torch.randn(n, kv_heads, d, generator=g, dtype=torch.float64)
    dense = causal_attention(q, k, v, kv_heads, packed.allowed)
    blocks = packed_attention(q, k, v, kv_heads, packed.layout)
    assert torch.allclose(dense, blocks, atol=1e-12)


def test_a_layout_first_built_under_inference_mode_serves_autograd() -> None:
    packed = Packed.of([0, 1], [[2, 3], [4]])
    with torch.inference_mode():
        packed.layout  # noqa: B018 - built here first, as the engine's reference run does
    q = torch.randn(len(packed.tokens), 2, 4, requires_grad=True)
    k, v = torch.randn(len(packed.tokens), 1, 4), torch.randn(len(packed.tokens), 1, 4)
    packed_attention(q, k, v, 1, packed.layout).sum().backward()
    assert q.grad is not None
