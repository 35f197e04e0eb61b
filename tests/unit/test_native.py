"""Per-layer KV configs without the native build: refused with one line saying what to do, before any model
is hashed or run; the layer map set only while a context is created; and native/build.sh refusing what it
cannot build. The native build itself, and a stock process refusing a per-layer runtime:
tests/e2e/test_native.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support.cli import run_cli
from kvedge.llama import native
from kvedge.llama.runtime import ROTATION_ENV, _rotation_env


@pytest.mark.parametrize("command", [["audit", "--kv", "q4_0,k=q4_0@19:q8_0/v=q4_0"], ["pcr", "--kv", "q4_0@19:q8_0"]])
def test_per_layer_without_the_native_build_exits_2_saying_how_to_build(tmp_path, command):
    # in a fresh process, as a user runs it: which llama.cpp library a process loads is the question here
    proc = run_cli(*command, "--out", str(tmp_path / "o"), env={native.CACHE_ENV: str(tmp_path / "empty")}, timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvedge: error: per-layer KV configs need")
    assert "kvedge build-native cpu" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing ran


def test_a_malformed_map_exits_2(tmp_path):
    proc = run_cli("audit", "--kv", "q4_0@19", "--out", str(tmp_path / "o"), timeout=300)
    assert proc.returncode == 2 and "malformed layer override" in proc.stderr


def test_the_layer_map_is_set_only_while_a_context_is_created(monkeypatch):
    monkeypatch.setenv(native.LAYER_TYPES_ENV, "k=0:f16")  # a value the user left: never applied, then restored
    monkeypatch.delenv(ROTATION_ENV, raising=False)
    with _rotation_env(True, None):
        assert native.LAYER_TYPES_ENV not in os.environ and ROTATION_ENV not in os.environ
    with _rotation_env(False, "k=19:q8_0"):
        assert os.environ[native.LAYER_TYPES_ENV] == "k=19:q8_0" and os.environ[ROTATION_ENV] == "1"
    assert os.environ[native.LAYER_TYPES_ENV] == "k=0:f16" and ROTATION_ENV not in os.environ


def test_build_refuses_what_this_machine_cannot_build():
    proc = subprocess.run(["bash", str(native.source_dir() / "build.sh"), "vulkan"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr
    if sys.platform != "darwin":
        env = {**os.environ, native.CACHE_ENV: "/nonexistent-kvedge-cache"}
        proc = subprocess.run(["bash", str(native.source_dir() / "build.sh"), "metal"], capture_output=True,
                              text=True, env=env)
        assert proc.returncode == 2 and "needs macOS" in proc.stderr
