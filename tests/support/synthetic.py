"""Tiny GGUFs with random weights in exactly the tensor names, shapes and metadata llama.cpp expects for an
architecture, so that llama.cpp and kvedge's torch forward can be compared without a real model of that
family (tests/e2e/test_architectures.py). Written by the test with a fixed seed; nothing is stored.

Each model has 2 layers, head size 64 (so llama.cpp's rotation applies), 2 query heads on 1 KV head
(GQA) and the default model's tokenizer (llama.cpp needs a real vocabulary to run)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

N_LAYER, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF = 2, 2, 1, 64, 256
N_EMBD = N_HEAD * HEAD_DIM
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ARCHS = ("llama", "mistral3", "qwen2", "qwen3", "phi3", "gemma3")


@lru_cache(maxsize=1)
def _tokenizer() -> dict:
    """The default model's tokenizer, read once."""
    import gguf

    from kvedge.gguf.model import default_model_path

    r = gguf.GGUFReader(str(default_model_path()))
    f = r.fields

    def strings(name: str) -> list[str]:
        fld = f[name]
        return [bytes(fld.parts[i]).decode("utf-8") for i in fld.data]

    def scalar(name: str):
        fld = f[name]
        return fld.parts[fld.data[0]].tolist()[0]

    return {"model": bytes(f["tokenizer.ggml.model"].parts[-1]).decode(), "pre": bytes(f["tokenizer.ggml.pre"].parts[-1]).decode(),
            "tokens": strings("tokenizer.ggml.tokens"), "merges": strings("tokenizer.ggml.merges"),
            "types": [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data],
            "bos": int(scalar("tokenizer.ggml.bos_token_id")), "eos": int(scalar("tokenizer.ggml.eos_token_id"))}


def n_vocab() -> int:
    return len(_tokenizer()["tokens"])


def write_synthetic(path: Path, arch: str, seed: int = 0) -> Path:
    """A valid `arch` GGUF of random weights (scaled so that next-token distributions are peaked, which makes
    top-1 agreement a real test)."""
    import gguf

    if arch not in ARCHS:
        raise ValueError(f"no synthetic {arch}")
    rng = np.random.default_rng(seed)
    tok = _tokenizer()
    v = len(tok["tokens"])

    def mat(rows: int, cols: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("kvedge synthetic")  # llama.cpp keys token attributes on names such as "phi3"
    w.add_context_length(2048)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0 if arch == "gemma3" else 10000.0)
    if arch == "gemma3":  # layer 0 slides (RoPE base 10,000, llama.cpp's default), layer 1 is global
        w.add_sliding_window(512)
        w.add_uint32("gemma3.attention.sliding_window_pattern", 2)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_chat_template(CHATML)  # so that `kvedge pcr` can render its calibration prompts
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    # gemma3's tied output reads the embeddings: a smaller scale keeps its next-token distributions spread
    w.add_tensor("token_embd.weight", (rng.standard_normal((v, N_EMBD)) * (0.25 if arch == "gemma3" else 1.0))
                 .astype(np.float16))
    w.add_tensor("output_norm.weight", norm(N_EMBD))
    if arch != "gemma3":  # gemma3 ties its output to the embeddings
        w.add_tensor("output.weight", mat(v, N_EMBD, 4.0).astype(np.float16))
    kv = N_HEAD_KV * HEAD_DIM
    for i in range(N_LAYER):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", norm(N_EMBD))
        q, k, v = mat(N_EMBD, N_EMBD, 2.0), mat(kv, N_EMBD, 2.0), mat(kv, N_EMBD)
        if arch == "phi3":  # one fused matrix, Q then K then V rows
            w.add_tensor(b + "attn_qkv.weight", np.concatenate([q, k, v]))
        else:
            w.add_tensor(b + "attn_q.weight", q)
            w.add_tensor(b + "attn_k.weight", k)
            w.add_tensor(b + "attn_v.weight", v)
        if arch == "qwen2":
            for name, n in (("attn_q", N_EMBD), ("attn_k", kv), ("attn_v", kv)):
                w.add_tensor(b + name + ".bias", (0.5 * rng.standard_normal(n)).astype(np.float32))
        if arch in ("qwen3", "gemma3"):
            w.add_tensor(b + "attn_q_norm.weight", norm(HEAD_DIM))
            w.add_tensor(b + "attn_k_norm.weight", norm(HEAD_DIM))
        if arch == "gemma3":
            # post-norms larger than the embeddings, so the layers (not the tied identity) decide the next token
            w.add_tensor(b + "post_attention_norm.weight", 4 * norm(N_EMBD))
            w.add_tensor(b + "post_ffw_norm.weight", 4 * norm(N_EMBD))
        w.add_tensor(b + "attn_output.weight", mat(N_EMBD, N_EMBD))
        w.add_tensor(b + "ffn_norm.weight", norm(N_EMBD))
        gate, up = mat(N_FF, N_EMBD), mat(N_FF, N_EMBD)
        if arch == "phi3":  # gate then up rows in one matrix
            w.add_tensor(b + "ffn_up.weight", np.concatenate([gate, up]))
        else:
            w.add_tensor(b + "ffn_gate.weight", gate)
            w.add_tensor(b + "ffn_up.weight", up)
        w.add_tensor(b + "ffn_down.weight", mat(N_EMBD, N_FF))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
