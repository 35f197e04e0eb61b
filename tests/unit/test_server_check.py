"""`kvedge verify DIR --server URL` (kvedge.mitigate.server_check): what a running server shows of itself
against deploy.json. Loopback fakes of the real servers (tests/support/httpfakes.py); an unknown is never a
pass."""

from __future__ import annotations

import pytest

from kvedge.errors import ServerError
from kvedge.gguf.model import inspect_model, sha256_file
from kvedge.mitigate.preconditions import preconditions
from kvedge.mitigate.server_check import check_server, evaluate
from kvedge.report.mitigate import render_server_check_markdown, server_check_lines
from kvedge.results.deploy import DeploymentDoc, FileRef, Launch
from kvedge.results.verify import ServerCheck
from kvedge.server.flavors import Setting
from kvedge.server.probe import ServerInfo
from support.fakes import write_tiny_gguf


def _dep(model_path, launch: Launch) -> DeploymentDoc:
    m = inspect_model(model_path)
    return DeploymentDoc(model=FileRef(str(model_path), sha256_file(model_path), m.size_bytes), adapter=None,
                         launch=launch, label=f"{launch.type_k}/{launch.type_v}", kind="kv", smoothed=False,
                         kv_bytes_per_token=0, kv_bytes_at_ctx=0, kv_mib_at_ctx=0.0, rotation_requirement="",
                         env=launch.env, preconditions=[p.to_dict() for p in preconditions(launch, m)])


@pytest.fixture
def model(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def test_a_llama_server_is_not_verified_while_it_hides_the_cache(tmp_path, model, servers):
    srv = servers("llama-server", model)  # serves this very file; its /props reports n_ctx 2048
    check = check_server(_dep(model, Launch("q4_0", "q4_0", True, 2048)), tmp_path, srv.url, 5, 0)
    rows = {r.item: r for r in check.rows}
    assert rows["model"].status == "ok" and "on this machine" in rows["model"].source
    assert rows["n_ctx"].status == "ok" and rows["n_ctx"].server == "2048"
    for item in ("type_k", "type_v", "flash_attn", "rotation", "flash-attention-kernel"):
        assert rows[item].status == "unknown", item
    assert "ollama-global" not in rows  # a llama-server is not Ollama
    assert not check.verified and check.line.startswith("NOT VERIFIED") and "type_k" in check.line
    lines = server_check_lines(check)
    assert lines[-1] == check.line and any(line.startswith("type_k: unknown") for line in lines)
    assert "An unknown is not a pass" in render_server_check_markdown(check)
    assert ServerCheck.from_dict(check.to_dict()) == check  # server-check.json reads back whole


def test_a_smaller_context_or_another_model_is_a_violation(tmp_path, model, servers):
    srv = servers("llama-server", model)
    check = check_server(_dep(model, Launch("q8_0", "q8_0", True, 4096)), tmp_path, srv.url, 5, 0)
    assert {r.item: r.status for r in check.rows}["n_ctx"] == "violated"
    assert "n_ctx differ" in check.line
    other = write_tiny_gguf(tmp_path / "other.gguf", template="{{ messages[0]['content'] }}")
    check = check_server(_dep(other, Launch("q8_0", "q8_0", True, 2048)), tmp_path, srv.url, 5, 0)
    row = {r.item: r for r in check.rows}["model"]
    assert row.status == "violated" and "is not" in row.source and not check.verified


def test_ollama_rows_include_its_server_wide_scope(tmp_path, model, servers):
    srv = servers("ollama", model, model_sha256=sha256_file(model))
    check = check_server(_dep(model, Launch("q8_0", "q8_0", True, 2048)), tmp_path, srv.url, 5, 0)
    rows = {r.item: r for r in check.rows}
    assert rows["model"].status == "ok" and "sha256" in rows["model"].source
    assert rows["ollama-global"].status == "unknown" and not check.verified


def test_every_row_observed_as_deployed_verifies(tmp_path, model):
    """No server kvedge knows shows its cache; one that did would be verified by the same rule."""
    launch = Launch("q8_0", "q8_0", False, 2048)
    seen = {k: Setting(v, "observed: GET /props") for k, v in dict(
        model=model.name, adapter="none", build="b1", n_ctx=4096, type_k="q8_0", type_v="q8_0", rotation=False,
        flash_attn=True, slots=1).items()}
    info = ServerInfo("http://x", "llama-server", "completion", None, seen, {"model_path": str(model)})
    dep = _dep(model, launch)
    dep = DeploymentDoc(**{**dep.__dict__, "preconditions": [p for p in dep.preconditions
                                                           if p["check"] == "rendered"]})
    rows = evaluate(info, dep, tmp_path)
    assert all(r.status == "ok" for r in rows), [r for r in rows if r.status != "ok"]
    seen["rotation"] = Setting(True, "observed: GET /props")
    assert {r.item: r.status for r in evaluate(info, dep, tmp_path)}["rotation"] == "violated"


def test_statements_and_unreachable_servers_are_one_line_errors(tmp_path, model):
    dep = _dep(model, Launch("q8_0", "q8_0", True, 2048))
    with pytest.raises(ServerError, match="state nothing"):
        check_server(dep, tmp_path, "http://127.0.0.1:9#kv=q8_0", 1, 0)
    with pytest.raises(ServerError, match="cannot reach server"):
        check_server(dep, tmp_path, "http://127.0.0.1:9", 1, 0)
