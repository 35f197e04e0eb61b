"""Bad input to `kvedge export` and `kvedge verify` is one line `kvedge: error: ...` and exit 2, found
before any model is hashed or run."""

from __future__ import annotations

import json

import pytest

from support.cli import run_cli_here as run_cli  # in this process: bad input never reaches a model


@pytest.mark.parametrize("args,message", [
    (["--kv", "f16"], "nothing to mitigate"),
    (["--kv", "q3_k"], "unknown KV cache type"),
    (["--rotation", "both"], "on or off"),
    (["--delta", "0"], "--delta is the equivalence margin"),
    (["--delta", "11"], "--delta is the equivalence margin"),
    (["--smooth", "maybe"], "--smooth must be one of"),
    (["--limit", "0"], "--limit must be at least 1"),
])
def test_export_rejects_bad_flags(tmp_path, args, message):
    proc = run_cli("export", "--out", str(tmp_path / "d"), *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvedge: error:") and message in lines[0]
    assert not (tmp_path / "d").exists()


def test_export_needs_an_empty_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    proc = run_cli("export", "--out", str(tmp_path / "d"))
    assert proc.returncode == 2 and "is not an empty folder" in proc.stderr
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["keep.txt"]


def test_export_needs_out(tmp_path):
    proc = run_cli("export")
    assert proc.returncode == 2 and "--out" in proc.stderr


def test_verify_rejects_what_is_not_a_deployment(tmp_path):
    proc = run_cli("verify", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.startswith("kvedge: error: no deploy.json")
    (tmp_path / "deploy.json").write_text(json.dumps({"schema": "kvedge.audit/1"}))
    proc = run_cli("verify", str(tmp_path))
    assert proc.returncode == 2 and "is not a kvedge.deploy/2 document" in proc.stderr
    (tmp_path / "deploy.json").write_text("{")
    proc = run_cli("verify", str(tmp_path), "--delta", "-1")
    assert proc.returncode == 2 and "--delta" in proc.stderr
