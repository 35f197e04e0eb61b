"""llama.cpp through llama-cpp-python: one `Runtime` per (model, KV config, rotation, arithmetic).

Decoding is kvedge's own greedy loop over `llama_get_logits_ith`, not llama-cpp-python's sampler, so
that (a) greedy means argmax and nothing else, and (b) the same loop can teacher-force a reference
continuation and read every position's logits. Each prompt starts from an empty cache: llama-cpp-
python would otherwise reuse the KV of a shared prefix (the system prompt) from the previous prompt,
which makes results depend on prompt order.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from . import kvtypes, native
from .errors import KVTypeError, ModelFileError
from .kvmap import F16, KVConfig, parse_kv, parse_kv_list  # noqa: F401  (where callers have always found them)
from .model import ModelInfo
from .scoring import log_softmax

ROTATION_ENV = "LLAMA_ATTN_ROT_DISABLE"
LAYER_TYPES_ENV = native.LAYER_TYPES_ENV
THREADS_ENV = "KVEDGE_THREADS"  # the default thread count, for machines shared with other work


ROTATIONS = {"on": (True,), "off": (False,), "both": (True, False)}


def parse_rotation(spec: str) -> tuple[bool, ...]:
    """`on` (current llama.cpp rotates quantized caches), `off` (older builds), `both`."""
    try:
        return ROTATIONS[spec]
    except (KeyError, TypeError):
        raise KVTypeError(f"--rotation must be on, off or both, not {spec!r}") from None


@dataclass(frozen=True)
class RuntimeOptions:
    """How llama.cpp is run. Every field that can change arithmetic enters the store key."""

    n_ctx: int = 4096
    n_threads: int | None = None
    n_gpu_layers: int = 0
    n_batch: int = 512
    n_ubatch: int = 512
    flash_attn: bool = True
    seed: int = 0

    def resolved_threads(self) -> int:
        """The thread count asked for, else $KVEDGE_THREADS, else all cores up to 8. llama.cpp's CPU
        threads spin while they wait for each other, so two multi-threaded runs on the same cores slow
        each other by far more than half: on a shared machine, set KVEDGE_THREADS=1."""
        if self.n_threads:
            return self.n_threads
        env = os.environ.get(THREADS_ENV, "").strip()
        if env.isdigit() and int(env) > 0:
            return int(env)
        return max(1, min(os.cpu_count() or 1, 8))

    def key(self) -> dict:
        d = asdict(self)
        d["n_threads"] = self.resolved_threads()
        return d


@dataclass(frozen=True)
class Generation:
    tokens: list[int]
    text: str
    n_prompt_tokens: int
    stop_reason: str  # "eog" | "max_tokens" | "ctx"
    prompt_seconds: float
    decode_seconds: float
    # with generate(..., logprobs=True): log-softmax of every step's logits, the step that chose the
    # end of generation included (so len(tokens) or len(tokens) + 1 rows)
    logprobs: list[np.ndarray] | None = None


_env_lock = threading.Lock()


@contextlib.contextmanager
def _rotation_env(rotation: bool, layer_types: str | None = None) -> Iterator[None]:
    """llama.cpp reads LLAMA_ATTN_ROT_DISABLE (and the native build LLAMA_KV_LAYER_TYPES) when a context
    is created: set them only for that moment, so that neither leaks into another context (an f16
    reference or a noise run). Unset means unset: a value the caller's environment held is restored after."""
    wanted = {ROTATION_ENV: None if rotation else "1", LAYER_TYPES_ENV: layer_types}
    with _env_lock:
        old = {name: os.environ.get(name) for name in wanted}
        for name, value in wanted.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        try:
            yield
        finally:
            for name, value in old.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def backend_info(n_gpu_layers: int = 0) -> dict:
    """What arithmetic this process runs: the llama.cpp build and the device kind in use."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    kind = "cpu"
    if gpu and n_gpu_layers != 0:
        low = info.lower()
        kind = "cuda" if "cuda" in low else "metal" if "metal" in low else "vulkan" if "vulkan" in low else "gpu"
    lib = native.loaded_library()
    return {
        "kind": kind,
        "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
        "gpu_offload_supported": gpu,
        "system_info": info,
        "library": {**lib.to_dict(), "key": lib.key} if lib else None,
    }


class Runtime:
    """A loaded llama.cpp context for one configuration. Use as a context manager.

    The audit reaches it through a `RuntimeFactory` (below), so a unit test can hand it a fake with the
    same methods (`tokenize`, `generate`, `score`, `close`) and test everything above it in milliseconds."""

    def __init__(
        self,
        model: ModelInfo,
        kv: KVConfig,
        rotation: bool = True,
        options: RuntimeOptions = RuntimeOptions(),
        lora_path: Path | None = None,
    ):
        if kv.per_layer:
            native.require_native()  # before llama_cpp is imported: the stock library would ignore the map
        from llama_cpp import Llama

        kv.check_fits(model)
        if kv.v_quantized and not options.flash_attn:
            raise KVTypeError(f"quantized V cache ({kv.type_v}) needs flash attention in llama.cpp")
        self.model, self.kv, self.rotation, self.options = model, kv, rotation, options
        n_ctx = options.n_ctx
        if model.n_ctx_train:
            n_ctx = min(n_ctx, model.n_ctx_train)
        with _rotation_env(rotation, kv.layer_types_env()):
            try:
                self.llm = Llama(
                    model_path=str(model.path),
                    n_ctx=n_ctx,
                    n_batch=options.n_batch,
                    n_ubatch=options.n_ubatch,
                    n_threads=options.resolved_threads(),
                    n_threads_batch=options.resolved_threads(),
                    n_gpu_layers=options.n_gpu_layers,
                    flash_attn=options.flash_attn,
                    type_k=int(kvtypes.ggml_type(kv.type_k)),
                    type_v=int(kvtypes.ggml_type(kv.type_v)),
                    lora_path=str(lora_path) if lora_path else None,
                    seed=options.seed,
                    logits_all=False,
                    verbose=False,
                )
            except (ValueError, RuntimeError, OSError) as exc:
                raise ModelFileError(f"llama.cpp could not load {model.path} with KV {kv.name}: {exc}") from None
        self.n_ctx = self.llm.n_ctx()
        self.n_vocab = self.llm.n_vocab()
        import llama_cpp

        self._lib = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # tokens -----------------------------------------------------------------------------------
    def tokenize(self, rendered: str) -> list[int]:
        toks = self.llm.tokenize(rendered.encode("utf-8"), add_bos=True, special=True)
        bos = self.llm.token_bos()
        if len(toks) >= 2 and toks[0] == bos and toks[1] == bos:
            toks = toks[1:]  # the template wrote BOS itself and the tokenizer added another
        return toks

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    # forward ----------------------------------------------------------------------------------
    def _last_logits(self) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _start(self, prompt: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(prompt)

    def generate(self, prompt: list[int], max_tokens: int, logprobs: bool = False) -> Generation:
        if len(prompt) >= self.n_ctx:
            return Generation([], "", len(prompt), "ctx", 0.0, 0.0)
        t0 = time.perf_counter()
        self._start(prompt)
        t1 = time.perf_counter()
        out: list[int] = []
        kept: list[np.ndarray] | None = [] if logprobs else None
        stop = "max_tokens"
        while len(out) < max_tokens:
            if len(prompt) + len(out) >= self.n_ctx:
                stop = "ctx"
                break
            logits = self._last_logits()
            if kept is not None:
                kept.append(log_softmax(logits))
            tok = int(np.argmax(logits))
            if self.is_eog(tok):
                stop = "eog"
                break
            out.append(tok)
            if len(out) < max_tokens:
                self.llm.eval([tok])
        t2 = time.perf_counter()
        return Generation(out, self.detokenize(out), len(prompt), stop, t1 - t0, t2 - t1, kept)

    def score(self, prompt: list[int], continuation: list[int]) -> Iterator[np.ndarray]:
        """Teacher-force `continuation` after `prompt`, yielding the log-softmax before each of its
        tokens (and one more after the last, so an empty continuation still yields the first step).
        Token by token, as generation runs, so a config is scored under the arithmetic it generates with."""
        self._start(prompt)
        for i, tok in enumerate(continuation):
            yield log_softmax(self._last_logits())
            if i < len(continuation) - 1:
                self.llm.eval([tok])


class RuntimeFactory(Protocol):
    """Where an audit's runtimes come from: llama.cpp in this process (`LLAMA_CPP`), or a test's fake."""

    def backend(self, n_gpu_layers: int) -> dict: ...

    def open(self, model: ModelInfo, kv: KVConfig, rotation: bool, options: RuntimeOptions,
             lora_path: Path | None) -> Runtime: ...


class _LlamaCpp:
    def backend(self, n_gpu_layers: int) -> dict:
        return backend_info(n_gpu_layers)

    def open(self, model: ModelInfo, kv: KVConfig, rotation: bool, options: RuntimeOptions,
             lora_path: Path | None) -> Runtime:
        return Runtime(model, kv, rotation, options, lora_path)


LLAMA_CPP: RuntimeFactory = _LlamaCpp()
