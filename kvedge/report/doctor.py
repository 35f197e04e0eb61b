"""The terminal screen of `kvedge doctor` (a rendering of `kvedge.llama.doctor.diagnose`'s dict)."""

from __future__ import annotations

from typing import Any

from .fmt import size

EXPECTED_BACKENDS = ("CPU", "CUDA", "Metal")


def _library(rep: dict[str, Any]) -> list[str]:
    lib = rep["library"] or {}
    if lib.get("kind") == "native":
        head = (f"native build ({lib.get('backend')}): llama.cpp {lib.get('llama_cpp_commit')} from llama-cpp-python "
                f"{lib.get('llama_cpp_python')}, patch {str(lib.get('patch_sha256'))[:12]}")
    else:
        head = f"stock llama-cpp-python {rep['llama_cpp_python']} wheel"
    out = [f"{head}: {lib.get('path')}"]
    builds = rep["native_builds"]
    if builds:
        out.append("native builds: " + "; ".join(f"{b} ({x['lib_dir']}, built {x['built_at']}, {x['build_seconds']} s)"
                                                for b, x in builds.items()))
    else:
        out.append("native builds: none (per-layer KV configs need one: kvedge build-native cpu|cuda|metal)")
    out.append("per-layer KV configs: " + ("available (kvedge commands load the native build for them)"
                                           if rep["per_layer_configs"] else "not available"))
    libs = rep.get("ggml_libraries")
    if libs is not None:
        dirs = sorted({p.rsplit('/', 1)[0] for p in libs})
        out.append(f"ggml loaded from {len(dirs)} place{'s' if len(dirs) != 1 else ''}: {', '.join(dirs)}"
                   + ("" if len(dirs) == 1 else "  << two ggml copies: run in a fresh process"))
    return out


def _backends(rep: dict[str, Any]) -> list[str]:
    regs = rep["backends"]
    if regs is None:
        return ["(libggml not found beside libllama)"]
    by_name = {r["name"].lower(): r for r in regs}
    out = []
    for name in EXPECTED_BACKENDS:
        r = by_name.pop(name.lower(), None)
        out.append(f"{name}: " + ("not compiled in" if r is None else _devices(r)))
    out += [f"{r['name']}: {_devices(r)}" for r in by_name.values()]
    return out


def _devices(r: dict[str, Any]) -> str:
    if not r["devices"]:
        return "compiled in, no usable device"
    return "; ".join(f"{d['name']} ({d['type']}, {d['description']}"
                     + (f", {size(d['memory_free'])} free of {size(d['memory_total'])}" if d["memory_total"] else "")
                     + ")" for d in r["devices"])


def _compact_pairs(pairs: list[str], names: list[str]) -> list[str]:
    """Unsupported K/V pairs, short: `t/*` for every pair with K t, `*/t` for every pair with V t, and the
    pairs left over one by one."""
    missing, left = set(pairs), set(pairs)
    out = []
    for side, fmt in ((0, "{}/*"), (1, "*/{}")):
        for t in names:
            row = {p for p in missing if p.split("/")[side] == t}
            if len(row) == len(names):  # a row and a column may share a pair: fullness is judged on all
                out.append(fmt.format(t))
                left -= row
    return out + [p for p in pairs if p in left]


def _kernel_device(d: dict[str, Any], names: list[str]) -> str:
    measured = [p for p, ok in d["pairs"].items() if ok is not None]
    na = len(d["pairs"]) - len(measured)
    head = f"{d['device']} ({d['type']}): "
    tail = f" ({na} n/a: the head size)" if na else ""
    if not d["unsupported"]:
        return head + f"all {len(measured)} pairs" + tail
    line = (head + f"no kernel for {len(d['unsupported'])} of {len(measured)} pairs: "
            + ", ".join(_compact_pairs(d["unsupported"], names)) + tail)
    if d["type"] in ("GPU", "IGPU"):
        line += "  << their attention runs on the CPU"
        if d.get("unsupported_mixed"):
            line += " (older CUDA builds: -DGGML_CUDA_FA_ALL_QUANTS=ON)"
    return line


def _kernels(rep: dict[str, Any]) -> list[str]:
    fa = rep.get("flash_attn_kernels")
    if fa is None:
        return ["(not probed)"]
    if fa["status"] != "measured":
        return [f"unknown: {fa['reason']}"]
    s = fa["shape"]
    out = [(f"flash attention per K/V cache type pair (ggml's supports_op), head size K {s['head_dim_k']} / "
            f"V {s['head_dim_v']}, {s['n_head']}/{s['n_head_kv']} heads ({s['source']})")]
    names = list(dict.fromkeys(p.split("/")[0] for d in fa["backends"] for p in d["pairs"]))
    return out + [f"  {_kernel_device(d, names)}" for d in fa["backends"]]


def _rotation_cell(r: dict[str, Any]) -> str:
    if r["active"] is None:
        return f"n/a: {r['note']}"
    said = r.get("llama_cpp_says")
    log = "" if said is None else ", log agrees" if said == r["active"] else f", log says {'on' if said else 'off'}"
    return f"{'active' if r['active'] else 'NOT active'} ({r['max_abs_logprob_diff']:.3g}{log})"


def _rotation(rep: dict[str, Any]) -> list[str]:
    m = rep["model"]
    if not m:
        return ["(no model: pass MODEL.gguf, or install the default model)"]
    out = [(f"on {m['name']} ({m['n_layer']} layers, head size K {m['head_dim_k']} / V {m['head_dim_v']}), measured: "
            "logits with and without LLAMA_ATTN_ROT_DISABLE=1, each side with the other f16 (max |d logprob|)")]
    for r in rep["rotation"]:
        out.append(f"  {r['type']:7s} K {_rotation_cell(r['k']):28s} V {_rotation_cell(r['v'])}")
    return out


def render_doctor(rep: dict[str, Any]) -> str:
    t = rep["torch"]
    torch_line = ("not installed (kvedge pcr and sweep need it: pip install 'kvedge[pcr]')" if not t["installed"] else
                  f"{t['version']}, device {t['device']}" + (f" ({t['cuda_device']})" if t.get("cuda_device") else "")
                  + f", {t['threads']} threads")
    gpu = rep["gpu_offload_supported"]
    mem = rep["memory"]
    sections = [
        ("llama.cpp", _library(rep)),
        ("build", [rep["system_info"]]),
        ("backends", _backends(rep)),
        ("FA kernels", _kernels(rep)),
        ("GPU offload", [("supported" if gpu else "not supported by this build")
                         + f"; --gpu-layers {rep['gpu_layers']} runs on {rep['kind']}"]),
        ("rotation", _rotation(rep)),
        ("torch", [torch_line]),
        *([("PCR", [f"{rep['pcr']['architecture']}: {rep['pcr']['note']}"])] if rep.get("pcr") else []),
        ("disk", [f"{size(d['free'])} free at {d['path']}" for d in rep["disk"]]),
        ("memory", [f"{size(mem['available'])} available of {size(mem['total'])}"]),
    ]
    lines = ["kvedge doctor"]
    for name, body in sections:
        for i, line in enumerate(body):
            lines.append(f"  {name if i == 0 else '':12s}{line}")
    return "\n".join(lines)
