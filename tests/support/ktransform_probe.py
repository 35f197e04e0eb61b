"""Run in a subprocess by tests/e2e/test_native_ktransform.py, so that each run picks its own libllama
(llama-cpp-python chooses one per process, at import: LLAMA_CPP_LIB_PATH, set by the caller, or the wheel's).
Drives llama.cpp directly on any model file:

    python tests/support/ktransform_probe.py OUT.npz MODEL TYPE_K TYPE_V [fa|nofa] [on|off]

Writes the logits at every position of a fixed teacher-forced sequence and, for an f16 K cache, the K rows
the cache holds (OUT.npz: `logits`, `k` [n_layer, n_tokens, n_embd_k_gqa]), and OUT.json: llama.cpp's load
log, the libllama path, whether the context can shift its K cache (llama_memory_can_shift), or, when the model
or the context is refused, the error and the log.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

TEXT = ("<|im_start|>user\nExplain in two sentences why the sky is blue.<|im_end|>\n<|im_start|>assistant\n"
        "The sky looks blue because air molecules scatter short wavelengths of sunlight more than long ones.")
PROMPT = 4  # tokens evaluated as one batch; every later token one at a time


def main() -> None:
    out, model, type_k, type_v = sys.argv[1:5]
    flash = (sys.argv[5] if len(sys.argv) > 5 else "fa") == "fa"
    rotation = (sys.argv[6] if len(sys.argv) > 6 else "on") == "on"
    os.environ.pop("LLAMA_KV_LAYER_TYPES", None)
    os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
    if not rotation:
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"

    import llama_cpp

    from kvedge.gguf import kvtypes

    log: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level, text, user_data):
        log.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    meta: dict = {"lib": str(Path(llama_cpp.llama_cpp._lib._name).resolve())}
    try:
        llm = llama_cpp.Llama(model_path=model, n_ctx=256, n_batch=256, n_ubatch=256, n_threads=1,
                              n_threads_batch=1, flash_attn=flash, verbose=False,
                              type_k=int(kvtypes.ggml_type(type_k)), type_v=int(kvtypes.ggml_type(type_v)))
    except ValueError as exc:  # the model or the context was refused: say why (the log holds llama.cpp's reason)
        Path(out).with_suffix(".json").write_text(json.dumps({**meta, "error": str(exc), "log": "".join(log)}))
        return
    tokens = llm.tokenize(TEXT.encode(), add_bos=True, special=True)
    n_vocab = llm.n_vocab()

    def last() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()

    llm.reset()
    llm.eval(tokens[:PROMPT])
    logits = [last()]
    for tok in tokens[PROMPT:]:
        llm.eval([tok])
        logits.append(last())
    mem = llama_cpp.llama_get_memory(llm.ctx)
    meta.update({"log": "".join(log), "n_tokens": len(tokens), "can_shift": bool(llama_cpp.llama_memory_can_shift(mem))})
    arrays = {"logits": np.stack(logits)}
    if type_k == "f16":
        size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(llm.ctx, buf, size, 0)
        arrays["k"] = k_rows(bytes(buf)[:written])
    np.savez(out, **arrays)
    Path(out).with_suffix(".json").write_text(json.dumps(meta))
    llm.close()


def k_rows(buf: bytes) -> np.ndarray:
    """The K rows of llama.cpp's serialised state of one sequence (llama_state_seq_get_data: unified cache, no
    cell extension, f16 K), float32 [n_layer, n_cells, n_embd_k_gqa]."""
    magic, _seq, n_stream = struct.unpack_from("<IiI", buf, 0)
    assert magic == 0xAF143CD8 and n_stream == 1
    off = 12
    (cells,) = struct.unpack_from("<I", buf, off)
    off += 4
    for _ in range(cells):
        _pos, n_seq = struct.unpack_from("<iI", buf, off)
        off += 8 + 4 * n_seq
    _v_trans, n_layer = struct.unpack_from("<II", buf, off)
    off += 8
    rows = []
    for _ in range(n_layer):
        t, row = struct.unpack_from("<iQ", buf, off)
        off += 12
        assert t == 1  # GGML_TYPE_F16
        rows.append(np.frombuffer(buf, dtype=np.float16, count=row * cells // 2, offset=off).reshape(cells, -1))
        off += row * cells
    return np.stack(rows).astype(np.float32)


if __name__ == "__main__":
    main()
