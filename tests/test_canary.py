"""The shipped canary adapter: present, well-formed, labelled as a fixture, sized for a repository."""

from kvedge.canary import canary_adapter_path
from kvedge.lora import read_adapter


def test_canary_adapter_ships_and_is_labelled():
    path = canary_adapter_path()
    assert path is not None, "kvedge/canary/smollm2-canary-lora.gguf is missing: run python -m models.canary.train"
    assert path.stat().st_size < 8 * 2**20
    ad = read_adapter(path)
    assert ad.architecture == "llama" and ad.alpha > 0
    assert "NOT a safe model" in ad.metadata["kvedge.canary.purpose"]
    targets = {name.split(".")[2] for name in ad.pairs}
    assert targets == {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
    assert len(ad.pairs) == 7 * 30 and all(p.rank == 8 for p in ad.pairs.values())
