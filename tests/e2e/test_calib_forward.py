"""The torch forward (kvedge.pcr.torch.gguf_torch) against real llama.cpp on the default model.

Reference positions: 6 calibration prompts (3 harmful, 3 harmless), chat template applied with the
generation prompt and tokenized by llama.cpp itself; llama.cpp's greedy continuation (20 tokens) is
teacher-forced, so each prompt gives its last prompt position plus 19 generated positions.

Both sides run single-threaded: with 2 threads, llama.cpp's spinning thread pool and torch slow down
by 10-100x whenever another process holds a core, and one thread keeps each file under a minute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvedge.gguf.template import chat_template_for  # noqa: E402
from kvedge.pcr.torch.gguf_torch import TorchModel  # noqa: E402
from kvedge.pcr.torch.kvquant import parse_scheme, rotate, rotation_block, unrotate  # noqa: E402
from kvedge.datasets import select_prompts  # noqa: E402
from kvedge.gguf.model import inspect_model  # noqa: E402
from kvedge.llama.runtime import KVConfig, Runtime, RuntimeOptions  # noqa: E402
from kvedge.llama.scoring import kld  # noqa: E402

N_CONTINUATION = 20
OPTIONS = RuntimeOptions(n_ctx=512, n_threads=1)


@dataclass
class Case:
    prompt: list[int]
    continuation: list[int]
    ref: list[np.ndarray]  # llama.cpp f16 KV log-softmax at each scored position


def llama_scores(model, kv: KVConfig, rotation: bool, cases: list[Case], flash_attn: bool = True) -> list[list[np.ndarray]]:
    opts = RuntimeOptions(n_ctx=OPTIONS.n_ctx, n_threads=1, flash_attn=flash_attn)
    with Runtime(model, kv, rotation, opts) as rt:
        return [list(rt.score(c.prompt, c.continuation)) for c in cases]


def torch_scores(tm: TorchModel, cases: list[Case], kv_transform=None) -> list[list[np.ndarray]]:
    out = []
    with torch.inference_mode():
        for c in cases:
            logits = tm.forward(c.prompt + c.continuation[:-1], kv_transform).logits
            lp = torch.log_softmax(logits.double(), dim=-1)[len(c.prompt) - 1 :]
            out.append(list(lp.numpy()))
    return out


def compare(ref: list[list[np.ndarray]], other: list[list[np.ndarray]]) -> tuple[float, float, list[float]]:
    """(top-1 agreement over positions, mean KLD(ref || other), ref's top-1 margins at flips)."""
    pairs = [(a, b) for ra, rb in zip(ref, other) for a, b in zip(ra, rb)]
    agree = [int(a.argmax() == b.argmax()) for a, b in pairs]
    flips = [float(np.diff(np.sort(a)[-2:])[0]) for a, b in pairs if a.argmax() != b.argmax()]
    return float(np.mean(agree)), float(np.mean([kld(a, b) for a, b in pairs])), flips


@pytest.fixture(scope="module")
def single_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model(model_path):
    return inspect_model(model_path)


@pytest.fixture(scope="module")
def tmodel(model_path, single_thread) -> TorchModel:
    return TorchModel.from_gguf(model_path)


@pytest.fixture(scope="module")
def cases(model) -> list[Case]:
    template = chat_template_for(model)
    pool = select_prompts(split="calib", limit=3)
    prompts = [p for p in pool if p.harmful][:3] + [p for p in pool if not p.harmful][:3]
    assert len(prompts) == 6
    out = []
    with Runtime(model, KVConfig("f16", "f16"), True, OPTIONS) as rt:
        for p in prompts:
            tokens = rt.tokenize(template.render(p.text))
            cont = rt.generate(tokens, N_CONTINUATION).tokens
            assert cont, "llama.cpp generated nothing to teacher-force"
            out.append(Case(tokens, cont, list(rt.score(tokens, cont))))
    return out


@pytest.fixture(scope="module")
def f16_fidelity(tmodel, cases):
    f16 = parse_scheme("f16")
    return compare([c.ref for c in cases], torch_scores(tmodel, cases, tmodel.cache_sim(f16, f16)))


def test_f16_mean_kld_within_spec(f16_fidelity) -> None:
    top1, mean_kld, flips = f16_fidelity
    print(f"\nf16 torch vs llama.cpp: top-1 {top1:.4f}, mean KLD {mean_kld:.5f} nats, flip margins {flips}")
    assert mean_kld < 0.01


# The 0.99 top-1 target is not asserted: measured 0.958 on these 120 positions (5 flips, all where
# llama.cpp's own top-2 margin is < 0.11 nats), while llama.cpp's flash-attention and plain-attention
# paths agree with each other on only 0.933 of them (docs/pcr.md). The two tests below assert what is
# achievable and can fail: as close to llama.cpp as llama.cpp is to itself, and flips only at near-ties.


def test_f16_as_faithful_as_llama_cpp_to_itself(model, tmodel, cases, f16_fidelity) -> None:
    """The floor the spec target sits under: llama.cpp without flash attention vs with it, same
    weights and cache. The torch forward must be at least that close to llama.cpp (FA)."""
    self_top1, self_kld, _ = compare([c.ref for c in cases], llama_scores(model, KVConfig("f16", "f16"), True, cases, False))
    top1, mean_kld, _ = f16_fidelity
    print(f"\nllama.cpp FA vs no-FA: top-1 {self_top1:.4f}, KLD {self_kld:.5f}; torch: top-1 {top1:.4f}, KLD {mean_kld:.5f}")
    assert top1 >= self_top1 - 0.01
    assert mean_kld <= 1.5 * self_kld


def test_f16_confident_positions_all_agree(f16_fidelity) -> None:
    """Every disagreement sits on a near-tie of llama.cpp's own distribution."""
    _, _, flips = f16_fidelity
    assert all(m < 0.25 for m in flips), flips


def test_stopping_at_the_last_layer_skips_the_output_head(tmodel, cases) -> None:
    """A run that stops at the readout layer must not pay for logits even when the readout is the last
    layer (a PCR pass on the canary's readout layer 29 spent a third of its time there)."""
    tokens = cases[0].prompt
    last = tmodel.hp.n_layer - 1
    with torch.inference_mode():
        stopped = tmodel.forward(tokens, stop_layer=last)
        full = tmodel.forward(tokens)
    assert stopped.logits.numel() == 0 and full.logits.shape[0] == len(tokens)
    assert torch.equal(stopped.hidden_per_layer[-1], full.hidden_per_layer[-1])


def test_rotation_is_exact_without_quantization(tmodel, cases) -> None:
    hp = tmodel.hp
    dims = {"k": hp.head_dim_k, "v": hp.head_dim_v}

    def rot_only(layer: int, kind: str, x):
        block = rotation_block(kind, dims[kind])  # type: ignore[arg-type]
        return unrotate(rotate(x, block), block)

    with torch.inference_mode():
        tokens = cases[0].prompt
        plain = tmodel.forward(tokens).logits
        rotated = tmodel.forward(tokens, rot_only).logits
        # Exact up to the float32 rounding of the rotated values (the quantizers consume float32,
        # as llama.cpp's do); 30 layers amplify that 1-ulp noise to ~1e-4 on logits of magnitude ~30
        err = float((rotated - plain).abs().max())
        print(f"\nrotate->unrotate at f32/f16: max |dlogit| {err:.2e}, max |logit| {float(plain.abs().max()):.1f}")
        assert err < 1e-5 * float(plain.abs().max())
        assert torch.equal(rotated.argmax(-1), plain.argmax(-1))
        # an f16 cache is never rotated (llama.cpp gates rotation on a quantized type)
        on = tmodel.forward(tokens, tmodel.cache_sim(parse_scheme("f16"), parse_scheme("f16"))).logits
        off = tmodel.forward(tokens, tmodel.cache_sim(parse_scheme("f16:norot"), parse_scheme("f16:norot"))).logits
        assert torch.equal(on, off)


def test_hidden_per_layer_and_kv_hook_shapes(tmodel, cases) -> None:
    hp, tokens = tmodel.hp, cases[0].prompt[:12]
    seen: list[tuple[int, str, tuple[int, ...]]] = []

    def spy(layer: int, kind: str, x):
        seen.append((layer, kind, tuple(x.shape)))
        return x

    with torch.inference_mode():
        out = tmodel.forward(tokens, spy)
    assert out.logits.shape == (12, hp.n_vocab)
    assert out.hidden_per_layer.shape == (hp.n_layer, 12, hp.n_embd)
    assert len(seen) == 2 * hp.n_layer
    assert seen[0] == (0, "k", (12, hp.n_head_kv * hp.head_dim_k))
    assert seen[1] == (0, "v", (12, hp.n_head_kv * hp.head_dim_v))


def _per_prompt_kld(ref, other) -> list[float]:
    return [float(np.mean([kld(a, b) for a, b in zip(ra, rb)])) for ra, rb in zip(ref, other)]


@pytest.mark.parametrize("rotation", [True, False], ids=["rot", "norot"])
def test_q4_0_simulation_tracks_llama_cpp(model, tmodel, cases, rotation: bool) -> None:
    """Quantized caches cannot match pointwise; the effect must: KLD(q4_0 vs f16) of the sim within
    0.25x-4x of llama.cpp's (loose sanity here; the calibration-set 0.5x-2x check belongs to pcr.py)."""
    f16, q = parse_scheme("f16"), parse_scheme("q4_0", rotation=rotation)
    llama_ref = [c.ref for c in cases]
    llama_q = llama_scores(model, KVConfig("q4_0", "q4_0"), rotation, cases)
    torch_f16 = torch_scores(tmodel, cases, tmodel.cache_sim(f16, f16))
    torch_q = torch_scores(tmodel, cases, tmodel.cache_sim(q, q))
    _, kld_llama, _ = compare(llama_ref, llama_q)
    _, kld_sim, _ = compare(torch_f16, torch_q)
    _, sim_to_llama, _ = compare(llama_q, torch_q)
    per_llama, per_sim = _per_prompt_kld(llama_ref, llama_q), _per_prompt_kld(torch_f16, torch_q)
    rho = float(np.corrcoef(np.argsort(np.argsort(per_llama)), np.argsort(np.argsort(per_sim)))[0, 1])
    print(
        f"\nq4_0 rotation={rotation}: KLD vs f16 llama.cpp {kld_llama:.4f}, sim {kld_sim:.4f} "
        f"(ratio {kld_sim / kld_llama:.2f}); KLD(llama.cpp q4_0 || sim q4_0) {sim_to_llama:.4f}; "
        f"per-prompt Spearman {rho:.2f}"
    )
    assert 0.25 * kld_llama <= kld_sim <= 4 * kld_llama


def test_packed_forward_equals_separate_forwards(tmodel, cases) -> None:
    """The PCR pass packs prompts that share a template prefix into one row; each prompt must see what it
    would alone. At f16 the logits agree to float summation order. Under a quantized cache, a value
    that moves by one ulp can cross a rounding edge (docs/pcr.md), so there the requirement is the
    effect's: packed vs alone must differ far less than the quantization's own effect. A per-channel
    scheme must scale per segment, not across prompts."""
    from kvedge.pcr.torch.gguf_torch import Packed
    from kvedge.pcr.torch.kvquant import parse_scheme
    from kvedge.pcr.calibset import common_prefix
    from kvedge.pcr.stats import kld

    seqs = [c.prompt for c in cases]
    n = len(common_prefix([tuple(s) for s in seqs]))
    assert n > 10, "the chat template should give the prompts a shared prefix"
    packed = Packed.of(seqs[0][:n], [s[n:] for s in seqs])
    last = packed.last()

    def both(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
        sch = parse_scheme(spec)
        with torch.inference_mode():
            together = tmodel.forward(packed, tmodel.cache_sim(sch, sch), logits_at=last).logits
            alone = torch.stack([tmodel.forward(s, tmodel.cache_sim(sch, sch)).logits[-1] for s in seqs])
        return together, alone

    f16_packed, f16_alone = both("f16")
    assert float((f16_packed - f16_alone).abs().max()) < 0.01
    for spec in ("q4_0", "q4_0:norot"):
        q_packed, q_alone = both(spec)
        packing = float(kld(q_alone, q_packed).mean())
        effect = float(kld(f16_alone, q_alone).mean())
        print(f"\n{spec}: KLD packed vs alone {packing:.5f}, quantization effect {effect:.5f}")
        assert packing < 0.25 * effect, (spec, packing, effect)
    ch = parse_scheme("int4-channel:norot")
    with torch.inference_mode():
        seg = tmodel.forward(packed, tmodel.cache_sim(ch, ch, packed=packed), logits_at=last).logits
        mixed = tmodel.forward(packed, tmodel.cache_sim(ch, ch), logits_at=last).logits
    assert not torch.allclose(seg, mixed)  # scales across prompts would leak one prompt into another
