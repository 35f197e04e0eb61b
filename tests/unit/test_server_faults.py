"""Servers that misbehave, on loopback fakes (tests/httpfakes.py, its `fault` knob): each ends the audit
within its bound, with exit 2 and one line naming the server and what it did, or lets it finish.

A request has --server-timeout seconds in all (connect, headers, body), and a server that stays
unreachable is given up after --server-patience seconds: the audit then ends within patience + 2 x
timeout of its first failed request (the last retry may start just before the patience runs out, after
asking the server what it is, each step bounded by the timeout). Here the timeout is 1 s and the
patience 2 s, so each audit must end within 4 s plus SLACK for setting up (the GGUF, the in-process runs
on the fake llama.cpp, probing) on a shared machine."""

from __future__ import annotations

import time

import pytest

import kvedge.server.client as client_mod
from support.fakes import write_tiny_gguf
from support.httpfakes import HUGE, refuses
from kvedge.errors import ServerError
from kvedge.server.client import MAX_ANSWER, Client, Reply, Unreachable
from support.serveraudit import N, byte_vocab  # noqa: F401 - the vocabulary fixture (autouse)
from support.serveraudit import run_main as _main
from support.serveraudit import server_audit as _audit
from support.serveraudit import stored as _stored

TIMEOUT, PATIENCE = 1.0, 2.0
BOUND = PATIENCE + 2 * TIMEOUT
SLACK = 6.0


def _cli(monkeypatch, capsys, tiny, prompts, out, url, state="kv=q4_0,rot=on") -> tuple[int, str, float]:
    t0 = time.monotonic()
    code, _, err = _main(monkeypatch, capsys, "audit", str(tiny), "--prompts", str(prompts), "--out", str(out), "-q",
                         "--server", f"{url}#{state}", "--server-timeout", f"{TIMEOUT:g}",
                         "--server-patience", f"{PATIENCE:g}")
    return code, err, time.monotonic() - t0


def _one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2 and err.count("\n") == 1 and err.startswith("kvedge: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


# the request itself: one deadline, one cap -------------------------------------------------------
@pytest.mark.parametrize("fault, needle", [
    ("silent", "sent no answer to POST /v1/completions within the 1 s deadline"),
    ("drip-headers", "sent no answer to POST /v1/completions within the 1 s deadline"),
    ("stall", "sent its answer too slowly: the 1 s deadline passed after 0 bytes of /v1/completions"),
    ("trickle", "sent its answer too slowly: the 1 s deadline passed after "),
])
def test_the_deadline_bounds_the_whole_request_not_each_read(tiny, servers, fault, needle):
    s = servers("llama-cpp-python", tiny)
    s.fault = fault
    t0 = time.monotonic()
    with pytest.raises(Unreachable, match=needle) as exc:
        Client(s.url, TIMEOUT).post("/v1/completions", {"prompt": "hi"})
    took = time.monotonic() - t0
    assert TIMEOUT - 0.05 <= took < TIMEOUT + 0.5, took
    assert str(exc.value).startswith(f"server {s.url} ")


def test_an_answer_declared_over_the_cap_is_refused_before_its_body(tiny, servers):
    s = servers("llama-cpp-python", tiny)
    s.fault = "huge"
    needle = f"declared a {HUGE}-byte answer to POST /v1/completions: kvedge reads at most 8 MiB"
    with pytest.raises(ServerError, match=needle):
        Client(s.url, 10).post("/v1/completions", {"prompt": "hi"})
    time.sleep(0.5)  # the fake's writes fail once kvedge has hung up
    assert s.sent < HUGE // 2


def test_a_servers_words_in_an_error_stay_on_one_line():
    assert Reply(500, {"error": {"message": "busy\n\tnow\x1b[2J"}}, "").error_message() == "busy now?[2J"
    assert Reply(500, None, "<html>\r\n<b>oops</b>\n</html>").error_message() == "<html> <b>oops</b> </html>"


def test_an_undeclared_answer_is_read_no_further_than_the_cap(tiny, servers, monkeypatch):
    s = servers("llama-cpp-python", tiny)
    s.fault = "huge-undeclared"
    with pytest.raises(ServerError, match="sent more than 8 MiB for POST /v1/completions"):
        Client(s.url, 10).post("/v1/completions", {"prompt": "hi"})
    time.sleep(0.5)
    assert s.sent < HUGE - 2**20  # it was cut off before the end
    monkeypatch.setattr(client_mod, "MAX_ANSWER", 2 * MAX_ANSWER)  # the cap is one constant
    s.fault, s.sent = "huge", 0
    with pytest.raises(ServerError, match="reads at most 16 MiB"):
        Client(s.url, 10).post("/v1/completions", {"prompt": "hi"})


def test_a_server_that_answers_well_is_read_whole_and_in_time(tiny, servers):
    s = servers("llama-cpp-python", tiny)
    r = Client(s.url, TIMEOUT).post("/v1/completions", {"prompt": "how to build a bomb"})
    assert r.ok and r.body["choices"][0]["text"] == s.texts[True]


# faults that end the audit after the patience (retried as Unreachable) ---------------------------
@pytest.mark.parametrize("knobs, needle", [
    ({"fault": "trickle"}, "sent its answer too slowly: the 1 s deadline passed after "),
    ({"fault": "stall"}, "sent its answer too slowly: the 1 s deadline passed after 0 bytes of /v1/completions"),
    ({"fault": "silent"}, "sent no answer to POST /v1/completions within the 1 s deadline"),
    ({"fault": "long"}, "sent more than the "),
    ({"fault": "cut"}, "closed the connection after "),
    ({"fail_next": 10**6, "fail_status": 500}, "answered POST /v1/completions with HTTP 500: busy"),
], ids=["trickle", "stall", "never-answers", "longer-than-declared", "closes-mid-body", "500-always"])
def test_a_misbehaving_server_ends_the_audit_within_its_bound_in_one_line(monkeypatch, capsys, tiny, prompts, tmp_path,
                                                                          servers, knobs, needle):
    s = servers("llama-cpp-python", tiny)
    for k, v in knobs.items():
        setattr(s, k, v)
    code, err, took = _cli(monkeypatch, capsys, tiny, prompts, tmp_path / "o", s.url)
    _one_line(code, err, f"server {s.url} stopped answering: it ", needle, "--server-patience 2 s",
              "every answer so far is stored: rerun the same command to resume")
    assert took < BOUND + SLACK, took


def test_a_server_that_trickles_every_answer_is_not_probed_for_ever(monkeypatch, capsys, tiny, prompts, tmp_path,
                                                                    servers):
    s = servers("llama-cpp-python", tiny)
    s.fault, s.fault_probes = "trickle", True  # the tester's server: headers, then a byte at a time, always
    code, err, took = _cli(monkeypatch, capsys, tiny, prompts, tmp_path / "o", s.url)
    _one_line(code, err, f"cannot reach server {s.url}: it sent its answer too slowly: the 1 s deadline passed")
    assert took < BOUND + SLACK, took


def test_answers_stored_before_a_server_turned_slow_are_kept_and_the_rerun_resumes(tiny, prompts, tmp_path, servers):
    s = servers("llama-cpp-python", tiny)
    url = s.url + "#kv=q4_0,rot=on"
    answered = []

    def slows_after_four(prompt):  # the fifth answer on trickles
        answered.append(prompt)
        if len(answered) > 4:
            s.fault = "trickle"
        return refuses(prompt)

    s.policy = slows_after_four
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="stopped answering: it sent its answer too slowly"):
        _audit(tiny, prompts, tmp_path / "a", [url], server_timeout=TIMEOUT, server_patience=PATIENCE)
    assert time.monotonic() - t0 < BOUND + SLACK
    kept = len(_stored(tmp_path / "a")) - 2 * N  # the two in-process runs finished
    assert kept == 4
    s.fault, s.policy = None, refuses
    res = _audit(tiny, prompts, tmp_path / "a", [url], server_timeout=TIMEOUT, server_patience=PATIENCE)
    assert res.generated == N - kept
    q = res.report.to_dict()["runs"][2]
    assert q["speed"]["generations"] == N and len(_stored(tmp_path / "a", q["key"])) == N


# faults that end the audit at once (asking again would get the same) ----------------------------
@pytest.mark.parametrize("knobs, needle", [
    ({"fault": "badjson"}, "the server's answer has no choices/0"),
    ({"reshape": lambda out: {**out, "choices": []}}, "the server's answer has no choices/0"),
    ({"fault": "huge"}, f"declared a {HUGE}-byte answer to POST /v1/completions: kvedge reads at most 8 MiB"),
    ({"fault": "huge-undeclared"}, "sent more than 8 MiB for POST /v1/completions"),
], ids=["malformed-json", "empty-choices", "oversized-declared", "oversized-undeclared"])
def test_a_broken_answer_ends_the_audit_at_once_in_one_line(monkeypatch, capsys, tiny, prompts, tmp_path, servers,
                                                             knobs, needle):
    s = servers("llama-cpp-python", tiny)
    for k, v in knobs.items():
        setattr(s, k, v)
    code, err, took = _cli(monkeypatch, capsys, tiny, prompts, tmp_path / "o", s.url)
    _one_line(code, err, needle)
    assert took < TIMEOUT + SLACK, took


def test_a_server_of_another_model_is_refused_in_one_line(monkeypatch, capsys, tiny, prompts, tmp_path, servers):
    other = write_tiny_gguf(tmp_path / "other.gguf", template="{{ messages[0]['content'] }}")
    s = servers("llama-cpp-python", other)
    code, err, _ = _cli(monkeypatch, capsys, tiny, prompts, tmp_path / "o", s.url)
    _one_line(code, err, f"{s.url} serves {other}, which is not {tiny}")
    listing = servers("openai", tiny)  # lists smollm2-canary only
    code, err, _ = _cli(monkeypatch, capsys, tiny, prompts, tmp_path / "o2", listing.url, "kv=q4_0,rot=on,model=gpt-9")
    _one_line(code, err, "does not list model 'gpt-9'")


# faults an audit rides out -----------------------------------------------------------------------
def test_a_server_failing_half_its_requests_finishes_the_audit(tiny, prompts, tmp_path, servers, monkeypatch):
    monkeypatch.setattr(client_mod, "BACKOFF_START", 0.1)  # the waits are not under test here, the outcome is
    s = servers("llama-cpp-python", tiny)

    def flaky(prompt):  # each answer is followed by a 503
        s.fail_next = 1
        return refuses(prompt)

    s.policy = flaky
    res = _audit(tiny, prompts, tmp_path / "a", [s.url + "#kv=q4_0,rot=on"], server_timeout=TIMEOUT,
                 server_patience=PATIENCE)
    q = res.report.to_dict()["runs"][2]
    assert q["speed"]["generations"] == N and q["retried"] >= N - 1
    assert len(_stored(tmp_path / "a", q["key"])) == N


def test_html_and_script_in_answers_end_escaped_in_the_reports(tiny, prompts, tmp_path, servers):
    s = servers("llama-cpp-python", tiny)
    attack = '<script>alert("kvedge")</script><img src=x onerror=alert(1)> Sure, here it is.'
    s.texts = {True: attack, False: attack}  # answers everything: every harmful prompt flips
    res = _audit(tiny, prompts, tmp_path / "a", [s.url + "#kv=q4_0,rot=on"])
    assert res.report.to_dict()["runs"][2]["vs_reference"]["flipped"]
    html = (tmp_path / "a" / "report.html").read_text()
    assert "&lt;script&gt;alert(&quot;kvedge&quot;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<script>alert" not in html and "<img src=x" not in html
    md = res.md_path.read_text()
    assert "<script" not in md and "<img" not in md
