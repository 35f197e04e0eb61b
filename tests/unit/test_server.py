"""The server audit's logic on loopback fakes that answer with recorded response shapes
(tests/support/httpfakes.py) and a fake llama.cpp for the in-process runs (tests/support/fakes.py): what
each server kind reports and how kvedge marks it, what it is asked, the shared queue, retries, a server
that dies or comes back changed, resume, and refusals. tests/e2e/test_server.py runs a real server."""

from __future__ import annotations

import json
import sqlite3

import pytest

import kvedge.server.client as server_client
from support.fakes import write_tiny_gguf
from support.httpfakes import refuses
from kvedge.errors import EmptyPromptSet, ServerError
from kvedge.gguf.model import load_model, sha256_file
from kvedge.server.probe import check_model, probe
from kvedge.server.spec import parse_server

from support.serveraudit import N, byte_vocab  # noqa: F401 - the vocabulary fixture (autouse)
from support.serveraudit import run_main as _main  # noqa: F401
from support.serveraudit import server_audit as _audit
from support.serveraudit import stored as _stored


# what each kind reports ---------------------------------------------------------------------------
def test_llama_cpp_python_reports_model_and_build_the_rest_is_stated(tiny, servers):
    s = servers("llama-cpp-python", tiny)
    info = check_model(probe(parse_server(s.url + "#kv=q4_0"), 5, None), load_model(tiny), None)
    st = info.settings
    assert info.kind == "llama-cpp-python" and info.api == "completion"
    assert (st["model"].value, st["model"].source) == ("tiny.gguf", "observed: GET /v1/models")
    assert (st["build"].value, st["build"].provenance) == ("llama-cpp-python 0.3.36", "observed")
    assert (st["type_k"].value, st["type_k"].source) == ("q4_0", "stated")
    assert st["rotation"].value is None and st["rotation"].provenance == "unknown"
    assert (st["flash_attn"].value, st["flash_attn"].provenance) == (True, "implied")
    assert (st["adapter"].value, st["adapter"].provenance) == ("none", "stated")
    assert st["slots"].value == 1 and info.facts["model_check"].startswith("the served file is on this machine")


def test_ollama_model_digest_is_checked_against_the_gguf(tiny, tmp_path, servers):
    sha = sha256_file(tiny)
    s = servers("ollama", tiny, model_sha256=sha)
    info = check_model(probe(parse_server(s.url + "#kv=q8_0"), 5, None), load_model(tiny), None)
    st = info.settings
    assert info.kind == "ollama" and info.request_model == "smollm2-canary:latest"  # the one model loaded
    assert st["model"].value == f"smollm2-canary:latest (sha256 {sha[:12]})"
    assert (st["n_ctx"].value, st["n_ctx"].source) == (2048, "observed: GET /api/ps")
    assert st["build"].value == "ollama 0.5.7" and st["adapter"].value == "none"
    assert st["slots"].provenance == "assumed"
    assert info.facts["model_check"] == "sha256 of the served GGUF equals the local file's"
    other = servers("ollama", tiny, model_sha256="0" * 64)
    with pytest.raises(ServerError, match="serves a model with sha256 0000"):
        check_model(probe(parse_server(other.url + "#kv=q8_0"), 5, None), load_model(tiny), None)
    with pytest.raises(ServerError, match="one cache type for K and V"):
        probe(parse_server(s.url + "#kv=k=q8_0/v=q4_0"), 5, None)
    adapter = write_tiny_gguf(tmp_path / "adapter.gguf")
    wrong = servers("ollama", tiny, model_sha256=sha, adapter=adapter, adapter_sha256="1" * 64)
    with pytest.raises(ServerError, match="applies adapter"):
        check_model(probe(parse_server(wrong.url + "#kv=f16"), 5, adapter), load_model(tiny), adapter)


def test_openai_needs_a_model_name_only_when_it_lists_several(tiny, servers):
    s = servers("openai", tiny)
    info = probe(parse_server(s.url + "#kv=f16,api=chat"), 5, None)
    assert info.kind == "openai" and info.request_model == "smollm2-canary" and info.api == "chat"
    with pytest.raises(ServerError, match="does not list model"):
        probe(parse_server(s.url + "#kv=f16,model=gpt-9"), 5, None)


def test_stated_settings_that_contradict_the_server_are_refused(tiny, servers):
    s = servers("ollama", tiny, model_sha256=sha256_file(tiny))
    with pytest.raises(ServerError, match="reports n_ctx 2048"):
        probe(parse_server(s.url + "#kv=f16,ctx=4096"), 5, None)
    with pytest.raises(ServerError, match="only with flash attention"):
        probe(parse_server(s.url + "#kv=q4_0,fa=off"), 5, None)


# the audit over servers ---------------------------------------------------------------------------
def test_requests_are_greedy_and_raw(tiny, prompts, tmp_path, servers):
    lcp = servers("llama-cpp-python", tiny)
    oll = servers("ollama", tiny, model_sha256=sha256_file(tiny))
    _audit(tiny, prompts, tmp_path / "a", [lcp.url + "#kv=q4_0,rot=on", oll.url + "#kv=q8_0,rot=off"])
    body = lcp.generations()[0]
    assert body["temperature"] == 0 and body["top_k"] == 1 and body["repeat_penalty"] == 1.0 and body["seed"] == 0
    assert body["max_tokens"] == 16 and not body["stream"] and "<assistant>" in body["prompt"]  # templated by kvedge
    body = oll.generations()[0]
    assert body["raw"] is True and body["stream"] is False and body["model"] == "smollm2-canary:latest"
    assert body["options"]["temperature"] == 0 and body["options"]["repeat_penalty"] == 1.0
    assert body["options"]["num_predict"] == 16


def test_llama_server_is_asked_not_to_reuse_its_cache_and_its_own_timings_are_used(tiny, prompts, tmp_path, servers):
    s = servers("llama-server", tiny)
    res = _audit(tiny, prompts, tmp_path / "a", [s.url + "#kv=q8_0,rot=on"])
    body = s.generations()[0]
    assert body["cache_prompt"] is False and body["return_tokens"] is True and body["n_predict"] == 16
    assert body["temperature"] == 0 and body["top_k"] == 1
    q = res.report.to_dict()["runs"][2]
    assert q["speed"]["clock"] == "the servers' own timings" and q["served_by"] == {s.url: N}
    with sqlite3.connect(res.store_path) as c:
        stored = json.loads(c.execute("SELECT tokens_json FROM generations WHERE run_key = ? LIMIT 1",
                                      (q["key"],)).fetchone()[0])
    assert 0 not in stored  # the end-of-generation token llama-server lists is not part of the answer


def test_a_fleet_shares_one_queue_and_every_answer_names_its_server(tiny, prompts, tmp_path, servers):
    a, b = servers("llama-cpp-python", tiny), servers("llama-cpp-python", tiny)
    res = _audit(tiny, prompts, tmp_path / "a", [a.url + "#kv=q4_0,rot=on", b.url + "#kv=q4_0,rot=on"])
    rep = res.report.to_dict()
    assert [r["label"] for r in rep["runs"]] == ["f16", "f16 noise (flash-attn-off)", "q4_0 rot=on"]
    q = rep["runs"][2]
    assert q["where"] == "server" and rep["runs"][0]["where"] == "in-process"
    assert sum(q["served_by"].values()) == N and all(v > 0 for v in q["served_by"].values())
    assert len(a.generations()) + len(b.generations()) == N
    # the fake server refuses what the fake llama.cpp refuses: the verdicts agree
    assert q["vs_reference"]["flipped"] == [] and q["vs_noise"]["verdict"] == "within noise"
    assert q["prompt_tokens_match"]["k"] == N and q["kld"]["value"] is None and "not measured" in q["kld_note"]
    assert {s["url"]: s["answered"] for s in rep["servers"]} == q["served_by"]
    with sqlite3.connect(res.store_path) as c:
        tags = c.execute("SELECT server, COUNT(*) FROM origins WHERE run_key = ? GROUP BY server", (q["key"],)).fetchall()
    assert dict(tags) == q["served_by"]
    md = res.md_path.read_text()
    assert "## Servers" in md and "q4_0 / q4_0 (stated)" in md and "llama-cpp-python 0.3.36 (observed)" in md
    again = _audit(tiny, prompts, tmp_path / "a", [a.url + "#kv=q4_0,rot=on", b.url + "#kv=q4_0,rot=on"])
    assert again.generated == 0 and again.json_path.read_bytes() == res.json_path.read_bytes()


def test_f16_servers_are_the_reference_and_noise_runs(tiny, prompts, tmp_path, servers):
    ref, noisy, q = (servers("llama-cpp-python", tiny) for _ in range(3))
    rep = _audit(tiny, prompts, tmp_path / "a", [q.url + "#kv=q4_0,rot=off", ref.url + "#kv=f16,fa=on",
                                                 noisy.url + "#kv=f16,fa=off"]).report.to_dict()
    assert [(r["label"], r["where"]) for r in rep["runs"]] == [
        ("f16", "server"), ("f16 noise (flash-attn-off)", "server"), ("q4_0 rot=off", "server")]
    assert all(r["kld"]["value"] is None for r in rep["runs"])  # no in-process reference to score against


@pytest.mark.parametrize("status", [503, 429])
def test_retries_with_backoff_lose_and_repeat_nothing(tiny, prompts, tmp_path, servers, status, monkeypatch):
    monkeypatch.setattr(server_client, "BACKOFF_START", 0.01)  # the same retries, without seconds of waiting
    s = servers("llama-cpp-python", tiny)
    s.fail_next, s.fail_status = 3, status
    res = _audit(tiny, prompts, tmp_path / "a", [s.url + "#kv=q4_0,rot=on"])
    q = res.report.to_dict()["runs"][2]
    assert q["retried"] >= 1 and q["speed"]["generations"] == N
    assert len(_stored(tmp_path / "a", q["key"])) == N


def test_a_dead_server_stops_the_audit_and_the_rerun_resumes(tiny, prompts, tmp_path, servers, monkeypatch):
    s = servers("llama-cpp-python", tiny)
    url = s.url + "#kv=q4_0,rot=on"
    answered = []

    def dies_after_four(prompt):  # the server goes down (503s) after four answers
        answered.append(prompt)
        if len(answered) > 4:
            s.fail_next = 10**6
        return refuses(prompt)

    s.policy = dies_after_four
    with pytest.raises(ServerError, match="stopped answering"):
        _audit(tiny, prompts, tmp_path / "a", [url], server_patience=1)
    kept = len(_stored(tmp_path / "a")) - 2 * N  # the two in-process runs finished
    assert 4 <= kept < N
    s.fail_next = 0  # restarted
    s.policy = refuses
    res = _audit(tiny, prompts, tmp_path / "a", [url])
    assert res.generated == N - kept
    q = res.report.to_dict()["runs"][2]
    assert q["speed"]["generations"] == N and len(_stored(tmp_path / "a", q["key"])) == N


def test_one_dead_server_of_a_fleet_hands_its_work_to_the_others(tiny, prompts, tmp_path, servers):
    a, b = servers("llama-cpp-python", tiny), servers("llama-cpp-python", tiny)
    a.fail_next = 10**6  # never answers
    res = _audit(tiny, prompts, tmp_path / "a", [a.url + "#kv=q4_0,rot=on", b.url + "#kv=q4_0,rot=on"],
                 server_patience=1)
    q = res.report.to_dict()["runs"][2]
    assert q["served_by"] == {a.url: 0, b.url: N}


def test_a_server_that_comes_back_changed_is_refused(tiny, prompts, tmp_path, servers):
    s = servers("llama-cpp-python", tiny)
    other = write_tiny_gguf(tmp_path / "other.gguf")

    def swaps_model(prompt):  # mid-audit the server restarts serving another file, and fails once
        if s.model_path == tiny and len(s.generations()) >= 3:
            s.model_path, s.fail_next = other, 1
        return "bomb" in prompt

    s.policy = swaps_model
    with pytest.raises(ServerError, match="came back changed"):
        _audit(tiny, prompts, tmp_path / "a", [s.url + "#kv=q4_0,rot=on"])


def test_a_changed_server_against_an_existing_store_exits_2(monkeypatch, capsys, tiny, prompts, tmp_path, servers):
    s = servers("llama-cpp-python", tiny)
    common = ["audit", str(tiny), "--prompts", str(prompts), "--out", str(tmp_path / "o"), "-q"]
    code, out, err = _main(monkeypatch, capsys, *common, "--server", s.url, "--server-kv", "q4_0")
    assert code == 0, err
    assert f"server {s.url} (llama-cpp-python): q4_0 rot=?" in out
    code, out, err = _main(monkeypatch, capsys, *common, "--server", s.url, "--server-kv", "q8_0")
    assert code == 2 and err.count("\n") == 1 and "is not what" in err and "type_k 'q4_0' -> 'q8_0'" in err, err


@pytest.mark.parametrize("extra, needle", [
    (["--server", "http://127.0.0.1:9#kv=q4_0", "--kv", "q4_0"], "--kv and --rotation choose in-process"),
    (["--server-kv", "q4_0"], "give --server URL"),
    (["--server", "localhost:8080"], "http(s) URL"),
    (["--server", "http://127.0.0.1:9#kv=q4_0", "--server-patience", "0"], "cannot reach server"),
])
def test_bad_server_arguments_exit_2_with_one_line(monkeypatch, capsys, tiny, prompts, tmp_path, extra, needle):
    code, out, err = _main(monkeypatch, capsys, "audit", str(tiny), "--prompts", str(prompts),
                           "--out", str(tmp_path / "o"), "-q", *extra)
    assert code == 2 and err.count("\n") == 1 and err.startswith("kvedge: error:") and needle in err, err


def test_a_server_without_stated_cache_types_is_refused(tiny, prompts, tmp_path, servers):
    s = servers("llama-cpp-python", tiny)
    with pytest.raises(ServerError, match="does not report its KV cache types"):
        _audit(tiny, prompts, tmp_path / "a", [s.url])


def test_two_differently_set_servers_for_one_label_are_not_mixed(tiny, prompts, tmp_path, servers):
    a, b = servers("llama-cpp-python", tiny), servers("ollama", tiny, model_sha256=sha256_file(tiny))
    with pytest.raises(ServerError, match="both serve q4_0 rot=on but differ in"):
        _audit(tiny, prompts, tmp_path / "a", [a.url + "#kv=q4_0,rot=on", b.url + "#kv=q4_0,rot=on"])


def test_prompts_beyond_the_servers_context_are_left_out_not_read_as_refusals(tiny, prompts, tmp_path, servers):
    """A server that rejects a prompt as too long gives no answer; an empty answer would read as a refusal,
    so such prompts are left out of every figure, as in-process ones are, and with none left it is an error."""
    s = servers("llama-cpp-python", tiny)
    s.context_chars = 10
    with pytest.raises(EmptyPromptSet, match="longer than the context"):
        _audit(tiny, prompts, tmp_path / "a", [s.url + "#kv=q4_0,rot=on"])


def test_chat_only_endpoints_get_messages_and_the_report_says_so(tiny, prompts, tmp_path, servers):
    s = servers("openai", tiny)
    res = _audit(tiny, prompts, tmp_path / "a", [s.url + "#kv=q4_0,rot=on,api=chat"], system="Be brief.")
    body = s.generations()[0]
    assert body["messages"][0] == {"role": "system", "content": "Be brief."} and body["model"] == "smollm2-canary"
    q = res.report.to_dict()["runs"][2]
    assert q["request"].startswith("chat messages") and q["prompt_tokens_match"]["n"] == N


def test_an_answer_without_its_text_is_an_error_not_a_refusal(tiny, prompts, tmp_path, servers):
    s = servers("llama-cpp-python", tiny)
    s.drop_text = True
    with pytest.raises(ServerError, match="answer has no text"):
        _audit(tiny, prompts, tmp_path / "a", [s.url + "#kv=q4_0,rot=on"])
