"""Run in a subprocess by tests/e2e/test_native.py, so that each run picks its own libllama (llama-cpp-python
chooses one per process, at import). Drives llama.cpp directly (not through kvedge's Runtime), so that
the library itself is under test: the context's types, LLAMA_KV_LAYER_TYPES and LLAMA_ATTN_ROT_DISABLE
exactly as given.

    python tests/support/native_probe.py OUT.npz TYPE_K TYPE_V [LAYER_TYPES|-] [on|off]

Writes the logits at every position of a fixed teacher-forced sequence, the sequence's KV state as
llama.cpp serialises it, llama.cpp's load log, the libllama path and the libggml files mapped in.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

import numpy as np

TEXT = ("<|im_start|>user\nExplain in two sentences why the sky is blue.<|im_end|>\n<|im_start|>assistant\n"
        "The sky looks blue because air molecules scatter short wavelengths of sunlight more than long ones.")


def main() -> None:
    out, type_k, type_v = sys.argv[1:4]
    layer_types = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "-" else None
    rotation = (sys.argv[5] if len(sys.argv) > 5 else "on") == "on"
    os.environ.pop("LLAMA_KV_LAYER_TYPES", None)
    os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
    if layer_types:
        os.environ["LLAMA_KV_LAYER_TYPES"] = layer_types
    if not rotation:
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"

    import llama_cpp

    from kvedge.gguf import kvtypes
    from kvedge.gguf.model import default_model_path

    log: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level, text, user_data):
        log.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        llm = llama_cpp.Llama(model_path=str(default_model_path()), n_ctx=256, n_batch=256, n_ubatch=256,
                              n_threads=1, n_threads_batch=1, flash_attn=True, verbose=False,
                              type_k=int(kvtypes.ggml_type(type_k)), type_v=int(kvtypes.ggml_type(type_v)))
    except ValueError as exc:  # the context was refused: say why (the log holds llama.cpp's reason)
        Path(out).with_suffix(".json").write_text(json.dumps({"error": str(exc), "log": "".join(log)}))
        return
    tokens = llm.tokenize(TEXT.encode(), add_bos=True, special=True)
    n_vocab = llm.n_vocab()
    prompt = tokens[:16]
    logits = []
    llm.reset()
    llm.eval(prompt)
    logits.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy())
    for tok in tokens[16:]:
        llm.eval([tok])
        logits.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy())
    size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_seq_get_data(llm.ctx, buf, size, 0)
    roundtrip = _roundtrip(llama_cpp, llm, bytes(buf)[:written], tokens, type_k, type_v, layer_types)
    maps = Path("/proc/self/maps").read_text().splitlines() if Path("/proc/self/maps").exists() else []
    ggml = sorted({str(Path(line.split()[-1]).resolve()) for line in maps if "/libggml" in line})
    np.savez(out, logits=np.stack(logits), state=np.frombuffer(bytes(buf)[:written], dtype=np.uint8),
             n_tokens=len(tokens))
    Path(out).with_suffix(".json").write_text(json.dumps({
        "lib": str(Path(llama_cpp.llama_cpp._lib._name).resolve()), "ggml": ggml, "log": "".join(log),
        "n_tokens": len(tokens), **roundtrip}))
    llm.close()


def _context(llama_cpp, llm, type_k: str, type_v: str):
    from kvedge.gguf import kvtypes

    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_threads, params.n_threads_batch = 256, 256, 256, 1, 1
    params.type_k, params.type_v = int(kvtypes.ggml_type(type_k)), int(kvtypes.ggml_type(type_v))
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    return llama_cpp.llama_init_from_model(llm.model, params)


def _next_logits(llama_cpp, ctx, token: int, n_vocab: int) -> np.ndarray:
    ids = (llama_cpp.llama_token * 1)(token)  # kept alive while the batch points at it
    batch = llama_cpp.llama_batch_get_one(ids, 1)
    assert llama_cpp.llama_decode(ctx, batch) == 0
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()


def _roundtrip(llama_cpp, llm, state: bytes, tokens, type_k, type_v, layer_types) -> dict:
    """The saved sequence loaded into a fresh context of the same types continues exactly as the original
    would; a context whose layers hold other types refuses it (llama.cpp checks each layer's type)."""
    n_vocab = llm.n_vocab()
    src = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
    same = _context(llama_cpp, llm, type_k, type_v)
    loaded = llama_cpp.llama_state_seq_set_data(same, src, len(state), 0)
    after_load = _next_logits(llama_cpp, same, tokens[-1], n_vocab)
    llm.eval([tokens[-1]])
    original = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()
    llama_cpp.llama_free(same)
    out = {"state_loaded": bool(loaded), "roundtrip_equal": bool(np.array_equal(after_load, original))}
    if layer_types:  # the same base types without the map: a cache whose layers differ from the saved ones
        os.environ.pop("LLAMA_KV_LAYER_TYPES")
        other = _context(llama_cpp, llm, type_k, type_v)
        out["uniform_context_accepts_state"] = bool(llama_cpp.llama_state_seq_set_data(other, src, len(state), 0))
        llama_cpp.llama_free(other)
        os.environ["LLAMA_KV_LAYER_TYPES"] = layer_types
    return out


if __name__ == "__main__":
    main()
