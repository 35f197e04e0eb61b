"""End to end: the real `kvedge` CLI, real llama.cpp, the real default model, a few prompts."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time

import pytest

from support.cli import Barrier, run_cli, start_with_barrier
from kvedge.audit.noise import flips, judge
from kvedge.stats import mcnemar_exact


def _rate_ok(r):
    assert 0 <= r["k"] <= r["n"]
    if r["n"]:
        assert r["lo"] <= r["rate"] <= r["hi"] and r["rate"] == pytest.approx(r["k"] / r["n"])


def test_report_structure_and_invariants(small_audit):
    rep = small_audit["report"]
    assert rep["schema"] == "kvedge.audit/1"
    labels = [r["label"] for r in rep["runs"]]
    assert labels == ["f16", "f16 noise (flash-attn-off)", "q4_0 rot=on", "q4_0 rot=off"]
    assert rep["prompts_summary"]["n"] == 8 and rep["prompts_summary"]["harmful"] == 6
    # --gpu-layers defaults to 0: the CPU on any build, not a fact of this machine
    assert rep["backend"]["kind"] == "cpu" and rep["backend"]["system_info"]
    # no model argument: the default model with the canary adapter, which really refuses
    assert rep["adapter"]["path"].endswith("smollm2-canary-lora.gguf") and len(rep["adapter"]["sha256"]) == 64
    ref = rep["runs"][0]
    assert ref["refusal_harmful"]["k"] >= 3
    assert ref["reference"] and ref["kld"]["value"] == 0 and ref["ppl_ratio"]["value"] == pytest.approx(1.0)
    for r in rep["runs"]:
        _rate_ok(r["refusal_harmful"])
        _rate_ok(r["over_refusal_benign"])
        assert r["refusal_harmful"]["n"] == 6 and r["over_refusal_benign"]["n"] == 2
        assert r["speed"]["generations"] == 8 and r["speed"]["decode_tokens_per_s"] > 0
        if not r["reference"]:
            h = r["vs_reference"]["harmful"]
            refused = {p["id"]: p["refused"] for p in rep["prompts"]}
            harmful = [p["id"] for p in rep["prompts"] if p["harmful"]]
            lost = sum(refused[i]["f16"] and not refused[i][r["label"]] for i in harmful)
            gained = sum(refused[i][r["label"]] and not refused[i]["f16"] for i in harmful)
            assert (h["lost"], h["gained"]) == (lost, gained)
            assert h["mcnemar_p"] == mcnemar_exact(lost, gained)
            assert sorted(pid for pid, v in refused.items() if v["f16"] != v[r["label"]]) == r["vs_reference"]["flipped"]
    q_on, q_off = rep["runs"][2], rep["runs"][3]
    assert q_on["memory"]["vs_f16"] == pytest.approx(18 / 64)
    assert q_on["memory"]["bytes_per_token"] == 23040 * 18 // 64
    # rotation really toggles: without it q4_0 damages the distribution more (PCR.md section 1)
    assert q_off["kld"]["value"] > q_on["kld"]["value"] > 0
    # each judgement is kvedge.audit.noise.judge on the report's own verdicts
    noise_label = rep["noise_floor"]["label"]
    for q in (q_on, q_off):
        for group, is_harmful in (("harmful", True), ("benign", False)):
            ps = [p for p in rep["prompts"] if p["harmful"] is is_harmful]
            ref_v = [p["refused"]["f16"] for p in ps]
            expect = judge(flips(ref_v, [p["refused"][q["label"]] for p in ps]),
                           flips(ref_v, [p["refused"][noise_label] for p in ps]))
            assert q["vs_noise"][group] == expect.to_dict()
    nf = rep["noise_floor"]
    assert nf["arithmetic_changed"] and nf["max_abs_logprob_diff"] > 0 and nf["kld"]["value"] > 0
    _rate_ok(nf["flip_rate"])
    with sqlite3.connect(small_audit["out"] / "kvedge.sqlite") as c:
        marks = dict(c.execute("SELECT prompt_id, stable FROM stability").fetchall())
    assert sorted(k for k, v in marks.items() if not v) == nf["unstable_prompts"] and len(marks) == 8
    attempts = (small_audit["out"] / "attempts.jsonl").read_text().splitlines()
    assert len(attempts) == 4 * 8 and (small_audit["out"] / "report.html").is_file()
    # every answer read through llama.cpp carries its first-token margin, as report.json's prompts do
    margins = {(a["config"], a["prompt_id"]): a["margin"] for a in map(json.loads, attempts)}
    assert all(isinstance(m, float) for m in margins.values())
    assert margins == {(c, p["id"]): m for p in rep["prompts"] for c, m in p["margin"].items()}
    md = (small_audit["out"] / "report.md").read_text()
    assert "## Noise floor" in md and "| q4_0 rot=off |" in md
    assert "refusal (harmful)" in small_audit["proc"].stdout


def test_rerun_generates_nothing_and_reports_the_same(small_audit):
    out = small_audit["out"]
    before = (out / "report.json").read_bytes()
    proc = run_cli("audit", "--kv", "f16,q4_0", "--rotation", "both", "--benchmarks", "advbench,harmbench,xstest", "--limit", "2", "--max-tokens", "24",
                   "--ctx", "2048", "--out", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    assert "0 generations run now" in proc.stdout
    assert (out / "report.json").read_bytes() == before


def _rows(db):
    try:
        with sqlite3.connect(db) as c:
            return c.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_killed_audit_resumes(tmp_path, tmp_path_factory):
    args = ["audit", "--kv", "f16", "--benchmarks", "advbench,harmbench,xstest", "--limit", "2", "--max-tokens", "24", "--ctx", "2048", "--out", str(tmp_path), "-q"]
    # it waits at a barrier once the store holds 4 rows (tests/support/barrier.py), so it is still running
    # when killed however fast the machine
    barrier = Barrier("rows=4", tmp_path_factory.mktemp("barrier"))
    proc = start_with_barrier(barrier, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db = tmp_path / "kvedge.sqlite"
    while _rows(db) < 3 and not barrier.reached:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = _rows(db)
    assert 3 <= kept < 16
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert f"{16 - kept} generations run now" in done.stdout
    rep = json.loads((tmp_path / "report.json").read_text())
    assert all(r["speed"]["generations"] == 8 for r in rep["runs"])


def test_gate_on_a_real_audit(small_audit):
    """--fail-under 1 fails exactly when some quantized config lost a refusal the reference made."""
    rets = {r["label"]: r["vs_reference"]["retention"]["value"] for r in small_audit["report"]["runs"]
            if not r["reference"] and not r["noise_run"]}
    failing = sorted(k for k, v in rets.items() if v is not None and v < 1)
    proc = run_cli("audit", "--kv", "f16,q4_0", "--rotation", "both", "--benchmarks", "advbench,harmbench,xstest", "--limit", "2", "--max-tokens", "24",
                   "--ctx", "2048", "--out", str(small_audit["out"]), "-q", "--fail-under", "1")
    assert proc.returncode == (1 if failing else 0), proc.stderr
    gate = json.loads((small_audit["out"] / "report.json").read_text())["gate"]
    assert gate["threshold"] == 1 and sorted(gate["failing"]) == failing and gate["passed"] is (not failing)


def test_compare_two_real_runs_whose_verdicts_differ(small_audit, tmp_path):
    # the same model and prompts without the canary adapter: a real run whose verdicts differ
    b = tmp_path / "bare"
    proc = run_cli("audit", "--kv", "f16,q4_0", "--rotation", "both", "--benchmarks", "advbench,harmbench,xstest", "--limit", "2", "--max-tokens", "24",
                   "--ctx", "2048", "--out", str(b), "-q", "--no-canary")
    assert proc.returncode == 0, proc.stderr
    cmp = run_cli("compare", str(small_audit["out"]), str(b), "--out", str(tmp_path / "cmp"))
    assert cmp.returncode == 0, cmp.stderr
    res = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert (tmp_path / "cmp" / "compare.html").is_file() and (tmp_path / "cmp" / "compare.md").is_file()
    ra = {p["id"]: p["refused"] for p in small_audit["report"]["prompts"]}
    rb = {p["id"]: p["refused"] for p in json.loads((b / "report.json").read_text())["prompts"]}
    assert res["common_prompts"] == 8
    total_disagree = 0
    for row in res["rows"]:
        ids = [p["id"] for p in small_audit["report"]["prompts"]
               if row["prompts"] == "all" or p["harmful"] is (row["prompts"] == "harmful")]
        only_a = sum(ra[i][row["config"]] and not rb[i][row["config"]] for i in ids)
        only_b = sum(rb[i][row["config"]] and not ra[i][row["config"]] for i in ids)
        assert (row["refused_only_in_a"], row["refused_only_in_b"]) == (only_a, only_b)
        assert row["agreement"]["k"] == row["n"] - only_a - only_b
        j = row["vs_noise_of_a"]
        assert (j["lost"], j["gained"]) == (only_a, only_b)
        total_disagree += only_a + only_b if row["prompts"] != "all" else 0
    assert total_disagree > 0, "the bare model should refuse less than base + canary"
    assert "agreement" in cmp.stdout


def _bad(tmp_path, *args):
    proc = run_cli(*args, timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvedge: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_bad_inputs_exit_2_with_one_line(tmp_path, model_path):
    trunc = tmp_path / "cut.gguf"
    trunc.write_bytes(model_path.read_bytes()[: 40_000_000])
    notgguf = tmp_path / "fake.gguf"
    notgguf.write_text("hello")
    bad_csv = tmp_path / "p.csv"
    bad_csv.write_text("question\nhow?\n")
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    out = str(tmp_path / "o")
    assert "not found" in _bad(tmp_path, "audit", str(tmp_path / "missing.gguf"), "--out", out)
    assert "truncated" in _bad(tmp_path, "audit", str(trunc), "--out", out)
    assert "not a GGUF" in _bad(tmp_path, "audit", str(notgguf), "--out", out)
    assert "unknown KV cache type" in _bad(tmp_path, "audit", "--kv", "f16,q3_k", "--out", out)
    assert "no 'prompt' column" in _bad(tmp_path, "audit", "--prompts", str(bad_csv), "--out", out)
    assert "no prompts" in _bad(tmp_path, "audit", "--prompts", str(empty), "--out", out)
    assert "unknown split" in _bad(tmp_path, "audit", "--split", "test", "--out", out)
    assert "not a LoRA adapter" in _bad(tmp_path, "audit", "--lora", str(model_path), "--out", out)
    assert "no audit report" in _bad(tmp_path, "compare", str(tmp_path / "x"), str(tmp_path / "y"))


def test_the_first_token_margin_through_llama_cpp_and_the_verdicts(small_audit):
    """Every prompt of every run carries the margin read from the logits that chose its first token; it
    measures the verdict's preference (refusals open with a refusal token, answers do not), each quantized
    run's shift is the mean of the paired per-prompt differences, and its verdict is the one function's."""
    from kvedge.audit.verdict import VERDICTS

    rep = small_audit["report"]
    labels = [r["label"] for r in rep["runs"]]
    margins = {(p["id"], lab): p["margin"][lab] for p in rep["prompts"] for lab in labels}
    assert all(isinstance(m, float) and abs(m) < 100 for m in margins.values())
    f16 = [(p["margin"]["f16"], p["refused"]["f16"]) for p in rep["prompts"]]
    refused = [m for m, r in f16 if r]
    answered = [m for m, r in f16 if not r]
    assert refused and answered  # the canary refuses the harmful prompts and answers benign ones
    assert sum(refused) / len(refused) > sum(answered) / len(answered)
    for r in rep["runs"][1:]:
        m = r["margin"]
        for group, harmful in (("harmful", True), ("benign", False)):
            diffs = [p["margin"][r["label"]] - p["margin"]["f16"] for p in rep["prompts"] if p["harmful"] is harmful]
            assert m[f"shift_{group}"]["value"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-3)
        if not r["noise_run"]:
            v = r["verdict"]
            assert v["verdict"] in VERDICTS and v["line"].startswith(r["label"] + ": ")
            assert v["delta"] == rep["equivalence"]["delta"] >= 0.2
    assert rep["equivalence"]["noise_shift_bound"] is not None
    md = (small_audit["out"] / "report.md").read_text()
    assert md.index("## Answer") < md.index("| config |") and "margin shift benign" in md


def test_every_run_reports_the_rotation_llama_cpp_applied(small_audit, tmp_path):
    """Read from llama.cpp's own log when it made each run's context: q4_0 rotates both sides when asked
    (the default model's head size, 64, qualifies), not when turned off; f16 never. A store whose runs were
    recorded before kvedge kept this gets it on the next audit without generating anything."""
    runs = {r["label"]: r for r in small_audit["report"]["runs"]}
    for label, r in runs.items():
        a = r["applied_rotation"]
        assert a["source"] == "llama.cpp log"
        want = r["rotation"] is True
        assert (a["k"], a["v"]) == (want, want), label
        assert "rotation_note" not in r
    md = (small_audit["out"] / "report.md").read_text()
    assert "asked on; applied by llama.cpp: K on, V on" in md and "asked off; applied by llama.cpp: K off, V off" in md
    assert "Attention rotation" in (small_audit["out"] / "report.html").read_text()

    copy = tmp_path / "old"
    copy.mkdir()
    with sqlite3.connect(small_audit["out"] / "kvedge.sqlite") as src, sqlite3.connect(copy / "kvedge.sqlite") as dst:
        src.backup(dst)
    with sqlite3.connect(copy / "kvedge.sqlite") as c:
        c.execute("DELETE FROM applied")
    proc = run_cli("audit", "--kv", "f16,q4_0", "--rotation", "both", "--benchmarks", "advbench,harmbench,xstest",
                   "--limit", "2", "--max-tokens", "24", "--ctx", "2048", "--out", str(copy), "-q")
    assert proc.returncode == 0, proc.stderr
    assert "0 generations run now" in proc.stdout
    again = {r["label"]: r["applied_rotation"] for r in json.loads((copy / "report.json").read_text())["runs"]}
    assert again == {label: r["applied_rotation"] for label, r in runs.items()}
