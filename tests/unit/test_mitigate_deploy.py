"""deploy.json's renderings in each runtime's syntax: read back, they say what deploy.json says; the shell
launchers really run (against a stand-in binary that prints what it was given); Ollama is written only
where it can express the configuration."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from kvedge.mitigate.deploy import (
    MODELFILE, OLLAMA_ENV, PYTHON_FILE, Deployment, FileRef, Launch, disagreements, expected, llama_kwargs,
    ollama_support, read_renderings, render_all,
)


def _dep(tk="q4_0", tv="q4_0", rotation=False, inside=True, adapter=True) -> Deployment:
    model = FileRef("m.kvedge.gguf" if inside else "/models/base model.gguf", "a" * 64, 10)
    ad = FileRef("a.kvedge.gguf", "b" * 64, 5) if adapter else None
    return Deployment(model, ad, Launch(tk, tv, rotation, 4096))


def _write(tmp_path, dep):
    for name, text in render_all(dep, "test").items():
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("dep", [_dep(), _dep("q8_0", "q8_0", True, inside=False), _dep(adapter=False),
                                 _dep("q8_0", "q4_0", True)])
def test_renderings_read_back_as_deploy_json(tmp_path, dep):
    root = _write(tmp_path, dep)
    got = read_renderings(root)
    ollama_ok = ollama_support(dep.launch)[0]
    assert set(got) == {"llama-server.sh", "llama-cli.sh", PYTHON_FILE} | ({MODELFILE} if ollama_ok else set())
    for name, parsed in got.items():
        assert parsed == expected(dep, root), name
    assert disagreements(dep, root) == []
    assert Deployment.from_dict(json.loads(json.dumps(dep.to_dict()))) == dep


def test_ollama_says_why_it_cannot():
    ok, why = ollama_support(Launch("q8_0", "q4_0", True, 4096))
    assert not ok and "one cache type for K and V" in why
    ok, why = ollama_support(Launch("q5_1", "q5_1", True, 4096))
    assert not ok and "q5_1" in why
    assert ollama_support(Launch("q4_0", "q4_0", False, 4096))[0]


def test_an_edited_rendering_is_caught(tmp_path):
    dep = _dep()
    root = _write(tmp_path, dep)
    s = (root / "llama-server.sh").read_text().replace("-ctk q4_0", "-ctk q8_0")
    (root / "llama-server.sh").write_text(s)
    (root / OLLAMA_ENV).write_text((root / OLLAMA_ENV).read_text().replace("LLAMA_ATTN_ROT_DISABLE=1", ""))
    problems = disagreements(dep, root)
    assert any("llama-server.sh" in p and "type_k" in p for p in problems)
    assert any("Modelfile" in p and "rotation" in p for p in problems)


def test_the_launcher_runs(tmp_path):
    dep = _dep()
    (tmp_path / "deploy").mkdir()
    root = _write(tmp_path / "deploy", dep)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "llama-server"
    fake.write_text('#!/bin/sh\necho "ROT=${LLAMA_ATTN_ROT_DISABLE-unset}"\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    out = subprocess.run(["sh", str(root / "llama-server.sh"), "--port", "8080"], capture_output=True, text=True,
                         env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, check=True).stdout.splitlines()
    assert out[0] == "ROT=1"
    assert out[out.index("-m") + 1] == str(root / "m.kvedge.gguf")
    assert out[out.index("--lora") + 1] == str(root / "a.kvedge.gguf")
    assert out[out.index("-ctk") + 1] == "q4_0" and out[out.index("-fa") + 1] == "on"
    assert out[-2:] == ["--port", "8080"]


def test_llama_kwargs_resolve_paths(tmp_path):
    dep = _dep()
    root = _write(tmp_path, dep)
    kw, env = llama_kwargs(root)
    assert kw["model_path"] == str(root / "m.kvedge.gguf") and kw["type_k"] == 2 and kw["flash_attn"] is True
    assert env == {"LLAMA_ATTN_ROT_DISABLE": "1"}
    import llama_cpp

    assert kw["type_k"] == llama_cpp.GGML_TYPE_Q4_0
