"""LoRA adapters written by kvedge load in the real llama.cpp and act exactly as (alpha/r)·B·A; hostile
adapters are refused against the default model's header before llama.cpp loads them. Reading back what
kvedge writes: tests/unit/test_lora.py."""

import numpy as np
import pytest

from kvedge.errors import ModelFileError
from kvedge.gguf.lora import read_adapter, write_adapter
from kvedge.gguf.model import inspect_model
from kvedge.llama.runtime import KVConfig, Runtime, RuntimeOptions
from kvedge.gguf.template import chat_template_for
from support.adapters import small_adapter as _adapter


def _last_logprobs(model_path, lora):
    m = inspect_model(model_path)
    with Runtime(m, KVConfig("f16", "f16"), True, RuntimeOptions(n_ctx=512), lora) as rt:
        return next(rt.score(rt.tokenize(chat_template_for(m).render("Name three colours.")), [0]))


def test_llama_cpp_applies_the_adapter(tmp_path, model_path):
    write_adapter(tmp_path / "zero.gguf", _adapter(0.0))
    write_adapter(tmp_path / "rand.gguf", _adapter(1.0))
    base = _last_logprobs(model_path, None)
    assert np.abs(_last_logprobs(model_path, tmp_path / "zero.gguf") - base).max() == 0
    assert np.abs(_last_logprobs(model_path, tmp_path / "rand.gguf") - base).max() > 1e-2


def test_a_model_is_not_an_adapter(model_path):
    with pytest.raises(ModelFileError):
        read_adapter(model_path)


# -- hostile adapters: checked against the base from the headers, before llama.cpp loads them ---------------

def _raw_adapter(path, tensors: dict, arch: str = "llama", alpha=("f32", 8.0), kind: str = "lora"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, kind)
    if alpha[0] == "f32":
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha[1])
    else:
        w.add_float64(gguf.Keys.Adapter.LORA_ALPHA, alpha[1])
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _pair(rank_a, n_in, n_out, rank_b=None, dtype=np.float32):
    return {"blk.0.attn_q.weight.lora_a": np.ones((rank_a, n_in), dtype),
            "blk.0.attn_q.weight.lora_b": np.ones((n_out, rank_b or rank_a), dtype)}


BAD_ADAPTERS = {
    # name: (tensors, writer options, what the message says); every one of these crashed or aborted
    # llama.cpp 0.3.36 (exit 139 / 134) before kvedge checked adapters
    "rank mismatch": (_pair(4, 576, 576, rank_b=8), {}, "one rank"),
    "input width": (_pair(4, 512, 576), {}, "widths"),
    "output width": (_pair(4, 576, 512), {}, "widths"),
    "embedding widths": ({"token_embd.weight.lora_a": np.ones((4, 576), np.float32),
                          "token_embd.weight.lora_b": np.ones((576, 4), np.float32)}, {}, "widths"),
    "missing lora_b": ({"blk.0.attn_q.weight.lora_a": np.ones((4, 576), np.float32)}, {}, "lacks the lora_b"),
    "missing lora_a": ({"blk.0.attn_q.weight.lora_b": np.ones((576, 4), np.float32)}, {}, "lacks the lora_a"),
    "int32 halves": (_pair(4, 576, 576, dtype=np.int32), {}, "ggml type 26"),
    "float64 halves": (_pair(4, 576, 576, dtype=np.float64), {}, "ggml type 28"),
    "3-d half": ({"blk.0.attn_q.weight.lora_a": np.ones((2, 4, 576), np.float32),
                  "blk.0.attn_q.weight.lora_b": np.ones((576, 4), np.float32)}, {}, "matrices"),
    "another architecture": (_pair(4, 576, 576), {"arch": "qwen2"}, "architecture 'qwen2'"),
    "another base's tensor": ({"blk.99.attn_q.weight.lora_a": np.ones((4, 576), np.float32),
                               "blk.99.attn_q.weight.lora_b": np.ones((576, 4), np.float32)}, {}, "does not have"),
    "stray tensor": ({**_pair(4, 576, 576), "blk.0.attn_q.weight": np.ones((576, 576), np.float32)}, {},
                     "neither a .lora_a"),
    "float64 alpha": (_pair(4, 576, 576), {"alpha": ("f64", 8.0)}, "float32"),
    "not a lora": (_pair(4, 576, 576), {"kind": "control_vector"}, "not a LoRA adapter"),
    "no tensors": ({}, {}, "no LoRA tensors"),
}


@pytest.fixture(scope="module")
def base(model_path):
    return inspect_model(model_path)


@pytest.mark.parametrize("name", list(BAD_ADAPTERS))
def test_mismatched_adapters_are_refused(tmp_path, base, name):
    from kvedge.gguf.lora import check_adapter

    tensors, opts, needle = BAD_ADAPTERS[name]
    path = _raw_adapter(tmp_path / "bad.gguf", tensors, **opts)
    with pytest.raises(ModelFileError, match=needle) as exc:
        check_adapter(path, base)
    assert "\n" not in str(exc.value)


def test_adapters_llama_cpp_applies_pass(tmp_path, base):
    from kvedge.canary import canary_adapter_path
    from kvedge.gguf.lora import check_adapter

    assert check_adapter(canary_adapter_path(), base) == canary_adapter_path().resolve()
    write_adapter(tmp_path / "a.gguf", _adapter(1.0))
    assert check_adapter(tmp_path / "a.gguf", base)
    with pytest.raises(ModelFileError, match="not a LoRA adapter"):
        check_adapter(base.path, base)


@pytest.mark.parametrize("name", ["rank mismatch", "int32 halves", "3-d half", "another architecture"])
def test_cli_refuses_a_mismatched_adapter(tmp_path, name):
    """Before kvedge checked adapters, `kvedge audit --lora` on each of these died inside llama.cpp."""
    from support.cli import run_cli

    tensors, opts, needle = BAD_ADAPTERS[name]
    path = _raw_adapter(tmp_path / "bad.gguf", tensors, **opts)
    proc = run_cli("audit", "--lora", str(path), "--limit", "1", "--out", str(tmp_path / "o"), "-q", timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("kvedge: error: LoRA adapter"), proc.stderr
    assert needle in lines[0]


def test_llama_cpp_rejection_of_an_adapter_is_an_error_not_a_crash(tmp_path, model_path):
    """The adapter check aside, an adapter llama.cpp itself refuses (here: one for another base) is a
    ModelFileError: llama.cpp hands back a NULL adapter, which kvedge used to apply."""
    tensors, opts, _ = BAD_ADAPTERS["another base's tensor"]
    path = _raw_adapter(tmp_path / "other.gguf", tensors, **opts)
    m = inspect_model(model_path)
    with pytest.raises(ModelFileError, match="rejected the LoRA adapter"):
        Runtime(m, KVConfig("f16", "f16"), True, RuntimeOptions(n_ctx=128), path)
