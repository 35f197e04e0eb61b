"""`kvedge doctor`'s flash-attention kernel matrix and per-side rotation, without llama.cpp: the probe's
shape and its refusals (reported, never raised), the device entry it builds from ggml's answers, and the
screen that renders them. The probe against the real ggml: tests/e2e/test_doctor_kernels.py."""

from __future__ import annotations

import ctypes
from dataclasses import asdict

from kvedge.gguf import kvtypes
from kvedge.gguf.model import inspect_model
from kvedge.llama import doctor
from kvedge.report.doctor import render_doctor

PAIRS = [doctor.pair_name(k, v) for k in kvtypes.NAMES for v in kvtypes.NAMES]


class FakeGgml:
    """What `_device_entry` asks of libggml about a device: its name and ggml_backend_dev_type."""

    def __init__(self, name: str, dev_type: int):
        self.name, self.dev_type = name, dev_type

    def ggml_backend_dev_name(self, dev: int) -> bytes:
        return self.name.encode()

    def ggml_backend_dev_type(self, dev: int) -> int:
        return self.dev_type


def _entry(name: str, dev_type: int, missing: set[str]) -> dict:
    pairs = {p: p not in missing for p in PAIRS}
    return doctor._device_entry(FakeGgml(name, dev_type), 0, pairs)


def _report(backends: list[dict] | None, status: str = "measured", reason: str | None = None,
            rotation: list[dict] | None = None) -> dict:
    """The smallest dict render_doctor reads: a CPU-only stock build, with the given kernel findings."""
    shape = asdict(doctor.DEFAULT_ATTN_SHAPE)
    return {
        "library": {"kind": "stock", "path": "/x/libllama.so"}, "llama_cpp_python": "0.3.36",
        "native_builds": {}, "per_layer_configs": False, "ggml_libraries": None, "system_info": "CPU : AVX2 = 1",
        "backends": [{"name": "CPU", "devices": [{"name": "CPU", "type": "CPU", "description": "x",
                                                  "memory_free": 0, "memory_total": 0}]}],
        "flash_attn_kernels": {"status": status, "reason": reason, "shape": shape, "backends": backends},
        "gpu_offload_supported": False, "gpu_layers": 0, "kind": "cpu",
        "torch": {"installed": False}, "disk": [], "memory": {"available": 1, "total": 2},
        "model": None if rotation is None else {"name": "m", "n_layer": 2, "head_dim_k": 64, "head_dim_v": 64},
        "rotation": rotation,
    }


def test_the_probe_shape_is_the_models_else_the_default(tiny):
    assert doctor.attn_shape(None) == doctor.DEFAULT_ATTN_SHAPE
    d = doctor.DEFAULT_ATTN_SHAPE
    assert (d.head_dim_k, d.head_dim_v, d.n_head, d.n_head_kv, d.source) == (128, 128, 8, 8, "default")
    s = doctor.attn_shape(inspect_model(tiny))  # 64 wide, 2 heads, 1 KV head
    assert (s.head_dim_k, s.head_dim_v, s.n_head, s.n_head_kv, s.source) == (32, 32, 2, 1, "model")
    assert (s.n_batch, s.n_kv) == (1, 256)  # a decode step over llama.cpp's padded cache view


def test_an_f32_cache_is_asked_about_as_the_f16_llama_cpp_casts_it_to():
    assert doctor._op_type("f32") == doctor._op_type("f16") == int(kvtypes.ggml_type("f16"))
    assert doctor._op_type("q4_0") == int(kvtypes.ggml_type("q4_0"))


def test_a_pair_that_cannot_hold_the_head_size_is_never_built():
    # ggml aborts the process on a q4_0 row of 16 values, so the answer is None before any ggml call
    shape = doctor.AttnShape(head_dim_k=16, head_dim_v=16, n_head=1, n_head_kv=1)
    assert doctor._pair_support(None, None, [1, 2], shape, "q4_0", "f16") == [None, None]
    assert doctor._fits(shape, "f16", "bf16") and not doctor._fits(shape, "f16", "q8_0")


def test_a_device_entry_names_its_unsupported_pairs_and_flags_the_mixed_ones_on_a_gpu():
    missing = {"q8_0/q4_0", "q4_0/q8_0", "iq4_nl/iq4_nl"}
    gpu = _entry("CUDA0", doctor.DEVICE_TYPES.index("GPU"), missing)
    assert gpu["device"] == "CUDA0" and gpu["type"] == "GPU" and list(gpu["pairs"]) == PAIRS
    assert sorted(gpu["unsupported"]) == sorted(missing)
    assert sorted(gpu["unsupported_mixed"]) == ["q4_0/q8_0", "q8_0/q4_0"]
    cpu = _entry("CPU", doctor.DEVICE_TYPES.index("CPU"), missing)
    assert sorted(cpu["unsupported"]) == sorted(missing) and cpu["unsupported_mixed"] == []  # nothing to fall to


def test_a_probe_that_cannot_run_reports_unknown_and_why(tmp_path, monkeypatch):
    no_lib = doctor.flash_attn_kernels(None, None)
    assert no_lib["status"] == "unknown" and no_lib["reason"] and no_lib["backends"] is None
    assert no_lib["shape"]["head_dim_k"] == 128  # the shape it would have asked about is still said
    beside = doctor.flash_attn_kernels(str(tmp_path / "libllama.so"), None)  # no libggml there
    assert beside["status"] == "unknown" and "libggml" in beside["reason"]

    def older_build(lib_path, shape):  # what ctypes raises for a symbol the loaded ggml lacks
        raise AttributeError("undefined symbol: ggml_flash_attn_ext")

    monkeypatch.setattr(doctor, "_kernel_devices", older_build)
    old = doctor.flash_attn_kernels(str(tmp_path / "libllama.so"), None)
    assert old["status"] == "unknown" and "ggml_flash_attn_ext" in old["reason"]


def test_a_shape_ggml_would_abort_on_is_refused_before_ggml(monkeypatch):
    monkeypatch.setattr(doctor, "attn_shape", lambda m: doctor.AttnShape(64, 64, n_head=9, n_head_kv=2))
    rep = doctor.flash_attn_kernels("/nowhere/libllama.so", None)
    assert rep["status"] == "unknown" and "n_head_kv" in rep["reason"]


def test_the_screen_shows_an_unsupported_pair_and_all_pairs_when_none_is_missing():
    cpu = _entry("CPU", doctor.DEVICE_TYPES.index("CPU"), set())
    gpu = _entry("CUDA0", doctor.DEVICE_TYPES.index("GPU"), {"q8_0/q4_0"})
    out = render_doctor(_report([cpu, gpu]))
    assert "  FA kernels  " in out and "head size K 128 / V 128, 8/8 heads (default)" in out
    assert f"CPU (CPU): all {len(PAIRS)} pairs" in out
    line = next(x for x in out.splitlines() if "CUDA0" in x)
    assert f"no kernel for 1 of {len(PAIRS)} pairs: q8_0/q4_0" in line
    assert "runs on the CPU" in line and "GGML_CUDA_FA_ALL_QUANTS" in line


def test_the_screen_folds_a_type_missing_everywhere_into_one_entry():
    n = len(kvtypes.NAMES)
    missing = {p for p in PAIRS if "iq4_nl" in p} | {"q8_0/q4_0"}
    out = render_doctor(_report([_entry("CUDA0", doctor.DEVICE_TYPES.index("GPU"), missing)]))
    line = next(x for x in out.splitlines() if "CUDA0" in x)
    assert len(missing) == 2 * n  # 2n - 1 pairs name iq4_nl (iq4_nl/iq4_nl once), and q8_0/q4_0
    assert f"no kernel for {len(missing)} of {n * n} pairs: iq4_nl/*, */iq4_nl, q8_0/q4_0" in line


def test_the_screen_shows_an_unknown_probe_and_pairs_not_applicable():
    assert "FA kernels  unknown: AttributeError: undefined symbol" in render_doctor(
        _report(None, "unknown", "AttributeError: undefined symbol"))
    cpu = _entry("CPU", 0, set())
    cpu["pairs"]["q4_0/q4_0"] = None  # cannot hold the head size
    assert f"all {len(PAIRS) - 1} pairs (1 n/a: the head size)" in render_doctor(_report([cpu]))


def test_the_screen_shows_the_rotation_per_side():
    rotation = [{"type": "q4_0", "k": {"active": True, "max_abs_logprob_diff": 13.1},
                 "v": {"active": False, "max_abs_logprob_diff": 0.0}},
                {"type": "q5_0", "k": {"active": None, "note": "K cache type q5_0 needs a head size divisible by 32"},
                 "v": {"active": True, "max_abs_logprob_diff": 1.5}}]
    lines = render_doctor(_report([_entry("CPU", 0, set())], rotation=rotation)).splitlines()
    q4 = next(x for x in lines if " q4_0 " in x)
    assert "K active (13.1)" in q4 and "V NOT active (0)" in q4
    q5 = next(x for x in lines if " q5_0 " in x)
    assert "K n/a: K cache type q5_0 needs" in q5 and "V active (1.5)" in q5


def test_the_init_params_struct_is_ggmls_layout():
    # struct ggml_init_params { size_t mem_size; void * mem_buffer; bool no_alloc; }, passed by value
    fields = [(name, t) for name, t in doctor._InitParams._fields_]
    assert fields == [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def test_doctor_says_whether_pcr_supports_the_architecture():
    from kvedge.llama.doctor import pcr_support

    assert pcr_support("qwen3")["supported"] and "verified" in pcr_support("qwen3")["note"]
    falcon = pcr_support("falcon")
    assert not falcon["supported"] and "refuse" in falcon["note"] and "gemma3" in falcon["note"]
