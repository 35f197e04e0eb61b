"""`kvedge doctor`: what this machine will run an audit on, measured here, on one screen.

The llama.cpp library loaded (stock wheel or kvedge's native build, its revision and patch), the ggml
backends compiled into it and their devices, which K/V cache type pairs have a flash-attention kernel on
each device (ggml's own answer, `ggml_backend_dev_supports_op`, the one llama.cpp's scheduler asks), GPU
offload, whether llama.cpp's attention rotation is active on the K and on the V side for each quantized
cache type on the given model (measured: the logits with and without LLAMA_ATTN_ROT_DISABLE differ or they
do not), torch and its device, free disk and memory.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import KVTypeError
from ..gguf import kvtypes
from ..gguf.archs import ARCHS
from ..gguf.kvmap import KVConfig
from ..gguf.model import ModelInfo
from ..gguf.template import chat_template_for
from . import native
from .runtime import Runtime, RuntimeOptions, backend_info

DEVICE_TYPES = ("CPU", "GPU", "IGPU", "ACCEL", "META")  # ggml_backend_dev_type
GPU_DEVICE_TYPES = ("GPU", "IGPU")
PROBE_PROMPT = "Name three colours."


def _ggml(lib_path: str) -> ctypes.CDLL | None:
    """The libggml beside the loaded libllama (the same file its loader mapped, so no second copy)."""
    for name in ("libggml.so", "libggml.dylib"):
        p = Path(lib_path).parent / name
        if p.exists():
            g = ctypes.CDLL(str(p))
            g.ggml_backend_reg_count.restype = ctypes.c_size_t
            g.ggml_backend_reg_get.restype = ctypes.c_void_p
            g.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
            g.ggml_backend_reg_name.restype = ctypes.c_char_p
            g.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
            g.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
            g.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
            g.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
            g.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
                getattr(g, fn).restype = ctypes.c_char_p
                getattr(g, fn).argtypes = [ctypes.c_void_p]
            g.ggml_backend_dev_type.restype = ctypes.c_int
            g.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
            g.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                                  ctypes.POINTER(ctypes.c_size_t)]
            return g
    return None


def ggml_backends(lib_path: str) -> list[dict[str, Any]] | None:
    """The backends registered in the loaded ggml (compiled in) and their devices (usable here)."""
    g = _ggml(lib_path)
    if g is None:
        return None
    out = []
    for i in range(g.ggml_backend_reg_count()):
        reg = g.ggml_backend_reg_get(i)
        devices = []
        for j in range(g.ggml_backend_reg_dev_count(reg)):
            dev = g.ggml_backend_reg_dev_get(reg, j)
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            g.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            t = g.ggml_backend_dev_type(dev)
            devices.append({"name": g.ggml_backend_dev_name(dev).decode(), "type": DEVICE_TYPES[t] if t < len(DEVICE_TYPES) else str(t),
                            "description": g.ggml_backend_dev_description(dev).decode(),
                            "memory_free": free.value, "memory_total": total.value})
        out.append({"name": g.ggml_backend_reg_name(reg).decode(), "devices": devices})
    return out


# -- flash-attention kernels per K/V pair --------------------------------------------------------------------
#
# llama.cpp's scheduler puts each graph node on the first backend whose device says it supports that op;
# a GPU device that has no flash-attention kernel for a K/V type pair leaves that node to the CPU, silently
# (CUDA compiles only some pairs unless built with GGML_CUDA_FA_ALL_QUANTS). So the question is put to ggml
# exactly as llama.cpp puts it: a FLASH_ATTN_EXT node, built in a no-alloc context, per device.

class _InitParams(ctypes.Structure):
    """struct ggml_init_params (ggml.h), passed to ggml_init by value."""

    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@dataclass(frozen=True)
class AttnShape:
    """One attention node's shape. n_batch 1: a decode step, what llama.cpp reserves when it resolves flash
    attention; n_kv 256: llama.cpp pads the cache view it attends over to a multiple of 256 cells
    (llama_kv_cache::get_n_kv), and CUDA's kernels require that padding."""

    head_dim_k: int
    head_dim_v: int
    n_head: int
    n_head_kv: int
    n_batch: int = 1
    n_kv: int = 256
    source: str = "default"


DEFAULT_ATTN_SHAPE = AttnShape(head_dim_k=128, head_dim_v=128, n_head=8, n_head_kv=8)


def attn_shape(model: ModelInfo | None) -> AttnShape:
    if model is None:
        return DEFAULT_ATTN_SHAPE
    return AttnShape(model.head_dim_k, model.head_dim_v, model.n_head, model.n_head_kv, source="model")


def pair_name(type_k: str, type_v: str) -> str:
    return f"{type_k}/{type_v}"


def _op_type(name: str) -> int:
    """The ggml type llama.cpp hands flash attention for a cache type: an f32 cache is cast to f16 first
    (llama-graph.cpp, build_attn_mha), so the kernel asked about is the f16 one."""
    t = kvtypes.ggml_type(name)
    return int(kvtypes.ggml_type("f16") if t == kvtypes.ggml_type("f32") else t)


def _fits(shape: AttnShape, type_k: str, type_v: str) -> bool:
    """Whether each type's block divides its head size: ggml aborts the process on a tensor that breaks
    this (llama.cpp refuses such a context), so such a pair is never built."""
    return shape.head_dim_k % kvtypes.block_size(type_k) == 0 and shape.head_dim_v % kvtypes.block_size(type_v) == 0


def _graph_lib(lib_path: str, g: ctypes.CDLL) -> ctypes.CDLL:
    """libggml-base beside libggml (where the graph API lives), its prototypes set; ctypes raises
    AttributeError for a symbol an older build lacks, which the probe reports as unknown."""
    base = next((ctypes.CDLL(str(p)) for name in ("libggml-base.so", "libggml-base.dylib")
                 if (p := Path(lib_path).parent / name).exists()), g)  # else: dlsym searches libggml's deps
    vp, i64, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    base.ggml_tensor_overhead.restype = ctypes.c_size_t
    base.ggml_tensor_overhead.argtypes = []
    base.ggml_init.restype = vp
    base.ggml_init.argtypes = [_InitParams]
    base.ggml_free.restype = None
    base.ggml_free.argtypes = [vp]
    base.ggml_new_tensor_4d.restype = vp
    base.ggml_new_tensor_4d.argtypes = [vp, ctypes.c_int, i64, i64, i64, i64]
    base.ggml_permute.restype = vp
    base.ggml_permute.argtypes = [vp, vp, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    base.ggml_flash_attn_ext.restype = vp
    base.ggml_flash_attn_ext.argtypes = [vp, vp, vp, vp, vp, f, f, f]
    g.ggml_backend_dev_count.restype = ctypes.c_size_t
    g.ggml_backend_dev_count.argtypes = []
    g.ggml_backend_dev_get.restype = vp
    g.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    g.ggml_backend_dev_supports_op.restype = ctypes.c_bool
    g.ggml_backend_dev_supports_op.argtypes = [vp, vp]
    return base


def _attn_node(base: ctypes.CDLL, ctx: int, shape: AttnShape, type_k: str, type_v: str) -> int:
    """llama.cpp's flash-attention node: Q, K and V laid out as llama.cpp holds them ([head, heads, tokens]:
    the projections and the cache views) and permuted to [head, tokens, heads], the F16 mask
    [n_kv, n_batch, 1, 1] (llama-graph.cpp, build_attn_inp_kq_mask; this llama.cpp pads no mask rows)."""
    def permuted(ggml_type: int, head: int, heads: int, tokens: int) -> int:
        t = base.ggml_new_tensor_4d(ctx, ggml_type, head, heads, tokens, 1)
        return base.ggml_permute(ctx, t, 0, 2, 1, 3)

    f32, f16 = int(kvtypes.ggml_type("f32")), int(kvtypes.ggml_type("f16"))
    q = permuted(f32, shape.head_dim_k, shape.n_head, shape.n_batch)
    k = permuted(_op_type(type_k), shape.head_dim_k, shape.n_head_kv, shape.n_kv)
    v = permuted(_op_type(type_v), shape.head_dim_v, shape.n_head_kv, shape.n_kv)
    mask = base.ggml_new_tensor_4d(ctx, f16, shape.n_kv, shape.n_batch, 1, 1)
    return base.ggml_flash_attn_ext(ctx, q, k, v, mask, shape.head_dim_k ** -0.5, 0.0, 0.0)


def _pair_support(g: ctypes.CDLL, base: ctypes.CDLL, devices: list[int], shape: AttnShape,
                  type_k: str, type_v: str) -> list[bool | None]:
    """Each device's answer for one pair; None (for all) where the pair cannot hold this head size."""
    if not _fits(shape, type_k, type_v):
        return [None] * len(devices)
    ctx = base.ggml_init(_InitParams(16 * base.ggml_tensor_overhead(), None, True))
    if not ctx:
        raise RuntimeError("ggml_init returned NULL")
    try:
        node = _attn_node(base, ctx, shape, type_k, type_v)
        return [bool(g.ggml_backend_dev_supports_op(dev, node)) for dev in devices]
    finally:
        base.ggml_free(ctx)


def _device_entry(g: ctypes.CDLL, dev: int, pairs: dict[str, bool | None]) -> dict[str, Any]:
    t = g.ggml_backend_dev_type(dev)
    kind = DEVICE_TYPES[t] if t < len(DEVICE_TYPES) else str(t)
    unsupported = [p for p, ok in pairs.items() if ok is False]
    # on a GPU device a missing kernel means the scheduler runs that layer's attention on the CPU
    mixed = [p for p in unsupported if p.split("/")[0] != p.split("/")[1]] if kind in GPU_DEVICE_TYPES else []
    return {"device": g.ggml_backend_dev_name(dev).decode(), "type": kind, "pairs": pairs,
            "unsupported": unsupported, "unsupported_mixed": mixed}


def _kernel_devices(lib_path: str, shape: AttnShape) -> list[dict[str, Any]]:
    g = _ggml(lib_path)
    if g is None:
        raise FileNotFoundError("libggml not found beside libllama")
    base = _graph_lib(lib_path, g)
    devices = [g.ggml_backend_dev_get(i) for i in range(g.ggml_backend_dev_count())]
    names = [pair_name(k, v) for k in kvtypes.NAMES for v in kvtypes.NAMES]
    answers = [_pair_support(g, base, devices, shape, *n.split("/")) for n in names]
    return [_device_entry(g, dev, {n: a[i] for n, a in zip(names, answers)}) for i, dev in enumerate(devices)]


def flash_attn_kernels(lib_path: str | None, model: ModelInfo | None) -> dict[str, Any]:
    """For every ggml device and every K/V cache type pair (kvtypes.NAMES squared): whether the device has a
    flash-attention kernel for it, at the model's attention shape (or DEFAULT_ATTN_SHAPE). `status` is
    "unknown", with `reason`, where the probe cannot run (no library, an older ggml lacking a symbol)."""
    shape = attn_shape(model)
    out: dict[str, Any] = {"status": "measured", "reason": None, "shape": asdict(shape), "backends": None}
    if shape.n_head_kv <= 0 or shape.n_head % shape.n_head_kv:  # ggml would abort on such a node
        return {**out, "status": "unknown", "reason": f"n_head {shape.n_head} is no multiple of n_head_kv {shape.n_head_kv}"}
    if lib_path is None:
        return {**out, "status": "unknown", "reason": "no llama.cpp library loaded"}
    try:
        out["backends"] = _kernel_devices(lib_path, shape)
    except Exception as exc:  # noqa: BLE001 - any failure (a symbol an older build lacks, ...) is a finding, not a crash
        return {**out, "status": "unknown", "reason": f"{type(exc).__name__}: {exc}"}
    return out


# -- attention rotation per cache side ------------------------------------------------------------------------

def _first_logprobs(model: ModelInfo, kv: KVConfig, rotation: bool, options: RuntimeOptions,
                    lora: Path | None) -> tuple[np.ndarray, Any]:
    """The first answer token's log-probabilities, and the rotation llama.cpp's log says it applied."""
    with Runtime(model, kv, rotation, options, lora) as rt:
        tokens = rt.tokenize(chat_template_for(model).render(PROBE_PROMPT))
        return rt.generate(tokens, 1, logprobs=True).logprobs[0], rt.applied


def _rotation_side(model: ModelInfo, kv: KVConfig, options: RuntimeOptions, lora: Path | None) -> dict[str, Any]:
    """One cache side: llama.cpp decides the rotation of K and of V apart (attn_rot_k / attn_rot_v, each
    for a quantized type of that side), so the other side stays f16 and only this side's can differ."""
    try:
        kv.check_fits(model)
    except KVTypeError as exc:  # a type that cannot store this model's heads: say why, do not run it
        return {"active": None, "note": str(exc)}
    if kv.v_quantized and not options.flash_attn:
        return {"active": None, "note": "a quantized V cache needs flash attention"}
    (on, applied), (off, _) = (_first_logprobs(model, kv, rotation, options, lora) for rotation in (True, False))
    diff = float(np.abs(on - off).max())
    said = getattr(applied, "k" if kv.k_quantized else "v", None) if applied is not None else None
    # measured (the logits moved) beside stated (llama.cpp's log); None: this build states nothing
    return {"active": diff > 0, "max_abs_logprob_diff": diff, "llama_cpp_says": said}


def rotation_probe(model: ModelInfo, lora: Path | None, options: RuntimeOptions) -> list[dict[str, Any]]:
    """For each quantized cache type t, per side: K=t/V=f16 and K=f16/V=t, the first-token logits with
    llama.cpp's rotation allowed and with LLAMA_ATTN_ROT_DISABLE=1. Identical logits mean the rotation is
    not active on that side for that type here."""
    return [{"type": t,
             "k": _rotation_side(model, KVConfig(t, "f16"), options, lora),
             "v": _rotation_side(model, KVConfig("f16", t), options, lora)} for t in kvtypes.QUANTIZED]


def pcr_support(architecture: str) -> dict[str, Any]:
    """Whether kvedge's torch pass (pcr, sweep, export) reproduces this architecture (kvedge.gguf.archs)."""
    ok = architecture in ARCHS
    return {"architecture": architecture, "supported": ok,
            "note": "supported: kvedge's torch forward for this layout is verified against llama.cpp" if ok else
            f"not supported: kvedge pcr, sweep and export refuse it (they support {', '.join(ARCHS)}); audits run"}


def _torch() -> dict[str, Any]:
    if importlib.util.find_spec("torch") is None:
        return {"installed": False}
    import torch

    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return {"installed": True, "version": torch.__version__, "cuda": cuda, "mps": mps,
            "device": "cuda" if cuda else "mps" if mps else "cpu",
            "cuda_device": torch.cuda.get_device_name(0) if cuda else None, "threads": torch.get_num_threads()}


def _memory() -> dict[str, int | None]:
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return {"available": int(info["MemAvailable"].split()[0]) * 1024, "total": int(info["MemTotal"].split()[0]) * 1024}
    except (OSError, KeyError, ValueError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return {"available": page * os.sysconf("SC_AVPHYS_PAGES"), "total": page * os.sysconf("SC_PHYS_PAGES")}
    except (ValueError, OSError, AttributeError):
        return {"available": None, "total": None}


def _free(path: Path) -> dict[str, Any]:
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return {"path": str(path), "free": shutil.disk_usage(p).free}


def diagnose(model: ModelInfo | None, lora: Path | None, options: RuntimeOptions, runs_dir: Path) -> dict[str, Any]:
    """Everything `kvedge doctor` prints, as a dict. `model` None skips the rotation probe, and the kernel
    probe then asks about DEFAULT_ATTN_SHAPE."""
    backend = backend_info(options.n_gpu_layers)
    lib = native.loaded_library()
    builds = native.builds()
    report: dict[str, Any] = {
        "library": backend["library"],
        "native_builds": {b: {"lib_dir": str(x.lib_dir), **{k: x.manifest.get(k) for k in (
            "llama_cpp_commit", "patch_sha256", "cmake_args", "build_seconds", "built_at")}} for b, x in builds.items()},
        # a kvedge command holding a per-layer config loads the native build in its own process
        "per_layer_configs": native.find_build() is not None,
        "llama_cpp_python": backend["llama_cpp_python"],
        "system_info": backend["system_info"],
        "backends": ggml_backends(lib.path) if lib else None,
        "flash_attn_kernels": flash_attn_kernels(lib.path if lib else None, model),
        "gpu_offload_supported": backend["gpu_offload_supported"],
        "gpu_layers": options.n_gpu_layers,
        "kind": backend["kind"],
        "ggml_libraries": native.ggml_libraries(),
        "torch": _torch(),
        "disk": [_free(runs_dir), _free(native.cache_root())],
        "memory": _memory(),
        "model": None,
        "pcr": None,
        "rotation": None,
    }
    if model is not None:
        report["pcr"] = pcr_support(model.architecture)
        report["model"] = {"path": str(model.path), "name": model.name, "architecture": model.architecture,
                           "n_layer": model.n_layer, "head_dim_k": model.head_dim_k, "head_dim_v": model.head_dim_v,
                           "adapter": str(lora) if lora else None}
        report["rotation"] = rotation_probe(model, lora, options)
    return report
