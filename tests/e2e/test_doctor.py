"""`kvedge doctor` on this machine: the real llama.cpp, the real default model."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from kvedge.gguf import kvtypes

pytestmark = pytest.mark.e2e


def test_doctor_on_the_stock_wheel():
    proc = run_cli("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["library"]["kind"] == "stock" and rep["library"]["path"].endswith("libllama.so")
    cpu = next(b for b in rep["backends"] if b["name"] == "CPU")
    assert cpu["devices"] and cpu["devices"][0]["type"] == "CPU"
    assert rep["kind"] == "cpu" and rep["system_info"]
    # SmolLM2's head size is 64: llama.cpp rotates every quantized type, and the probe measures it
    assert [r["type"] for r in rep["rotation"]] == list(kvtypes.QUANTIZED)
    assert all(r["active"] and r["max_abs_logprob_diff"] > 0 for r in rep["rotation"])
    assert rep["torch"]["installed"] and rep["torch"]["device"] in ("cpu", "cuda", "mps")
    assert rep["memory"]["available"] > 0 and all(d["free"] > 0 for d in rep["disk"])
    assert len({p.rsplit("/", 1)[0] for p in rep["ggml_libraries"]}) == 1


def test_doctor_screen_on_the_native_build(native_build):
    proc = run_cli("doctor", "--native", "--no-probe")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "native build (cpu): llama.cpp 0c1e57098" in out and str(native_build.lib_dir) in out
    assert "per-layer KV configs: available" in out
    for section in ("backends", "GPU offload", "rotation", "torch", "disk", "memory"):
        assert f"  {section}" in out
    assert "CUDA: not compiled in" in out and "Metal: not compiled in" in out
