"""kvedge's torch forward against real llama.cpp on a tiny synthetic model of each architecture it accepts
(tests/support/synthetic.py: random weights in llama.cpp's exact tensor layout, written with a fixed seed):
llama.cpp must load each (the generator is right), and the torch pass must agree with it at f16 KV by the
thresholds the default model's check uses (tests/e2e/test_calib_forward.py), and simulate q4_0 with the
rotation on and off within 0.25x-4x of llama.cpp's KLD. Single-threaded on both sides, as there."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvedge.gguf.kvmap import F16, KVConfig  # noqa: E402
from kvedge.gguf.model import inspect_model  # noqa: E402
from kvedge.llama.runtime import Runtime, RuntimeOptions  # noqa: E402
from kvedge.llama.scoring import kld  # noqa: E402
from kvedge.pcr.torch.gguf_torch import ARCHS as TORCH_ARCHS, TorchModel  # noqa: E402
from kvedge.pcr.torch.kvquant import parse_scheme  # noqa: E402
from support.cli import run_cli  # noqa: E402
from support.synthetic import ARCHS, n_vocab, write_synthetic  # noqa: E402

OPTIONS = RuntimeOptions(n_ctx=512, n_threads=1)
N_PROMPT, N_CONT, N_CASES = 8, 16, 4


@pytest.fixture(scope="module", params=ARCHS)
def synthetic(request, tmp_path_factory):
    arch = request.param
    path = write_synthetic(tmp_path_factory.mktemp("synthetic") / f"{arch}.gguf", arch, seed=ARCHS.index(arch))
    rng = np.random.default_rng(1)
    cases = [[int(t) for t in rng.integers(100, n_vocab() - 100, N_PROMPT + N_CONT)] for _ in range(N_CASES)]
    torch.set_num_threads(1)
    return arch, inspect_model(path), TorchModel.from_gguf(path), cases


def _llama(model, kv: KVConfig, rotation: bool, cases) -> list[np.ndarray]:
    with Runtime(model, kv, rotation, OPTIONS) as rt:
        return [np.stack(list(rt.score(c[:N_PROMPT], c[N_PROMPT:]))) for c in cases]


def _torch(tm: TorchModel, cases, transform=None) -> list[np.ndarray]:
    with torch.inference_mode():
        return [torch.log_softmax(tm.forward(c[:-1], transform).logits.double(), -1)[N_PROMPT - 1:].numpy()
                for c in cases]


def _kld(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([kld(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]))


def _top1(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([int(x.argmax() == y.argmax()) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]))


def test_every_synthetic_architecture_is_one_the_torch_pass_accepts():
    assert set(ARCHS) == set(TORCH_ARCHS)


def test_llama_cpp_loads_it_and_the_torch_pass_agrees_at_f16(synthetic):
    arch, model, tm, cases = synthetic
    assert model.architecture == arch and tm.verified
    ref, mine = _llama(model, F16, True, cases), _torch(tm, cases)
    k, top1 = _kld(ref, mine), _top1(ref, mine)
    print(f"\n{arch}: f16 KLD {k:.2e}, top-1 {top1:.3f} over {N_CASES * N_CONT} positions")
    assert k < 0.01 and top1 >= 0.95


@pytest.mark.parametrize("rotation", [True, False], ids=["rot", "norot"])
def test_q4_0_simulation_tracks_llama_cpp(synthetic, rotation):
    arch, model, tm, cases = synthetic
    f16, q = parse_scheme("f16"), parse_scheme("q4_0", rotation=rotation)
    llama_ref, llama_q = _llama(model, F16, True, cases), _llama(model, KVConfig("q4_0", "q4_0"), rotation, cases)
    sim_ref, sim_q = _torch(tm, cases, tm.cache_sim(f16, f16)), _torch(tm, cases, tm.cache_sim(q, q))
    kl, ks = _kld(llama_ref, llama_q), _kld(sim_ref, sim_q)
    print(f"\n{arch} q4_0 rotation={rotation}: KLD vs f16 llama.cpp {kl:.4f}, sim {ks:.4f} (ratio {ks / kl:.2f})")
    assert 0.25 * kl <= ks <= 4 * kl


def test_kvedge_pcr_runs_and_meets_its_own_fidelity_targets(synthetic, tmp_path):
    """The whole diagnosis on each layout (its calibration prompts rendered with the synthetic model's
    ChatML template): exit 0, and pcr.json's fidelity check (f16 top-1 and KLD, q4_0 KLD ratio and rank
    correlation with the rotation on and off) passes by the targets it states."""
    arch, model, _, _ = synthetic
    proc = run_cli("pcr", str(model.path), "--out", str(tmp_path), "-q", env={"KVEDGE_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    fid = json.loads((tmp_path / "pcr.json").read_text())["fidelity"]
    assert fid["verified_architecture"] and fid["f16_meets_target"]
    assert [q["meets_target"] for q in fid["quantized"]] == [True, True]


def test_an_unverified_architecture_is_refused_by_name(tmp_path):
    from support.fakes import write_tiny_gguf

    write_tiny_gguf(tmp_path / "g.gguf", arch="falcon")
    proc = run_cli("pcr", str(tmp_path / "g.gguf"), "--out", str(tmp_path / "out"), "-q")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "no torch forward for architecture 'falcon'" in proc.stderr and "gemma3" in proc.stderr


def test_channel_smoothing_is_exact_on_each_layout(synthetic, tmp_path):
    """The smoothing's reparametrisation with each layout's own RoPE pairing and norm placement (qwen2's
    biases, qwen3's K/Q norms carrying the scale): the patched model's llama.cpp distributions at f16 KV
    are those of the original within the noise of changing only the arithmetic (flash attention off).
    phi3's fused QKV is refused, not patched wrongly."""
    import gguf as gguf_py

    from kvedge.mitigate.gguf_patch import patch_gguf
    from kvedge.mitigate.simulate import geometry
    from kvedge.mitigate.smooth import UNSMOOTHABLE, Smoothing, exponents, tensor_scales

    arch, model, tm, cases = synthetic
    g = geometry(tm)
    rng = np.random.default_rng(7)
    # channel abs-maxima spread over 2^-3..2^3, so that every group gets a non-zero exponent somewhere
    sm = Smoothing.of({(layer, kind): exponents(2.0 ** rng.uniform(-3, 3, g.n_head_kv * g.head_dim(kind)), kind, 1.0, g)
                       for layer in range(tm.hp.n_layer) for kind in ("k", "v")})
    names = {t.name for t in gguf_py.GGUFReader(model.path).tensors}
    if arch in UNSMOOTHABLE:
        with pytest.raises(ValueError, match="fused"):
            tensor_scales(sm, g, names)
        return
    scales = tensor_scales(sm, g, names)
    assert any(ts.name.endswith("attn_k_norm.weight") for ts in scales) == (arch in ("qwen3", "gemma3"))
    assert any(ts.name.endswith("attn_k.bias") for ts in scales) == (arch == "qwen2")
    assert any(any(ts.exps) for ts in scales), "nothing to rescale: the test would be vacuous"
    patch_gguf(model.path, tmp_path / "m.gguf", scales, {"kvedge.test": "1"})
    before = {t.name: np.array(t.data) for t in gguf_py.GGUFReader(model.path).tensors}
    after = {t.name: np.array(t.data) for t in gguf_py.GGUFReader(tmp_path / "m.gguf").tensors}
    assert [n for n in before if not np.array_equal(before[n], after[n])], "the patch changed no weight"
    ref = _llama(model, F16, True, cases)
    patched = _llama(inspect_model(tmp_path / "m.gguf"), F16, True, cases)
    with Runtime(model, F16, True, RuntimeOptions(n_ctx=512, n_threads=1, flash_attn=False)) as rt:
        noise = [np.stack(list(rt.score(c[:N_PROMPT], c[N_PROMPT:]))) for c in cases]
    k, kn = _kld(ref, patched), _kld(ref, noise)
    print(f"\n{arch} smoothed: KLD vs original {k:.2e}; noise (flash attention off) {kn:.2e}")
    assert k <= max(2 * kn, 1e-7) and _top1(ref, patched) >= _top1(ref, noise)
