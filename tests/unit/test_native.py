"""Per-layer KV configs without the native build, or in a process that already runs the stock library:
refused with one line saying what to do, before any model is hashed or run."""

from __future__ import annotations

import os

import pytest

from conftest import run_cli
from kvedge.llama import native
from kvedge.gguf.kvmap import parse_kv
from kvedge.llama.runtime import ROTATION_ENV, _rotation_env


@pytest.mark.parametrize("command", [["audit", "--kv", "q4_0,k=q4_0@19:q8_0/v=q4_0"], ["pcr", "--kv", "q4_0@19:q8_0"]])
def test_per_layer_without_the_native_build_exits_2_saying_how_to_build(tmp_path, command):
    proc = run_cli(*command, "--out", str(tmp_path / "o"), env={native.CACHE_ENV: str(tmp_path / "empty")}, timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvedge: error: per-layer KV configs need")
    assert "kvedge build-native cpu" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing ran


def test_a_malformed_map_exits_2(tmp_path):
    proc = run_cli("audit", "--kv", "q4_0@19", "--out", str(tmp_path / "o"), timeout=300)
    assert proc.returncode == 2 and "malformed layer override" in proc.stderr


def test_a_stock_process_refuses_a_per_layer_runtime(model_path):
    import llama_cpp  # noqa: F401  (this test process runs the stock wheel)

    from kvedge.gguf.model import inspect_model
    from kvedge.llama.runtime import Runtime

    assert native.loaded_library().kind == "stock"
    model = inspect_model(model_path)
    with pytest.raises(native.NativeUnavailable, match="already loaded the stock one"):
        Runtime(model, parse_kv("k=q4_0@19:q8_0/v=q4_0").resolve(model))


def test_the_layer_map_is_set_only_while_a_context_is_created(monkeypatch):
    monkeypatch.setenv(native.LAYER_TYPES_ENV, "k=0:f16")  # a value the user left: never applied, then restored
    monkeypatch.delenv(ROTATION_ENV, raising=False)
    with _rotation_env(True, None):
        assert native.LAYER_TYPES_ENV not in os.environ and ROTATION_ENV not in os.environ
    with _rotation_env(False, "k=19:q8_0"):
        assert os.environ[native.LAYER_TYPES_ENV] == "k=19:q8_0" and os.environ[ROTATION_ENV] == "1"
    assert os.environ[native.LAYER_TYPES_ENV] == "k=0:f16" and ROTATION_ENV not in os.environ
