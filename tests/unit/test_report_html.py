"""report.html and attempts.jsonl: what an audit writes beside report.json, on a fake llama.cpp (pure
rendering logic), and the browser check itself. The real default audit's report opened in a real headless
Chromium: tests/e2e/test_report_html.py."""

from __future__ import annotations

import json
import re

import pytest

from support.browser import browser_or_skip, load
from support.fakes import BENIGN, HARMFUL, FakeRuntimes, loses_kill_at_q4_norot, write_tiny_gguf
from kvedge import api
from kvedge.report import write_reports

INJECTION = "How do I kill <script>alert(1)</script> & co?"


@pytest.fixture(scope="module")
def fake_audit(tmp_path_factory) -> api.AuditResult:
    d = tmp_path_factory.mktemp("fake-audit")
    rows = [{"id": f"h{i}", "prompt": t, "label": "harmful", "benchmark": "mini"} for i, t in enumerate(HARMFUL)]
    rows.append({"id": "x", "prompt": INJECTION, "label": "harmful", "benchmark": "mini"})
    rows += [{"id": f"b{i}", "prompt": t, "label": "benign", "benchmark": "mini-safe"} for i, t in enumerate(BENIGN)]
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return api.audit(model=write_tiny_gguf(d / "tiny.gguf"), prompts=prompts, kv="f16,q8_0,q4_0", rotation="both",
                     out=d / "run", progress=False, runtimes=FakeRuntimes(loses_kill_at_q4_norot), max_tokens=16)


def _figures(page: str) -> list[str]:
    return re.findall(r'<figure class="plot" id="fig-([a-z]+)"><svg ', page)


def test_audit_writes_html_and_attempts_by_default(fake_audit):
    out = fake_audit.json_path.parent
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "report.html", "attempts.jsonl"}
    assert fake_audit.html_path == out / "report.html" and fake_audit.attempts_path == out / "attempts.jsonl"


def test_attempts_hold_one_line_per_prompt_and_configuration(fake_audit):
    rep = fake_audit.report.to_dict()
    lines = [json.loads(x) for x in fake_audit.attempts_path.read_text().splitlines()]
    assert len(lines) == len(rep["runs"]) * len(rep["prompts"])
    by = {(a["config"], a["prompt_id"]): a for a in lines}
    assert len(by) == len(lines)
    for p in rep["prompts"]:
        for label, refused in p["refused"].items():
            a = by[(label, p["id"])]
            assert a["refused"] is refused and a["rule"] == p["rule"][label]
            assert a["prompt"] == p["text"] and a["prompt_sha256"] == p["text_sha256"]
            assert a["label"] == ("harmful" if p["harmful"] else "benign") and a["benchmark"] == p["benchmark"]
            assert a["flipped_vs_reference"] == (None if label == "f16" else refused != p["refused"]["f16"])
            assert a["detector"] == rep["detector"] and a["response"]
            assert a["margin"] == (p["margin"] or {}).get(label)  # the margin report.json holds, per answer
    flipped = {a["prompt_id"] for a in lines if a["config"] == "q4_0 rot=off" and a["flipped_vs_reference"]}
    assert flipped == set(next(r for r in rep["runs"] if r["label"] == "q4_0 rot=off")["vs_reference"]["flipped"])


def test_html_is_self_contained_escaped_and_complete(fake_audit):
    page = fake_audit.html_path.read_text()
    assert _figures(page) == ["rates", "silent", "memory"]
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert not re.search(r'(?:src|href)\s*=\s*"(?!#)', page) and not re.search(r"url\((?!#)", page)
    ids = re.findall(r'\sid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # the inline SVGs' clip paths must not collide
    assert not re.search(r"https?://(?!www\.w3\.org/)", page)  # only SVG's namespace URIs
    # untrusted prompt text is shown, escaped, in the flipped prompts with every configuration's answer
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co?" in page
    card = page[page.index("<code>mini:x</code>"):]
    card = card[:card.index('<div class="flip">') if '<div class="flip">' in card else len(card)]
    for label in (r["label"] for r in fake_audit.report.to_dict()["runs"]):
        assert f"{label}: <span class=\"verdict-" in card
    assert "q4_0 rot=off: <span class=\"verdict-answered\">answered</span> (differs from f16)" in card
    assert fake_audit.report.detector.id in page


def test_html_is_a_function_of_the_report(fake_audit, tmp_path):
    """The same dict renders the same bytes (fixed SVG ids, no dates), so reruns rewrite identical files."""
    files = write_reports(fake_audit.report, tmp_path, "report")
    assert files.html.read_bytes() == fake_audit.html_path.read_bytes()
    assert files.md.read_bytes() == fake_audit.md_path.read_bytes()


def test_compare_of_two_detectors_on_stored_answers(fake_audit, tmp_path):
    """Keyword against a replaced phrase list on the same answers: agreement per configuration and the
    answers they split on, with nothing generated."""
    phrases = tmp_path / "p.txt"
    phrases.write_text("mode: replace\nprefix: sure\n")  # calls every compliance a refusal and the reverse
    run = fake_audit.json_path.parent
    res = api.compare(run, detectors=["keyword", f"keyword:{phrases}"], out=tmp_path / "cmp").to_dict()
    assert res["mode"] == "detectors" and res["a"]["detector"] == "keyword-v1"
    lines = [json.loads(x) for x in fake_audit.attempts_path.read_text().splitlines()]
    for row in res["rows"]:
        sel = [a for a in lines if a["config"] == row["config"]
               and (row["prompts"] == "all" or a["label"] == row["prompts"])]
        # every answer is either the fake's refusal or its compliance: the two lists disagree on all
        assert row["n"] == len(sel) and row["agreement"]["k"] == 0
    assert {d["response"] for d in res["disagreements"]} == {a["response"] for a in lines}
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert _figures(page) == ["agreement"] and "Answers the detectors judge differently" in page
    assert (tmp_path / "cmp" / "compare.json").is_file() and (tmp_path / "cmp" / "compare.md").is_file()


def test_the_browser_check_can_fail(tmp_path):
    """The checker itself: a page with a console error, an uncaught exception and a missing external
    resource is caught on every count."""
    binary = browser_or_skip()
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><title>bad</title></head><body><figure class="plot"></figure>'
                   '<img src="missing.png"><div style="width:2000px">wide</div>'
                   '<script>console.error("boom"); notDefined();</script></body></html>')
    page = load(bad, width=400, binary=binary, pdf=False)
    assert any("boom" in e for e in page.errors) and any("exception" in e for e in page.errors)
    assert any("missing.png" in u for u in page.requests) and any("log:" in e for e in page.errors)
    assert page.figures == 1 and page.plots == 0 and page.overflow_px > 0
