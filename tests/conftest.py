"""Shared fixtures. End-to-end tests drive the real llama.cpp on the real default model; they run the
`kvedge` CLI in a subprocess exactly as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvedge.gguf.model import default_model_path


def run_cli(*args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvedge", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def small_audit(tmp_path_factory) -> dict:
    """One real audit shared by the report tests: f16 reference, noise run, q4_0 with rotation on and off."""
    out = tmp_path_factory.mktemp("audit")
    proc = run_cli("audit", "--kv", "f16,q4_0", "--rotation", "both", "--limit", "2", "--max-tokens", "24",
                   "--ctx", "2048", "--out", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    return {"out": out, "proc": proc, "report": json.loads((out / "report.json").read_text())}


@pytest.fixture(scope="session")
def native_build():
    """kvedge's native llama.cpp (CPU), from the per-user cache; when missing, built there by the script a
    user runs (native/build.sh through `kvedge build-native`), so the native tests always run on a real build."""
    from kvedge.llama import native

    build = native.builds().get("cpu")
    if build is None:
        assert native.build("cpu") == 0, "native/build.sh cpu failed"
        build = native.builds()["cpu"]
    return build
