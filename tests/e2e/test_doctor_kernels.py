"""`kvedge doctor`'s flash-attention kernel probe against the real ggml, and its rotation probe per cache
side, on the real default model. The renderer and the probe's refusals: tests/unit/test_doctor_kernels.py."""

from __future__ import annotations

import json

import numpy as np
from support.cli import run_cli

from kvedge.gguf import kvtypes
from kvedge.gguf.kvmap import KVConfig
from kvedge.gguf.model import inspect_model
from kvedge.gguf.template import chat_template_for
from kvedge.llama import doctor, native
from kvedge.llama.runtime import Runtime, RuntimeOptions, backend_info
from kvedge.report.doctor import render_doctor

PAIRS = {doctor.pair_name(k, v) for k in kvtypes.NAMES for v in kvtypes.NAMES}
MIXED = ("q8_0", "q4_0")  # K q8_0 / V q4_0: the mixed pair kvedge's export chooses on the default model


def _cpu(rep: dict) -> dict:
    return next(d for d in rep["backends"] if d["type"] == "CPU")


def test_the_cpu_has_a_kernel_for_every_pair_and_really_runs_a_mixed_one(model_path):
    model = inspect_model(model_path)
    backend_info()  # loads llama.cpp, whose libggml the probe asks
    rep = doctor.flash_attn_kernels(native.loaded_library().path, model)
    assert rep["status"] == "measured" and rep["reason"] is None, rep["reason"]
    assert rep["shape"] == {"head_dim_k": model.head_dim_k, "head_dim_v": model.head_dim_v, "n_head": model.n_head,
                            "n_head_kv": model.n_head_kv, "n_batch": 1, "n_kv": 256, "source": "model"}
    for d in rep["backends"]:
        assert set(d["pairs"]) == PAIRS and {"device", "type", "unsupported", "unsupported_mixed"} <= set(d)
    cpu = _cpu(rep)
    assert all(cpu["pairs"].values()) and cpu["unsupported"] == [] == cpu["unsupported_mixed"]
    # ggml's answer agrees with running it: a quantized V cache runs only through flash attention, so a
    # q8_0/q4_0 context that decodes proves the CPU's kernel for that pair
    assert cpu["pairs"][doctor.pair_name(*MIXED)] is True
    with Runtime(model, KVConfig(*MIXED), True, RuntimeOptions(n_ctx=512, n_threads=1)) as rt:
        gen = rt.generate(rt.tokenize(chat_template_for(model).render(doctor.PROBE_PROMPT)), 2, logprobs=True)
    assert len(gen.tokens) == 2 and all(np.isfinite(lp).any() for lp in gen.logprobs)


def test_doctor_json_carries_the_kernel_matrix_without_a_model():
    proc = run_cli("doctor", "--json", "--no-probe")
    assert proc.returncode == 0, proc.stderr
    fa = json.loads(proc.stdout)["flash_attn_kernels"]
    assert fa["status"] == "measured" and fa["shape"]["source"] == "default"
    assert (fa["shape"]["head_dim_k"], fa["shape"]["n_head"]) == (128, 8)
    assert all(_cpu(fa)["pairs"].values()) and set(_cpu(fa)["pairs"]) == PAIRS


def test_the_rotation_is_measured_per_cache_side(model_path, tmp_path, monkeypatch):
    # one type (q4_0) keeps this to four contexts; the whole list runs in tests/e2e/test_doctor.py
    monkeypatch.setattr(kvtypes, "QUANTIZED", ("q4_0",))
    model = inspect_model(model_path)
    rep = json.loads(json.dumps(doctor.diagnose(model, None, RuntimeOptions(n_ctx=512, n_threads=1), tmp_path)))
    [row] = rep["rotation"]
    assert row["type"] == "q4_0" and set(row) == {"type", "k", "v"}
    # SmolLM2's head size is 64: llama.cpp rotates a quantized K and a quantized V, each on its own
    for side in ("k", "v"):
        assert row[side]["active"] is True and row[side]["max_abs_logprob_diff"] > 0, side
    assert rep["flash_attn_kernels"]["status"] == "measured"
    screen = render_doctor(rep)
    assert "  FA kernels  " in screen and f"CPU (CPU): all {len(PAIRS)} pairs" in screen
    assert any(" q4_0 " in x and "K active" in x and "V active" in x for x in screen.splitlines())
