"""The real default audit re-judged by the real judge model (the default model as a stand-in): llama.cpp's
generation is never called and the store gains no row. The re-judging logic on a fake llama.cpp:
tests/unit/test_rejudge.py."""

from __future__ import annotations

import json
import sqlite3

from kvedge import api


def _generations(db) -> int:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT COUNT(*) FROM generations").fetchone()[0]


def test_real_audit_rejudged_by_the_judge_model_generates_nothing(small_audit, tmp_path, monkeypatch):
    """The default audit's stored answers judged by the default model as a stand-in judge: llama.cpp
    scores each distinct answer once and generates nothing; the store gains no row."""
    from kvedge.llama.runtime import Runtime

    db = small_audit["out"] / "kvedge.sqlite"
    before = _generations(db)
    calls = {"generate": 0, "next_logprobs": 0}

    def no_generation(self, *a, **k):
        calls["generate"] += 1
        raise AssertionError("re-judging must not generate")

    real_next = Runtime.next_logprobs

    def counted(self, prompt):
        calls["next_logprobs"] += 1
        return real_next(self, prompt)

    monkeypatch.setattr(Runtime, "generate", no_generation)
    monkeypatch.setattr(Runtime, "next_logprobs", counted)
    res = api.rejudge(small_audit["out"], "judge:default", out=tmp_path / "judge")
    assert calls["generate"] == 0 and res.generated == 0 and _generations(db) == before
    lines = [json.loads(x) for x in res.attempts_path.read_text().splitlines()]
    distinct = {(a["prompt"], a["response"]) for a in lines if a["rule"] != "empty"}
    assert calls["next_logprobs"] == len(distinct) > 0
    assert res.report.detector.name == "judge" and all(a["detector"]["name"] == "judge" for a in lines)
    assert all((a["score"] >= 0.5) is a["refused"] for a in lines if a["rule"] != "empty")
    assert (tmp_path / "judge" / "report.html").is_file()
    # the two detectors side by side on the same stored answers
    cmp = api.compare(small_audit["out"], detectors=["keyword", "judge:default"]).to_dict()
    kw = {(p["id"], label): v for p in small_audit["report"]["prompts"] for label, v in p["refused"].items()}
    jd = {(a["prompt_id"], a["config"]): a["refused"] for a in lines}
    for row in cmp["rows"]:
        keys = [(p["id"], row["config"]) for p in small_audit["report"]["prompts"]
                if row["prompts"] == "all" or p["harmful"] is (row["prompts"] == "harmful")]
        assert row["agreement"]["k"] == sum(kw[k] == jd[k] for k in keys) and row["n"] == len(keys)
    assert _generations(db) == before
