"""`kvedge doctor` on this machine: the real llama.cpp, the real default model. What it reports of the
hardware is checked for consistency (a GPU device exactly when llama.cpp offers GPU offload, the CPU facts
where the build has no GPU backend), so the tests hold on a CPU-only and on a GPU build alike."""

from __future__ import annotations

import json

from support.cli import run_cli
from kvedge.gguf import kvtypes
from kvedge.llama import native

GPU_TYPES = ("GPU", "IGPU")  # ggml_backend_dev_type of the devices llama.cpp offloads layers to
GPU_KINDS = ("cuda", "metal", "vulkan", "gpu")


def _devices(rep: dict, types: tuple[str, ...]) -> list[dict]:
    return [d for b in rep["backends"] for d in b["devices"] if d["type"] in types]


def test_doctor_on_the_stock_wheel():
    proc = run_cli("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["library"]["kind"] == "stock" and rep["library"]["path"].rsplit("/", 1)[-1].startswith("libllama.")
    # every ggml build has the CPU backend and its CPU device
    cpu = next(b for b in rep["backends"] if b["name"] == "CPU")
    assert cpu["devices"] and cpu["devices"][0]["type"] == "CPU"
    # llama.cpp offers GPU offload exactly when a GPU device (or an RPC backend) is there
    names = {b["name"] for b in rep["backends"]}
    assert rep["gpu_offload_supported"] == bool(_devices(rep, GPU_TYPES) or "RPC" in names)
    if not rep["gpu_offload_supported"]:  # a CPU-only build: the CPU backend is the only one with a device
        assert [b["name"] for b in rep["backends"] if b["devices"]] == ["CPU"]
    # --gpu-layers defaults to 0: the audit runs on the CPU on any build
    assert rep["gpu_layers"] == 0 and rep["kind"] == "cpu" and rep["system_info"]
    # SmolLM2's head size is 64: llama.cpp rotates every quantized type, and the probe measures it
    assert [r["type"] for r in rep["rotation"]] == list(kvtypes.QUANTIZED)
    assert all(r[s]["active"] and r[s]["max_abs_logprob_diff"] > 0 for r in rep["rotation"] for s in ("k", "v"))
    assert rep["torch"]["installed"] and rep["torch"]["device"] in ("cpu", "cuda", "mps")
    assert rep["torch"]["device"] == "cpu" or rep["torch"]["cuda"] or rep["torch"]["mps"]
    assert rep["memory"]["available"] > 0 and all(d["free"] > 0 for d in rep["disk"])
    assert len({p.rsplit("/", 1)[0] for p in rep["ggml_libraries"]}) == 1


def test_doctor_with_layers_offloaded_runs_on_a_gpu_exactly_when_there_is_one():
    proc = run_cli("doctor", "--json", "--no-probe", "--gpu-layers", "-1")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["gpu_layers"] == -1 and rep["rotation"] is None
    if rep["gpu_offload_supported"]:
        assert rep["kind"] in GPU_KINDS and _devices(rep, GPU_TYPES)
    else:
        assert rep["kind"] == "cpu"


def test_doctor_screen_on_the_native_build(native_build):
    # the CPU build the fixture found, even where a GPU build sits beside it (which doctor would prefer)
    proc = run_cli("doctor", "--native", "--no-probe", env={native.BACKEND_ENV: "cpu"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "native build (cpu): llama.cpp 0c1e57098" in out and str(native_build.lib_dir) in out
    assert "per-layer KV configs: available" in out
    for section in ("backends", "GPU offload", "rotation", "torch", "disk", "memory"):
        assert f"  {section}" in out
    # a CPU build compiles in no GPU backend, unless its CMAKE_ARGS asked for one (its manifest says)
    asked = " ".join(native_build.manifest.get("cmake_args", [])).upper()
    for name, flag in (("CUDA", "-DGGML_CUDA=ON"), ("Metal", "-DGGML_METAL=ON")):
        assert (f"{name}: not compiled in" in out) == (flag not in asked), name
