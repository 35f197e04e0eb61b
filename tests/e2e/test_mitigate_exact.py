"""Channel smoothing on the real model through the real llama.cpp: the smoothed model plus the smoothed
canary adapter, at f16 KV, agrees with the original at least as well as the original agrees with itself
when only its arithmetic changes (flash attention off), for K and V smoothing together (V widens
attn_output). The same check fails for an unbalanced patch, so it can fail."""

from __future__ import annotations

import hashlib

import gguf
import pytest

pytest.importorskip("torch")

from kvedge.pcr.torch.gguf_torch import TorchModel  # noqa: E402
from kvedge.canary import canary_adapter_path  # noqa: E402
from kvedge.gguf.lora import read_adapter  # noqa: E402
from kvedge.mitigate.gguf_patch import patch_gguf  # noqa: E402
from kvedge.mitigate.selfcheck import self_check  # noqa: E402
from kvedge.mitigate.simulate import cache_absmax, geometry  # noqa: E402
from kvedge.mitigate.smooth import Smoothing, adapter_scales, exponents, tensor_scales  # noqa: E402
from kvedge.gguf.model import inspect_model, load_model  # noqa: E402
from kvedge.pcr.calibset import build_calibset, select_calib_prompts  # noqa: E402
from kvedge.pcr.engine import Engine  # noqa: E402
from kvedge.llama.runtime import RuntimeOptions  # noqa: E402

LAYERS = (11, 17, 19)


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_smoothing_is_exact_within_the_noise_floor(model_path, tmp_path):
    model, lora = load_model(model_path), canary_adapter_path()
    before = (_sha(model_path), _sha(lora))
    opts = RuntimeOptions(n_ctx=2048)
    cal = build_calibset(model, lora, select_calib_prompts(n_benign=10), opts)  # 20 prompts: 160 positions
    tm = TorchModel.from_gguf(model_path, read_adapter(lora))
    g = geometry(tm)
    absmax = cache_absmax(Engine(tm, cal))
    sm = Smoothing.of({(l, c): exponents(absmax[(l, c)], c, 1.0, g) for l in LAYERS for c in ("k", "v")})
    assert sorted(sm.exps) == [(l, c) for l in LAYERS for c in ("k", "v")]
    scales = tensor_scales(sm, g, {t.name for t in gguf.GGUFReader(model_path).tensors})
    rep = patch_gguf(model_path, tmp_path / "m.gguf", scales, {"kvedge.test": "1"})
    # rows stay Q4_1 (exact through the block scales); attn_output's columns cut across blocks: widened
    assert {c.name for c in rep.widened} == {f"blk.{l}.attn_output.weight" for l in LAYERS}
    assert rep.output_bytes > rep.source_bytes
    a_names = {t.name for t in gguf.GGUFReader(lora).tensors}
    patch_gguf(lora, tmp_path / "a.gguf", adapter_scales(scales, a_names), {"kvedge.test": "1"})
    check = self_check(model, lora, inspect_model(tmp_path / "m.gguf"), tmp_path / "a.gguf", cal, opts)
    assert check.passed, check.summary
    assert check.patched.n_positions == check.noise.n_positions == 160
    assert (_sha(model_path), _sha(lora)) == before

    # Q scaled without K: attention scores change, and the same check sees it
    unbalanced = [ts for ts in scales if ".attn_q." in ts.name]
    patch_gguf(model_path, tmp_path / "bad.gguf", unbalanced, {})
    bad = self_check(model, lora, inspect_model(tmp_path / "bad.gguf"), lora, cal, opts)
    assert not bad.passed and bad.patched.kld > 10 * check.noise.kld, bad.summary
