"""What must hold in a runtime for a deployment to run the configuration kvedge verified.

A cache setting can fail to apply without any error: llama.cpp quantizes V only with flash attention
(Ollama's cache setting does nothing without it); a GPU backend without a flash-attention kernel for a
K/V type pair runs that attention elsewhere, silently slow; models with MLA attention take one type for
K and V; Ollama has one cache type for every model it serves; llama.cpp's rotation is switched off by an
environment variable and is absent from older builds. Export states each precondition that applies, in
deploy.json, DEPLOY.md and every launch file it concerns; `refusal` names a configuration that no runtime
can run as verified, and export and verify refuse it.

`check` says how each one is checked: `rendered` (kvedge writes it into each launch file and `kvedge
verify` reads it back), `doctor` (run `kvedge doctor MODEL` on the device: it lists each backend's
flash-attention kernels per K/V pair and the rotation llama.cpp applies per side) or `unobservable`
(kvedge cannot see it from outside the runtime; the user must).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..gguf import kvtypes
from ..gguf.model import ModelInfo
from ..results.deploy import PRECONDITION_CHECKS, Launch

LLAMA_RUNTIMES = ("llama-server", "llama-cli", "llama-cpp-python")
OLLAMA = "ollama"
ALL_RUNTIMES = (*LLAMA_RUNTIMES, OLLAMA)


@dataclass(frozen=True)
class Precondition:
    id: str
    requirement: str  # what must hold
    why: str  # what happens otherwise
    runtimes: tuple[str, ...]
    check: str  # rendered | doctor | unobservable

    def to_dict(self) -> dict:
        return {**asdict(self), "runtimes": list(self.runtimes)}

    def comment(self) -> str:
        """One line for a launch file's comments."""
        return f"requires: {self.requirement} ({self.why}; checked: {PRECONDITION_CHECKS[self.check]})"


def _types(launch: Launch, side: int) -> set[str]:
    base = launch.type_k if side == 0 else launch.type_v
    return {base, *(pair[side] for pair in launch.layer_types or ())}


def quantized(launch: Launch) -> bool:
    return any(kvtypes.is_quantized(t) for t in _types(launch, 0) | _types(launch, 1))


def rotation_requirement(rotation: bool, is_quantized: bool = True) -> str:
    if not is_quantized:
        return "an f16 cache: llama.cpp's attention rotation applies only to quantized caches, so none is needed"
    if rotation:
        return ("measured with llama.cpp's attention rotation of quantized caches (PR #21038 and later, as in the "
                "llama.cpp llama-cpp-python 0.3.36 vendors): run a build that has it, with LLAMA_ATTN_ROT_DISABLE "
                "unset; older builds and runtimes that bundle them do not rotate, so re-verify there with "
                "--rotation off")
    return ("measured without llama.cpp's attention rotation: on builds that have it (PR #21038 and later) set "
            "LLAMA_ATTN_ROT_DISABLE=1 before the context is created; builds before it never rotate")


def preconditions(launch: Launch, model: ModelInfo | None) -> list[Precondition]:
    """Every precondition of this launch, in the order DEPLOY.md lists them."""
    k_types, v_types = _types(launch, 0), _types(launch, 1)
    v_quantized = any(kvtypes.is_quantized(t) for t in v_types)
    out = [Precondition(
        "flash-attention", "flash attention on (llama.cpp -fa on, llama-cpp-python flash_attn=True, Ollama "
        "OLLAMA_FLASH_ATTENTION=1)",
        "llama.cpp quantizes the V cache only with flash attention: without it llama.cpp refuses the context and "
        "Ollama silently keeps an f16 cache" if v_quantized else
        "the configuration was measured with flash attention; without it the arithmetic, and verdicts, change",
        ALL_RUNTIMES, "rendered")]
    if quantized(launch):
        mixed = len(k_types | v_types) > 1
        out.append(Precondition(
            "flash-attention-kernel",
            f"a flash-attention kernel for K {'/'.join(sorted(k_types))} with V {'/'.join(sorted(v_types))} on the "
            "device's backend",
            "a backend without one runs that attention on another device or converts the cache, silently slow"
            + ("; CUDA builds before the f16 fallback compile mixed K/V pairs only with -DGGML_CUDA_FA_ALL_QUANTS=ON "
               "(LLAMA_CUDA_FA_ALL_QUANTS in older trees)" if mixed else ""),
            LLAMA_RUNTIMES if mixed else ALL_RUNTIMES, "doctor"))
        out.append(Precondition(
            "rotation", rotation_requirement(launch.rotation),
            "the rotation changes the quantized cache's arithmetic and the verdicts measured with it",
            ALL_RUNTIMES, "rendered" if not launch.rotation else "doctor"))
    if model is not None and model.mla:
        out.append(Precondition(
            "mla-one-type", "K and V caches of one type",
            f"{model.architecture} uses MLA attention, which holds K and V in one cache: llama.cpp refuses a "
            "context with different types", ALL_RUNTIMES, "rendered"))
    if launch.k_transform:
        out.append(Precondition(
            "native-k-transform", "kvedge's native llama.cpp, which applies the model's K transform (kvedge.k_transform.* "
            "metadata): for llama-cpp-python the library `kvedge build-native` builds (LLAMA_CPP_LIB_PATH), for "
            "llama-server and llama-cli binaries built from the same patched tree (native/README.md)",
            "a stock llama.cpp, llama-server or Ollama loads the file but ignores the transform: it runs the "
            "unmitigated cache, which export found unsafe", LLAMA_RUNTIMES, "unobservable"))
    if launch.layer_types:
        out.append(Precondition(
            "native-build", "kvedge's native llama.cpp build, which reads LLAMA_KV_LAYER_TYPES",
            "stock llama.cpp, llama-server and Ollama ignore the per-layer map and run one type per cache",
            ("llama-cpp-python",), "rendered"))
    if ollama_refusal(launch) is None:
        out.append(Precondition(
            "ollama-global", "OLLAMA_KV_CACHE_TYPE and OLLAMA_FLASH_ATTENTION set for the whole Ollama server",
            "Ollama has one cache type for every model it serves (no K/V split, no per-model setting): every other "
            "model on that server runs with this cache too, unaudited", (OLLAMA,), "unobservable"))
        return out
    # no Ollama file is written for what Ollama cannot express: its name would promise one
    return [replace(p, runtimes=tuple(r for r in p.runtimes if r != OLLAMA)) for p in out]


def for_runtime(pre: list[Precondition], runtime: str) -> list[Precondition]:
    return [p for p in pre if runtime in p.runtimes]


OLLAMA_KV_TYPES = ("f16", "q8_0", "q4_0")


def ollama_refusal(launch: Launch) -> str | None:
    """Why Ollama cannot run this launch, or None."""
    if launch.k_transform:
        return "Ollama's llama.cpp does not apply kvedge's K transform (kvedge's native build only)"
    if launch.layer_types is not None:
        return "Ollama has one cache type for every layer; this deployment sets types per layer"
    if launch.type_k != launch.type_v:
        return (f"Ollama has one cache type for K and V (OLLAMA_KV_CACHE_TYPE); this deployment needs "
                f"K {launch.type_k} and V {launch.type_v}: use llama-server or llama-cpp-python")
    if launch.type_k not in OLLAMA_KV_TYPES:
        return f"Ollama's OLLAMA_KV_CACHE_TYPE takes {', '.join(OLLAMA_KV_TYPES)}, not {launch.type_k}"
    return None


def refusal(launch: Launch, model: ModelInfo | None) -> str | None:
    """Why no runtime can run this launch as verified, or None."""
    if model is not None and model.mla and (_types(launch, 0) != _types(launch, 1) or launch.layer_types):
        return (f"{model.architecture} uses MLA attention: llama.cpp takes one cache type for K and V, and this "
                f"deployment needs K {launch.type_k} and V {launch.type_v}"
                + (" (per layer)" if launch.layer_types else ""))
    if not launch.flash_attn and any(kvtypes.is_quantized(t) for t in _types(launch, 1)):
        return f"a quantized V cache ({launch.type_v}) needs flash attention, and this deployment turns it off"
    return None
