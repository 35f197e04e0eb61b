"""llama.cpp through llama-cpp-python: one `Runtime` per (model, KV config, rotation, arithmetic).

Decoding is kvedge's own greedy loop over `llama_get_logits_ith`, not llama-cpp-python's sampler, so
that (a) greedy means argmax and nothing else, and (b) the same loop can teacher-force a reference
continuation and read every position's logits. Each prompt starts from an empty cache: llama-cpp-
python would otherwise reuse the KV of a shared prefix (the system prompt) from the previous prompt,
which makes results depend on prompt order.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from ..errors import KVTypeError, ModelFileError
from ..gguf import kvtypes
from ..gguf.kvmap import F16, KVConfig, parse_kv, parse_kv_list  # noqa: F401  (where callers have always found them)
from ..gguf.model import ModelInfo
from . import native
from .applied import AppliedRotation, listening
from .applied import parse as parse_applied
from .decode import Decoder, GenJob
from .scoring import log_softmax

ROTATION_ENV = "LLAMA_ATTN_ROT_DISABLE"
LAYER_TYPES_ENV = native.LAYER_TYPES_ENV
THREADS_ENV = "KVEDGE_THREADS"  # the default thread count, for machines shared with other work
DEFAULT_SEQ_CELLS = 256  # cache cells budgeted per parallel sequence (a prompt and a 64-token answer fit)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl-C waits while llama.cpp objects are made or freed, then lands. A KeyboardInterrupt in between
    left a context and its model to the garbage collector, which may free the model first; glibc then
    aborted the process ("double free or corruption") instead of kvedge exiting 130 with its resume
    message (tests/e2e/test_crash.py)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    caught: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, caught[0])
        elif caught and previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


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
    n_seq: int = 1  # sequences decoded together (1: one prompt at a time)

    def cache_cells(self, n_ctx: int) -> int:
        """Cells of the (unified) cache: one sequence's context, or room for several when they share it."""
        return n_ctx if self.n_seq <= 1 else max(n_ctx, DEFAULT_SEQ_CELLS * self.n_seq)

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
    stop_reason: str  # "eog" | "max_tokens" | "ctx" | "final" (the detector's verdict could no longer change)
    prompt_seconds: float
    decode_seconds: float
    # with generate(..., logprobs=True): log-softmax of every step's logits, the step that chose the
    # end of generation included (so len(tokens) or len(tokens) + 1 rows)
    logprobs: list[np.ndarray] | None = None
    # where the answer came from, when not from this process (a server: kvedge.server), stored beside it
    origin: dict | None = None
    # the first-token refusal margin (kvedge.detectors.openings) when the job asked for it and it could be read
    margin: float | None = None


class Vocabulary:
    """Tokens through a llama-cpp-python `LlamaModel` held as `self._model`: one tokenizer for in-process
    runs and for the server audit's local count, so both see the very same tokens."""

    _model: Any

    def tokenize(self, rendered: str) -> list[int]:
        """A rendered chat prompt's tokens: BOS as the vocabulary wants it, special tokens parsed."""
        toks = self._model.tokenize(rendered.encode("utf-8"), add_bos=True, special=True)
        bos = self._model.token_bos()
        if len(toks) >= 2 and toks[0] == bos and toks[1] == bos:
            toks = toks[1:]  # the template wrote BOS itself and the tokenizer added another
        return toks

    def tokenize_piece(self, text: str, special: bool = False) -> list[int]:
        """Tokens of a bare piece of text: no BOS; `special` parses special tokens such as <|im_end|>."""
        return self._model.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self._model.detokenize(tokens).decode("utf-8", errors="replace")


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


class Runtime(Vocabulary):
    """A llama.cpp context for one configuration, on llama.cpp's C API (through llama-cpp-python's
    bindings), decoding with kvedge's own greedy loop (`decode.Decoder`). Use as a context manager.

    `options.n_seq` sequences share each decode call (1: one prompt at a time); `options.n_ctx` is what
    one sequence may hold, and with several sequences the unified cache gets room for them all
    (`cache_cells`). The audit reaches a Runtime through a `RuntimeFactory` (below), so a unit test can
    hand it a fake with the same methods and test everything above it in milliseconds."""

    def __init__(
        self,
        model: ModelInfo,
        kv: KVConfig,
        rotation: bool = True,
        options: RuntimeOptions = RuntimeOptions(),
        lora_path: Path | None = None,
    ):
        if kv.per_layer or model.k_transform:
            # before llama_cpp is imported: the stock library would ignore the map, and the K transform
            native.require_native()
        import llama_cpp
        from llama_cpp._internals import LlamaContext, LlamaModel
        from llama_cpp._logger import set_verbose
        from llama_cpp._utils import suppress_stdout_stderr

        set_verbose(False)  # llama.cpp's info log off, its errors still printed (what Llama(verbose=False) does)

        kv.check_fits(model)
        if kv.v_quantized and not options.flash_attn:
            raise KVTypeError(f"quantized V cache ({kv.type_v}) needs flash attention in llama.cpp")
        self.model, self.kv, self.rotation, self.options = model, kv, rotation, options
        self._lib = llama_cpp
        self._model = self._ctx = self._adapter = self.decoder = None
        self.applied: AppliedRotation | None = None  # what llama.cpp's log says it applied
        n_ctx = min(options.n_ctx, model.n_ctx_train) if model.n_ctx_train else options.n_ctx
        threads = options.resolved_threads()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = options.n_gpu_layers
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = options.cache_cells(n_ctx)
        cp.n_batch = options.n_batch
        cp.n_ubatch = min(options.n_batch, options.n_ubatch)
        cp.n_threads = cp.n_threads_batch = threads
        cp.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if options.flash_attn
                              else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cp.type_k = int(kvtypes.ggml_type(kv.type_k))
        cp.type_v = int(kvtypes.ggml_type(kv.type_v))
        cp.n_seq_max = options.n_seq + 1 if options.n_seq > 1 else 1  # the last holds a shared prefix
        cp.kv_unified = options.n_seq > 1
        cp.no_perf = True
        with _interrupts_deferred():  # a half-made runtime is closed here, never left to the collector
            try:
                self._model = LlamaModel(path_model=str(model.path), params=mp, verbose=False)
                if lora_path is not None:
                    adapter = llama_cpp.llama_adapter_lora_init(self._model.model, str(lora_path).encode("utf-8"))
                    if not adapter:  # a NULL pointer object, not None: applying it crashed the process
                        raise ValueError(f"llama.cpp rejected the LoRA adapter {lora_path}")
                    self._adapter = adapter
                # the load log silenced; the rotation and per-layer types are read when the context is made
                with _rotation_env(rotation, kv.layer_types_env()), suppress_stdout_stderr(disable=False), \
                        listening(llama_cpp) as log:
                    self._ctx = LlamaContext(model=self._model, params=cp, verbose=False)
                self.applied = parse_applied("".join(log))
                if self._adapter is not None:
                    adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapter)
                    scales = (ctypes.c_float * 1)(1.0)
                    if llama_cpp.llama_set_adapters_lora(self._ctx.ctx, adapters, 1, scales):
                        raise ValueError(f"llama.cpp could not apply the LoRA adapter {lora_path}")
                self._vocab = self._model.vocab
                self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
                self.n_ctx = n_ctx
                self.decoder = Decoder(llama_cpp, self._ctx.ctx, self._vocab, self.n_vocab, n_ctx, options.n_batch,
                                       max(1, options.n_seq))
            except (ValueError, RuntimeError, OSError) as exc:
                self.close()
                raise ModelFileError(f"llama.cpp could not load {model.path} with KV {kv.name}: {exc}") from None
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        with _interrupts_deferred():  # freed wholly or not at all: the context always before its model
            self._close()

    def _close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        if self._adapter is not None:
            self._lib.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        if self._model is not None:
            self._model.close()
            self._model = None

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # tokens (tokenize, tokenize_piece, detokenize: Vocabulary) ----------------------------------
    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    @property
    def eos(self) -> int:
        return int(self._model.token_eos())

    # decoding ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """An empty cache, as for the first prompt."""
        self.decoder.clear()

    def share_prefix(self, prefix: list[int]) -> None:
        """Compute `prefix` once; every later prompt that starts with it reuses its cache cells. Only with
        several sequences (a one-sequence runtime computes each prompt whole, as it always did)."""
        if self.options.n_seq > 1 and prefix:
            self.decoder.set_prefix(prefix)

    def generate_many(self, jobs: Sequence[GenJob]) -> Iterator[tuple[int, Generation]]:
        """Greedy generation of every job, `options.n_seq` at a time; yields (job index, Generation) as
        each finishes."""
        for i, r in self.decoder.generate(jobs):
            yield i, Generation(r.tokens, self.detokenize(r.tokens), r.n_prompt_tokens, r.stop_reason,
                                r.prompt_seconds, r.decode_seconds, r.logprobs, margin=r.first)

    def generate(self, prompt: list[int], max_tokens: int, logprobs: bool = False) -> Generation:
        (_, g), = self.generate_many([GenJob(prompt, max_tokens, None, logprobs)])
        return g

    def score_many(self, jobs: Sequence[tuple[Sequence[int], Sequence[int]]],
                   on_row: Callable[[int, int, np.ndarray], None]) -> Iterator[int]:
        """Teacher-force each (prompt, continuation), `options.n_seq` at a time, one token per sequence per
        decode as generation runs: `on_row(job, k, logp)` gets the log-softmax before continuation token
        k; yields each job's index when it is done."""
        gen = [GenJob(p, max(1, len(c)), None, False, c) for p, c in jobs]
        for i, _ in self.decoder.generate(gen, on_row):
            yield i

    def _prefill(self, prompt: list[int]) -> None:
        """An empty cache, then `prompt` as one sequence, with logits at its last token."""
        d = self.decoder
        d.clear()
        for start in range(0, len(prompt), d.n_batch):
            chunk = prompt[start:start + d.n_batch]
            d._decode([(t, start + k, 0, start + k == len(prompt) - 1) for k, t in enumerate(chunk)])

    def next_logprobs(self, prompt: list[int]) -> np.ndarray:
        """The log-softmax of the next token after `prompt`: one forward pass, nothing generated."""
        self._prefill(prompt)
        lp = log_softmax(self.decoder.logits(-1))
        self.decoder.clear()
        return lp

    def score(self, prompt: list[int], continuation: list[int]) -> Iterator[np.ndarray]:
        """Teacher-force `continuation` after `prompt` one token per decode, as generation runs one
        sequence, yielding the log-softmax before each continuation token. The PCR fidelity check
        compares against these positions token by token."""
        d = self.decoder
        self._prefill(prompt)
        for i, tok in enumerate(continuation):
            yield log_softmax(d.logits(-1))
            if i < len(continuation) - 1:
                d._decode([(tok, len(prompt) + i, 0, True)])
        d.clear()


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
