"""`kvedge doctor`: what this machine will run an audit on, measured here, on one screen.

The llama.cpp library loaded (stock wheel or kvedge's native build, its revision and patch), the ggml
backends compiled into it and their devices, GPU offload, whether llama.cpp's attention rotation is
active for each quantized cache type on the given model (measured: the logits with and without
LLAMA_ATTN_ROT_DISABLE differ or they do not), torch and its device, free disk and memory.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..gguf import kvtypes
from ..gguf.kvmap import KVConfig
from ..gguf.model import ModelInfo
from ..gguf.template import chat_template_for
from . import native
from .runtime import Runtime, RuntimeOptions, backend_info

DEVICE_TYPES = ("CPU", "GPU", "IGPU", "ACCEL", "META")  # ggml_backend_dev_type
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


def rotation_probe(model: ModelInfo, lora: Path | None, options: RuntimeOptions) -> list[dict[str, Any]]:
    """For each quantized cache type: the first-token logits with llama.cpp's rotation allowed and with
    LLAMA_ATTN_ROT_DISABLE=1. Identical logits mean the rotation is not active for that type here."""
    out = []
    tokens = None
    for t in kvtypes.QUANTIZED:
        kv = KVConfig(t, t)
        try:
            kv.check_fits(model)
        except Exception as exc:  # a type that cannot store this model's heads: say why, do not run it
            out.append({"type": t, "active": None, "note": str(exc)})
            continue
        logits = {}
        for rotation in (True, False):
            with Runtime(model, kv, rotation, options, lora) as rt:
                if tokens is None:
                    tokens = rt.tokenize(chat_template_for(model).render(PROBE_PROMPT))
                logits[rotation] = rt.generate(tokens, 1, logprobs=True).logprobs[0]
        diff = float(np.abs(logits[True] - logits[False]).max())
        out.append({"type": t, "active": diff > 0, "max_abs_logprob_diff": diff})
    return out


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
    """Everything `kvedge doctor` prints, as a dict. `model` None skips the rotation probe."""
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
        "gpu_offload_supported": backend["gpu_offload_supported"],
        "gpu_layers": options.n_gpu_layers,
        "kind": backend["kind"],
        "ggml_libraries": native.ggml_libraries(),
        "torch": _torch(),
        "disk": [_free(runs_dir), _free(native.cache_root())],
        "memory": _memory(),
        "model": None,
        "rotation": None,
    }
    if model is not None:
        report["model"] = {"path": str(model.path), "name": model.name, "architecture": model.architecture,
                           "n_layer": model.n_layer, "head_dim_k": model.head_dim_k, "head_dim_v": model.head_dim_v,
                           "adapter": str(lora) if lora else None}
        report["rotation"] = rotation_probe(model, lora, options)
    return report
