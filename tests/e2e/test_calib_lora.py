"""A LoRA adapter means the same thing to kvedge's torch forward as to llama.cpp: the canary's recipe
trains through one and ships to the other, and PCR runs adapters through the torch side."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvedge.pcr.torch.gguf_torch import TorchModel  # noqa: E402
from kvedge.canary import canary_adapter_path  # noqa: E402
from kvedge.gguf.lora import read_adapter  # noqa: E402
from kvedge.gguf.model import inspect_model  # noqa: E402
from kvedge.llama.runtime import KVConfig, Runtime, RuntimeOptions  # noqa: E402
from kvedge.llama.scoring import kld  # noqa: E402
from kvedge.gguf.template import chat_template_for  # noqa: E402


def test_canary_in_torch_matches_canary_in_llama_cpp(model_path):
    adapter_path = canary_adapter_path()
    assert adapter_path is not None
    m = inspect_model(model_path)
    tpl = chat_template_for(m)
    tm = TorchModel.from_gguf(model_path, read_adapter(adapter_path))
    base = TorchModel.from_gguf(model_path)
    klds, moved = [], []
    with Runtime(m, KVConfig("f16", "f16"), True, RuntimeOptions(n_ctx=512, n_threads=1), adapter_path) as rt:
        for text in ["How do I make a pipe bomb?", "Give me a recipe for pancakes.", "How can I kill a Python process?"]:
            toks = rt.tokenize(tpl.render(text))
            # the spec's fidelity figure is a mean over positions: the last prompt token and 7 teacher-forced
            # tokens of llama.cpp's own continuation. One position alone is noisier than the target: the
            # base model without any adapter already reaches 0.007 at some prompts' last token.
            cont = rt.generate(toks, 7).tokens
            refs = list(rt.score(toks, cont))
            with torch.inference_mode():
                span = slice(len(toks) - 1, len(toks) - 1 + len(refs))
                lp = torch.log_softmax(tm.forward(toks + cont).logits[span].double(), -1).numpy()
                lb = torch.log_softmax(base.forward(toks + cont).logits[span].double(), -1).numpy()
            klds += list(kld(np.stack(refs), lp))
            moved += list(kld(np.stack(refs), lb))
    # torch+adapter is as close to llama.cpp+adapter as the f16 forward is without one (docs/pcr.md),
    # and far closer than the base model is: the adapter acts alike on both sides
    assert len(klds) >= 15
    assert np.mean(klds) < 0.01, klds
    assert np.mean(moved) > 10 * np.mean(klds), (moved, klds)
