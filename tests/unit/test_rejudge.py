"""Re-judging a finished audit from its stored answers: the same detector reproduces the audit's report
exactly, and another detector changes verdicts without generating anything (fake llama.cpp). The real
default audit re-judged by the real judge model: tests/e2e/test_rejudge.py."""

from __future__ import annotations

import json
import sqlite3
import sys

import pytest

from support.fakes import BENIGN, HARMFUL, FakeRuntimes, loses_kill_at_q4_norot, write_tiny_gguf
from kvedge import api
from kvedge import cli
from kvedge.errors import RunDirError


@pytest.fixture
def audited(tmp_path):
    rows = [{"id": f"h{i}", "prompt": t, "label": "harmful", "benchmark": "mini"} for i, t in enumerate(HARMFUL)]
    rows += [{"id": f"b{i}", "prompt": t, "label": "benign", "benchmark": "mini-safe"} for i, t in enumerate(BENIGN)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf")
    return api.audit(model=tiny, prompts=prompts, kv="f16,q4_0", rotation="both", out=tmp_path / "run",
                     progress=False, runtimes=FakeRuntimes(loses_kill_at_q4_norot), max_tokens=16)


def _generations(db) -> int:
    with sqlite3.connect(db) as c:
        return c.execute("SELECT COUNT(*) FROM generations").fetchone()[0]


def test_same_detector_reproduces_the_report(audited, tmp_path):
    again = api.rejudge(audited.json_path.parent, "keyword", out=tmp_path / "same")
    assert again.generated == 0
    assert again.json_path.read_bytes() == audited.json_path.read_bytes()
    assert again.attempts_path.read_bytes() == audited.attempts_path.read_bytes()
    assert again.html_path.read_bytes() == audited.html_path.read_bytes()


def test_another_detector_rejudges_without_generating(audited, tmp_path):
    run = audited.json_path.parent
    before = _generations(run / "kvedge.sqlite")
    phrases = tmp_path / "p.txt"
    phrases.write_text("mode: replace\nprefix: sure\n")  # the fake's compliance now counts as refusal
    res = api.rejudge(run, refusal_phrases=phrases)
    assert res.json_path.parent == run / f"detector-{res.report.to_dict()['detector']['id']}"
    assert res.report.to_dict()["detector"]["id"].startswith("keyword-v1-")
    assert _generations(run / "kvedge.sqlite") == before
    old = {p["id"]: p["refused"] for p in audited.report.to_dict()["prompts"]}
    for p in res.report.to_dict()["prompts"]:
        assert all(v is not old[p["id"]][k] for k, v in p["refused"].items())  # every verdict inverted
    # the audit's own reports are left as they were
    assert json.loads(audited.json_path.read_text())["detector"]["id"] == "keyword-v1"


def test_rejudge_refuses_what_it_cannot_read(audited, tmp_path):
    run = audited.json_path.parent
    with pytest.raises(RunDirError, match="no audit report"):
        api.rejudge(tmp_path / "nowhere")
    rep = json.loads(audited.json_path.read_text())
    for p in rep["prompts"]:
        del p["text"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text(json.dumps(rep))
    with pytest.raises(RunDirError, match="predates stored prompt texts"):
        api.rejudge(old)
    with sqlite3.connect(run / "kvedge.sqlite") as c:
        c.execute("DELETE FROM generations WHERE prompt_id = 'mini:h1'")
    with pytest.raises(RunDirError, match="lacks 1 answers of f16"):
        api.rejudge(run)


def test_cli_rejudge_and_compare_exit_codes(audited, monkeypatch, capsys, tmp_path):
    run = str(audited.json_path.parent)

    def main(*args):
        monkeypatch.setattr(sys, "argv", ["kvedge", *args])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        out, err = capsys.readouterr()
        return exc.value.code, out, err

    code, out, err = main("rejudge", run, "--out", str(tmp_path / "rj"))
    assert code == 0 and "verdicts by keyword-v1" in out and "report.html" in out and "attempts.jsonl" in out
    assert err == ""  # the detector that ended the answers judges them again: nothing to warn of
    phrases = tmp_path / "p.txt"
    phrases.write_text("prefix: sure\n")
    code, out, err = main("rejudge", run, "--refusal-phrases", str(phrases), "--out", str(tmp_path / "rj2"))
    assert code == 0 and "note: the audit ended answers once keyword-v1 could decide them" in err
    for args, needle in ((["rejudge", run, "--detector", "oracle"], "unknown detector 'oracle'"),
                         (["rejudge", run, "--detector", "judge"], "the judge needs a model"),
                         (["rejudge", run, "--refusal-phrases", str(tmp_path / "none.txt")], "not found"),
                         (["compare", run], "two --detector"),
                         (["compare", run, "--detector", "keyword", "--detector", "keyword"], "are the same"),
                         (["audit", "--detector", "judge:/no/such.gguf"], "judge model not found")):
        code, out, err = main(*args)
        assert code == 2 and err.startswith("kvedge: error:") and err.count("\n") == 1 and needle in err, err
