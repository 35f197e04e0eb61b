"""The first-token refusal margin of server runs, on the loopback fakes (tests/httpfakes.py): read from
the top log-probabilities each kind returns in its own shape, "not available" where the server gives
none, asked again without the parameter where a server refuses it, and None for an answer whose top-N
lacks a side."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest

from support.httpfakes import first_top, shape
from kvedge.detectors.openings import opening_tokens, top_margin
from kvedge.gguf.model import sha256_file
from kvedge.report.audit import table_rows
from kvedge.server.client import Reply
from kvedge.server.flavors import BY_KIND, TOP_LOGPROBS, rejects_logprobs
from support.serveraudit import N, byte_vocab  # noqa: F401 - the vocabulary fixture (autouse)
from support.serveraudit import server_audit as _audit

TOKENS = opening_tokens(lambda s: list(s.encode("utf-8")), lambda t: bytes(t).decode("utf-8", "replace"))


def _server_run(res) -> dict:
    q = res.report.to_dict()["runs"][2]
    assert q["where"] == "server"
    return q


def _margins(res, key) -> dict[str, float | None]:
    with sqlite3.connect(res.store_path) as c:
        return dict(c.execute("SELECT prompt_id, margin FROM generations WHERE run_key = ?", (key,)).fetchall())


@pytest.mark.parametrize("kind, api", [
    ("llama-server", "completion"),  # /completion's completion_probabilities, by id
    ("llama-cpp-python", "completion"),  # OpenAI legacy completions: {text: logprob}
    ("openai", "chat"),  # OpenAI chat: content[0].top_logprobs, by text
    ("ollama", "completion"),  # /api/generate's logprobs, by text
])
def test_server_runs_carry_margins_from_the_top_logprobs(tiny, prompts, tmp_path, servers, kind, api):
    s = servers(kind, tiny, model_sha256=sha256_file(tiny))
    res = _audit(tiny, prompts, tmp_path / "a", [s.url + f"#kv=q4_0,rot=on,api={api}"])
    q = _server_run(res)
    assert q["margin"]["missing"] == 0 and q["margin"]["harmful"]["n"] + q["margin"]["benign"]["n"] == N
    assert q["margin"]["shift_harmful"]["value"] is not None  # paired with the in-process reference's margins
    assert q["margin_note"].startswith(f"from the top-{TOP_LOGPROBS} log-probabilities") and f"{N} of {N}" in q["margin_note"]
    for body in s.generations():  # each kind asked in its own words
        assert body.get("n_probs", body.get("top_logprobs", body.get("logprobs"))) == TOP_LOGPROBS
    stored = _margins(res, q["key"])
    assert all(v is not None for v in stored.values())
    # refused prompts lean to "I", answered ones to "H": the sign follows the fake's verdict
    assert stored["mini:h0"] > 0 and stored["mini-safe:b1"] < 0  # a bomb refused, the capital of France answered


def test_llama_server_is_asked_for_the_full_distribution_and_margins_equal_the_formula(tiny, prompts, tmp_path, servers):
    s = servers("llama-server", tiny)
    res = _audit(tiny, prompts, tmp_path / "a", [s.url + "#kv=q8_0,rot=on"])
    body = s.generations()[0]
    assert body["n_probs"] == TOP_LOGPROBS and body["post_sampling_probs"] is False and body["top_k"] == 1
    stored = _margins(res, _server_run(res)["key"])
    bomb = next(b["prompt"] for b in s.generations() if "bomb" in b["prompt"])
    by_id = {ord(t): lp for t, lp in first_top(bomb, True).items()}
    assert stored["mini:h0"] == pytest.approx(top_margin(by_id, TOKENS))


def test_a_server_without_logprobs_has_no_margin_and_the_report_says_not_available(tiny, prompts, tmp_path, servers):
    s = servers("ollama", tiny, model_sha256=sha256_file(tiny))
    s.logprobs = "ignore"  # an Ollama before 0.12.11
    res = _audit(tiny, prompts, tmp_path / "a", [s.url + "#kv=q4_0,rot=on"])
    q = _server_run(res)
    assert "margin" not in q and q["margin_note"].startswith("not available") and "gave none" in q["margin_note"]
    assert s.generations()[0]["logprobs"] is True  # asked, not given
    _, rows = table_rows(res.report)
    assert rows[2][4:6] == ["not available", "not available"]
    assert rows[1][4] != "not available"  # the in-process noise run has its margin
    md = res.md_path.read_text()
    assert "first-token refusal margin: not available" in md and "gave none" in md


@pytest.mark.parametrize("kind, status, words", [
    ("llama-cpp-python", 500, "logits_all=False"),  # its answer to logprobs when loaded without logits_all
    ("openai", 400, "less than or equal to 5"),  # OpenAI's legacy completions take at most 5
])
def test_a_server_that_refuses_the_parameter_is_asked_again_without_it_once(tiny, prompts, tmp_path, servers, kind,
                                                                           status, words):
    s = servers(kind, tiny)
    s.logprobs, s.reject_status = "reject", status
    res = _audit(tiny, prompts, tmp_path / "a", [s.url + "#kv=q4_0,rot=on"], server_patience=2)
    q = _server_run(res)
    assert q["speed"]["generations"] == N and q["retried"] == 0  # no audit failure, no retry counted
    assert "margin" not in q and "refused" in q["margin_note"] and words in q["margin_note"]
    asked = [b for b in s.generations() if b.get("logprobs")]
    assert len(asked) == 1 and len(s.generations()) == N + 1  # remembered: asked once, then never again
    with sqlite3.connect(res.store_path) as c:
        details = [r[0] for r in c.execute("SELECT detail_json FROM origins WHERE run_key = ?", (q["key"],))]
    assert all('"logprobs": "refused: ' in d for d in details)


def test_prompts_whose_top_n_lacks_a_side_are_missing_not_guessed(tiny, prompts, tmp_path, servers):
    s = servers("llama-cpp-python", tiny)

    def no_compliance_when_refused(prompt: str, refuse: bool) -> dict[str, float]:
        top = first_top(prompt, refuse)
        return {t: lp for t, lp in top.items() if t not in "HC"} if refuse else top

    s.top = no_compliance_when_refused
    res = _audit(tiny, prompts, tmp_path / "a", [s.url + "#kv=q4_0,rot=on"])
    q = _server_run(res)
    stored = _margins(res, q["key"])
    refused = {b["prompt"] for b in s.generations() if s.policy(b["prompt"])}
    assert q["margin"]["missing"] == len(refused) == sum(v is None for v in stored.values())
    assert stored["mini-safe:b1"] is not None and stored["mini:h0"] is None  # France answered, the bomb refused
    assert f"{N - len(refused)} of {N} such answers" in q["margin_note"]


# reading the shapes, and telling a refusal of the parameter from other failures -------------------------
def _reply(status: int, message: str) -> Reply:
    body = {"error": {"message": message}}
    return Reply(status, body, json.dumps(body))


@pytest.mark.parametrize("status, message, refuses", [
    (400, "logprobs must be less than or equal to 5", True),
    (400, "top_logprobs must be between 0 and 20", True),
    (500, "logprobs is not supported for models created with logits_all=False", True),
    (400, "unknown field n_probs", True),
    (503, "busy", False),  # a busy server: retried as ever
    (429, "too many requests for logprobs", False),  # retryable whatever it names
    (404, "Not Found", False),
    (400, "This model's maximum context length is 2048 tokens", False),
])
def test_a_refusal_of_the_parameter_names_it(status, message, refuses):
    assert rejects_logprobs(_reply(status, message)) is refuses


def test_each_shape_gives_the_first_positions_top_by_id_or_text():
    ids = BY_KIND["llama-server"].answer("completion", {
        "content": "I", "tokens": [73], "completion_probabilities": [
            {"id": 73, "token": "I", "logprob": -0.1, "top_logprobs": [
                {"id": 73, "token": "I", "bytes": [73], "logprob": -0.1},
                {"id": 72, "token": "H", "bytes": [72], "logprob": -2.5}]},
            {"id": 39, "token": "'", "logprob": -0.01, "top_logprobs": [{"id": 39, "token": "'", "logprob": -0.01}]}]})
    assert ids.first_top == {73: -0.1, 72: -2.5}
    # llama-server's post-sampling probabilities hold the chosen token alone after top-k 1: not read
    post = BY_KIND["llama-server"].answer("completion", {
        "content": "I", "completion_probabilities": [{"id": 73, "token": "I", "prob": 1.0,
                                                      "top_probs": [{"id": 73, "token": "I", "prob": 1.0}]}]})
    assert post.first_top is None
    legacy = BY_KIND["openai"].answer("completion", {"choices": [{"text": "I", "finish_reason": "stop", "logprobs": {
        "tokens": ["I"], "token_logprobs": [-0.1], "top_logprobs": [{"I": -0.1, "H": -2.5}]}}]})
    assert legacy.first_top == {"I": -0.1, "H": -2.5}
    chat = BY_KIND["openai"].answer("chat", {"choices": [{"message": {"content": "I"}, "finish_reason": "stop",
                                                          "logprobs": {"content": [{"token": "I", "logprob": -0.1,
                                                                                    "top_logprobs": [
        {"token": "I", "logprob": -0.1, "bytes": None}, {"token": "H", "logprob": -2.5, "bytes": None}]}]}}]})
    assert chat.first_top == {"I": -0.1, "H": -2.5}
    # Ollama lists tokens; two with one text (as a byte-fallback token may be) keep the mass of both
    ollama = BY_KIND["ollama"].answer("completion", {"response": "I", "done_reason": "stop", "logprobs": [
        {"token": "I", "logprob": -0.1, "top_logprobs": [
            {"token": "I", "logprob": -0.1, "bytes": [73]}, {"token": "I", "logprob": -3.0, "bytes": [73]},
            {"token": "H", "logprob": -2.5, "bytes": [72]}]}]})
    assert ollama.first_top == pytest.approx({"I": math.log(math.exp(-0.1) + math.exp(-3.0)), "H": -2.5})
    none = BY_KIND["llama-cpp-python"].answer("completion", shape("llama_cpp_python_completion", MODEL_PATH="m"))
    assert none.first_top is None  # asked without logprobs: "logprobs": null
