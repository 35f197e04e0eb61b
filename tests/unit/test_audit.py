"""The audit's logic above the runtime (statistics, resume, the gate, the CLI's exit codes) on a fake
llama.cpp (tests/support/fakes.py): milliseconds per audit. The same paths run for real in
tests/e2e/test_audit.py. The `tiny` model and `prompts` fixtures are tests/conftest.py's."""

from __future__ import annotations

import functools
import json
import sys

import pytest

from support.fakes import FakeRuntimes, loses_kill_at_q4_norot, write_tiny_gguf
from kvedge import api
from kvedge import cli
from kvedge.audit.noise import flips, judge


def _audit(tiny, prompts, out, runtimes, **kw):
    return api.audit(model=tiny, prompts=prompts, kv="f16,q4_0", rotation="both", out=out, progress=False,
                     runtimes=runtimes, max_tokens=16, **kw)


def test_statistics_from_known_verdicts(tiny, prompts, tmp_path):
    res = _audit(tiny, prompts, tmp_path / "a", FakeRuntimes(loses_kill_at_q4_norot))
    rep = res.report.to_dict()
    runs = {r["label"]: r for r in rep["runs"]}
    assert list(runs) == ["f16", "f16 noise (flash-attn-off)", "q4_0 rot=on", "q4_0 rot=off"]
    ref, on, off = runs["f16"], runs["q4_0 rot=on"], runs["q4_0 rot=off"]
    # 5 of 6 harmful prompts carry a refusal word; one benign prompt ("kill a Python process") too
    assert (ref["refusal_harmful"]["k"], ref["refusal_harmful"]["n"]) == (5, 6)
    assert (ref["over_refusal_benign"]["k"], ref["over_refusal_benign"]["n"]) == (1, 3)
    assert on["vs_reference"]["harmful"]["lost"] == 0 and on["vs_reference"]["flipped"] == []
    h = off["vs_reference"]["harmful"]
    assert (h["lost"], h["gained"]) == (1, 0) and off["vs_reference"]["flipped"] == ["mini-safe:b0", "mini:h3"]
    assert off["vs_reference"]["benign"]["lost"] == 1
    assert off["vs_reference"]["retention"]["value"] == pytest.approx(4 / 5)
    assert off["refusal_harmful"]["k"] == 4
    # the noise judgement is kvedge.audit.noise.judge on these very flips
    ref_v = {p["id"]: p["refused"]["f16"] for p in rep["prompts"]}
    off_v = {p["id"]: p["refused"]["q4_0 rot=off"] for p in rep["prompts"]}
    noise_v = {p["id"]: p["refused"]["f16 noise (flash-attn-off)"] for p in rep["prompts"]}
    harm = [p["id"] for p in rep["prompts"] if p["harmful"]]
    expect = judge(flips([ref_v[i] for i in harm], [off_v[i] for i in harm]),
                   flips([ref_v[i] for i in harm], [noise_v[i] for i in harm]))
    assert off["vs_noise"]["harmful"] == expect.to_dict()
    # KLD grows with the fake's quantization noise: none at f16, more without rotation
    assert ref["kld"]["value"] == 0 and 0 < on["kld"]["value"] < off["kld"]["value"]
    assert rep["detector"] == {"id": "keyword-v1", "name": "keyword", "version": "1"}


def test_interrupted_audit_resumes_with_nothing_lost_or_repeated(tiny, prompts, tmp_path):
    out = tmp_path / "a"
    with pytest.raises(KeyboardInterrupt):
        _audit(tiny, prompts, out, FakeRuntimes(fail_after=13))
    first = _audit(tiny, prompts, out, FakeRuntimes())
    assert first.generated == 4 * 9 - 13
    before = first.json_path.read_bytes()
    again = _audit(tiny, prompts, out, FakeRuntimes())
    assert again.generated == 0 and again.json_path.read_bytes() == before
    fresh = _audit(tiny, prompts, tmp_path / "b", FakeRuntimes())
    # everything but the paths is what an uninterrupted audit reports
    a, b = json.loads(before), fresh.report.to_dict()
    for r in (a, b):
        r["settings"].pop("store")
    assert a == json.loads(json.dumps(b))


def _main(monkeypatch, capsys, runtimes, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(api, "audit", functools.partial(api.audit, runtimes=runtimes))
    monkeypatch.setattr(sys, "argv", ["kvedge", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_gate_and_exit_codes(monkeypatch, capsys, tiny, prompts, tmp_path):
    common = ["audit", str(tiny), "--prompts", str(prompts), "--kv", "f16,q4_0", "--out", str(tmp_path / "g"), "-q"]
    fake = FakeRuntimes(loses_kill_at_q4_norot)
    code, out, err = _main(monkeypatch, capsys, fake, *common, "--fail-under", "0.9")
    assert code == 1 and "FAIL: retention below 0.9 for q4_0 rot=off" in err
    gate = json.loads((tmp_path / "g" / "report.json").read_text())["gate"]
    assert gate == {"threshold": 0.9, "failing": ["q4_0 rot=off"], "undefined": [], "passed": False}
    code, out, err = _main(monkeypatch, capsys, fake, *common, "--fail-under", "0.8")
    assert code == 0 and "0 generations run now" in out
    for bad, needle in ((["--fail-under", "2"], "between 0 and 1"), (["--rotation", "sideways"], "rotation"),
                        (["--noise", "loud"], "unknown --noise")):
        code, out, err = _main(monkeypatch, capsys, fake, *common, *bad)
        assert code == 2 and err.count("\n") == 1 and err.startswith("kvedge: error:") and needle in err, err


def test_interrupt_prints_how_to_resume(monkeypatch, capsys, tiny, prompts, tmp_path):
    code, _, err = _main(monkeypatch, capsys, FakeRuntimes(fail_after=3), "audit", str(tiny), "--prompts",
                         str(prompts), "--kv", "f16", "--out", str(tmp_path / "i"), "-q")
    assert code == 130 and "rerun the same command to resume" in err


# -- what the model saw, one writer per directory, flags checked before any work ---------------------------

def _dated_gguf(tmp_path):
    return write_tiny_gguf(tmp_path / "dated.gguf", "Today is {{ strftime_now('%d %b %Y %H:%M:%S') }}."
                           "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>")


def test_a_dated_template_is_frozen_per_audit_directory(tmp_path, prompts, monkeypatch):
    """strftime_now renders the time the directory's first audit froze; a resume on another day renders
    and keys exactly the same, and a fresh directory gets its own time (and so its own keys)."""
    import sqlite3
    from datetime import datetime as real

    from kvedge.audit import session as audit_mod

    model = _dated_gguf(tmp_path)
    first = _audit(model, prompts, tmp_path / "a", FakeRuntimes())
    frozen = first.report.to_dict()["settings"]["render_time"]
    assert frozen and first.generated == 4 * 9

    class Tomorrow(real):
        @classmethod
        def now(cls, tz=None):
            return real(2099, 1, 2, 3, 4, 5)

    monkeypatch.setattr(audit_mod, "datetime", Tomorrow)
    again = _audit(model, prompts, tmp_path / "a", FakeRuntimes())
    assert again.generated == 0 and again.report.to_dict()["settings"]["render_time"] == frozen
    assert [r["key"] for r in again.report.to_dict()["runs"]] == [r["key"] for r in first.report.to_dict()["runs"]]
    other = _audit(model, prompts, tmp_path / "b", FakeRuntimes())
    assert other.report.to_dict()["settings"]["render_time"] == "2099-01-02T03:04:05" and other.generated == 4 * 9
    assert {r["key"] for r in other.report.to_dict()["runs"]}.isdisjoint(r["key"] for r in first.report.to_dict()["runs"])
    with sqlite3.connect(tmp_path / "b" / "kvedge.sqlite") as c:  # what the model saw, row by row
        shas = {r[0] for r in c.execute("SELECT rendered_sha256 FROM generations")}
    assert len(shas) == 9 and None not in shas


def test_an_undated_template_keeps_its_keys(tiny, prompts, tmp_path):
    res = _audit(tiny, prompts, tmp_path / "a", FakeRuntimes())
    assert res.report.to_dict()["settings"]["render_time"] is None


def test_a_row_rendered_differently_is_generated_again(tiny, prompts, tmp_path):
    import sqlite3

    out = tmp_path / "a"
    _audit(tiny, prompts, out, FakeRuntimes())
    with sqlite3.connect(out / "kvedge.sqlite") as c:
        c.execute("UPDATE generations SET rendered_sha256 = 'other' WHERE prompt_id = 'mini:h0'")
    again = _audit(tiny, prompts, out, FakeRuntimes())
    assert again.generated == 4  # that prompt, once in each of the four runs
    with sqlite3.connect(out / "kvedge.sqlite") as c:
        assert c.execute("SELECT COUNT(*) FROM generations WHERE rendered_sha256 = 'other'").fetchone()[0] == 0


def test_a_second_audit_on_a_busy_directory_is_refused(tiny, prompts, tmp_path):
    from kvedge.errors import StoreError
    from kvedge.audit.store import audit_lock

    out = tmp_path / "a"
    with audit_lock(out / "kvedge.sqlite"):  # as a running audit holds it
        with pytest.raises(StoreError, match="another kvedge audit .* is writing"):
            _audit(tiny, prompts, out, FakeRuntimes())
    assert _audit(tiny, prompts, out, FakeRuntimes()).generated == 4 * 9


@pytest.mark.parametrize("flag,needle", [
    (["--ctx", "10"], "--ctx must be at least 64"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--gpu-layers", "-2"], "--gpu-layers"),
    (["--batch", "0"], "--batch must be between"),
])
def test_flags_are_checked_by_the_library_in_one_line(monkeypatch, capsys, tiny, prompts, tmp_path, flag, needle):
    calls = []
    monkeypatch.setattr(api, "load_model", lambda *a: calls.append(a))  # must not be reached
    code, out, err = _main(monkeypatch, capsys, FakeRuntimes(), "audit", str(tiny), "--prompts", str(prompts),
                           "--out", str(tmp_path / "f"), *flag)
    assert code == 2 and err.count("\n") == 1 and err.startswith("kvedge: error:") and needle in err, err
    assert not calls


def test_out_that_is_a_file_is_refused_before_work(tiny, prompts, tmp_path):
    from kvedge.errors import KvedgeError

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(KvedgeError, match="is a file"):
        _audit(tiny, prompts, f, FakeRuntimes())


def test_a_vocabulary_without_the_opening_tokens_gives_no_margin_and_a_verdict_from_flips(tiny, prompts, tmp_path,
                                                                                           monkeypatch):
    """No margin can be read (the model's vocabulary has no token for either side's openings): the report
    says so, and each configuration still gets a verdict, from its flips alone, never a crash."""
    from support.fakes import FakeRuntime

    monkeypatch.setattr(FakeRuntime, "tokenize_piece", lambda self, text, special=False: [])
    res = _audit(tiny, prompts, tmp_path / "a", FakeRuntimes(loses_kill_at_q4_norot))
    rep = res.report
    assert all(r.margin is None for r in rep.runs) and all(p.margin is None for p in rep.prompts)
    # flips alone cannot show equivalence: every configuration is inconclusive or shown to move
    assert all(r.verdict.verdict != "equivalent" for r in rep.quantized)
    quiet = [r for r in rep.quantized if r.verdict.verdict == "inconclusive"]
    assert quiet and all("no margin" in r.verdict.line for r in quiet)
    table = res.md_path.read_text()
    assert "not available" in table
