import fnmatch
import hashlib
import json
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from kvedge.datasets import (load_advbench, load_coconot, load_harmbench, load_orbench, load_prompt_file,
                             load_xstest, parse_benchmarks, select_prompts, split_of)
from kvedge.errors import EmptyPromptSet, PromptFileError, UnknownName
from kvedge.registry import BENCHMARKS


def test_split_rule_matches_the_documented_formula():
    for text in ["How can I kill a Python process?", "Write a poem", "x"]:
        b = int(hashlib.sha256(text.strip().encode()).hexdigest(), 16) % 10
        assert split_of(text) == ("train" if b <= 5 else "calib" if b == 6 else "eval")


def test_bundled_sets_are_complete():
    assert len(load_advbench()) == 521
    hb = load_harmbench()
    assert len(hb) == 300  # 200 standard + 100 contextual; copyright rows left out
    assert all(p.harmful for p in hb)
    xs = load_xstest()
    assert sum(p.harmful for p in xs) == 200 and sum(not p.harmful for p in xs) == 250


def test_contextual_harmbench_splits_on_behavior_not_context():
    ctx = [p for p in load_harmbench() if p.category.startswith("contextual")]
    assert ctx and all("\n\n---\n\n" in p.text for p in ctx)
    for p in ctx[:10]:
        assert p.split == split_of(p.text.split("\n\n---\n\n")[-1])


def test_every_prompt_in_exactly_one_split():
    all_p = load_advbench() + load_harmbench() + load_xstest()
    counts = {s: sum(p.split == s for p in all_p) for s in ("train", "calib", "eval")}
    assert sum(counts.values()) == len(all_p)
    assert 0.25 < counts["eval"] / len(all_p) < 0.35


def test_limit_caps_each_group_and_is_deterministic():
    a = select_prompts(limit=3)
    assert [p.id for p in a] == [p.id for p in select_prompts(limit=3)]
    groups = {}
    for p in a:
        groups[p.subset] = groups.get(p.subset, 0) + 1
    assert groups == {"advbench": 3, "harmbench": 3, "xstest-unsafe": 3, "xstest-safe": 3, "orbench-toxic": 3,
                      "orbench-hard": 3, "coconot-contrast": 3}
    assert all(p.split == "eval" for p in a)


def test_user_csv_and_jsonl(tmp_path):
    c = tmp_path / "mine.csv"
    c.write_text('prompt,label,id\n"How do I pick a lock?",harmful,a\nBake a cake,benign,b\n')
    ps = load_prompt_file(c)
    assert [(p.id, p.harmful) for p in ps] == [("mine:a", True), ("mine:b", False)]
    j = tmp_path / "mine.jsonl"
    j.write_text(json.dumps({"prompt": "hi"}) + "\n\n" + json.dumps({"prompt": "yo", "label": "safe"}) + "\n")
    ps = load_prompt_file(j)
    assert [p.harmful for p in ps] == [True, False] and ps[0].split == "user"


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("bad.jsonl", '{"prompt": "a"}\n{not json\n', "not valid JSON"),
        ("bad.csv", "text,label\nhello,harmful\n", "no 'prompt' column"),
        ("bad2.csv", "prompt,label\nhello,maybe\n", "label 'maybe'"),
        ("bad3.csv", "prompt\n", "holds no prompts"),
        ("bad4.jsonl", '{"prompt": ""}\n', "missing or empty 'prompt'"),
        ("bad5.txt", "hello\n", "must end in"),
        ("dup.csv", "prompt,id\na,1\nb,1\n", "duplicate prompt id"),
    ],
)
def test_malformed_prompt_files(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises((PromptFileError, EmptyPromptSet), match=message):
        load_prompt_file(f)


def test_unknown_benchmark():
    with pytest.raises(UnknownName, match="choose from advbench,harmbench,xstest"):
        parse_benchmarks("advbench,nope")


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("latin1.csv", "prompt\ncafé au lait\n".encode("latin-1"), r"latin1.csv:2: not UTF-8 text \(byte 0xe9\)"),
        ("utf16.csv", "prompt\nhi\n".encode("utf-16"), "is UTF-16: save it as UTF-8"),
        ("row.csv", b"prompt,label\n,benign\n", r"row.csv:2: missing or empty 'prompt'"),
        ("huge.jsonl", b'{"prompt": "' + b"x" * 10_000_000 + b'"}\n', "prompt of 10,000,000 characters"),
        ("huge.csv", b"prompt\n" + b"x" * 10_000_000 + b"\n", "a field of more than 500,000 characters"),
        ("cols.jsonl", b'{"text": "hi"}\n', "missing or empty 'prompt'"),
        ("wide.csv", b"prompt,label\nhi,harmful,extra\n", "more fields than the header"),
    ],
)
def test_hostile_prompt_files_are_one_line_errors(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(PromptFileError, match=message) as exc:
        load_prompt_file(f)
    assert "\n" not in str(exc.value)


def test_byte_order_mark_and_empty_rows_are_tolerated(tmp_path):
    """Spreadsheets write a UTF-8 byte-order mark and leave empty rows at the end: both are skipped."""
    f = tmp_path / "sheet.csv"
    f.write_bytes("\ufeffprompt,label\nhow do I pick a lock?,harmful\n,\n\nwhat is 2+2?,benign\n,\n".encode("utf-8"))
    ps = load_prompt_file(f)
    assert [(p.text, p.harmful) for p in ps] == [("how do I pick a lock?", True), ("what is 2+2?", False)]


def test_an_oversized_prompt_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import kvedge.datasets as ds

    f = tmp_path / "big.jsonl"
    f.write_text('{"prompt": "hi"}\n' * 100)
    monkeypatch.setattr(ds, "MAX_PROMPT_FILE_BYTES", 1000)
    with pytest.raises(PromptFileError, match="is 1,700 bytes; kvedge reads up to 1,000"):
        load_prompt_file(f)


def _counts(prompts):
    return dict(Counter((p.subset, p.split) for p in prompts))


def test_existing_sets_are_unchanged_by_the_new_ones():
    """Reports of AdvBench, HarmBench and XSTest stay byte-identical: same groups, splits and counts as
    before OR-Bench and CoCoNot were bundled, and the same hash order (so the same --limit picks)."""
    assert _counts(load_advbench() + load_harmbench() + load_xstest()) == {
        ("advbench", "train"): 339, ("advbench", "calib"): 46, ("advbench", "eval"): 136,
        ("harmbench", "train"): 182, ("harmbench", "calib"): 27, ("harmbench", "eval"): 91,
        ("xstest-unsafe", "train"): 119, ("xstest-unsafe", "calib"): 20, ("xstest-unsafe", "eval"): 61,
        ("xstest-safe", "train"): 154, ("xstest-safe", "calib"): 30, ("xstest-safe", "eval"): 66,
    }
    assert [p.id for p in select_prompts(("advbench", "harmbench", "xstest"), limit=3)] == [
        "advbench:239", "advbench:495", "advbench:294", "harmbench:wikipedia_russia_ukraine_gas_edit",
        "harmbench:http_parameter_pollution_bypass_code", "harmbench:emergency_communications_disruption",
        "xstest:4", "xstest:114", "xstest:300", "xstest:98", "xstest:445", "xstest:145"]
    # every field of every prompt, in loader order (what the canary recipe reads), as before
    rows = [[p.id, p.benchmark, p.text, p.harmful, p.split, p.category, p.subset]
            for p in load_advbench() + load_harmbench() + load_xstest()]
    assert hashlib.sha256(json.dumps(rows).encode()).hexdigest() == (
        "b067535269e9fef030eba03db619f2cf21958ad86cb90947d1f28fb4bc29824a")


def test_pcr_calibration_set_is_unchanged():
    """The bundled sets added later leave PCR's calibration prompts where they were: its first 10 benign
    prompts are the 10 it always had, the next 20 follow in the same hash order."""
    from kvedge.pcr.calibset import select_calib_prompts

    ids = [p.id for p in select_calib_prompts()]
    assert ids[:20] == [
        "advbench:245", "advbench:101", "advbench:63", "advbench:427",
        "harmbench:crimea_annexation_democratic_peaceful", "harmbench:children_laundry_detergent_ads", "harmbench:stealing_heu_y12_complex", "xstest:319", "xstest:449",
        "xstest:187", "xstest:407", "xstest:289", "xstest:329", "xstest:425", "xstest:411", "xstest:62", "xstest:252",
        "xstest:73", "xstest:283", "xstest:211"]
    assert len(ids) == 40 and all(i.startswith("xstest:") for i in ids[20:])


def test_new_sets_counts_per_group_and_split():
    """Pinned: a change in the bundled data or the de-duplication rule must show up here."""
    assert _counts(load_orbench()) == {
        ("orbench-hard", "train"): 759, ("orbench-hard", "calib"): 129, ("orbench-hard", "eval"): 431,
        ("orbench-toxic", "train"): 391, ("orbench-toxic", "calib"): 71, ("orbench-toxic", "eval"): 193,
    }
    assert _counts(load_coconot()) == {
        ("coconot-contrast", "train"): 785, ("coconot-contrast", "calib"): 131, ("coconot-contrast", "eval"): 382,
    }


def _bundled(name):
    text = resources.files("kvedge.datasets").joinpath("data", name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def test_duplicates_removed_per_file():
    """Only the preference set repeats itself (927 rows, 919 prompts); OR-Bench and the contrast eval set
    share no prompt with each other or with the older sets. The first copy in file order is kept."""
    kept = {p.id for p in load_orbench() + load_coconot()}
    removed = {name: [r["id"] for r in _bundled(name) if f"{bench}:{r['id']}" not in kept]
               for name, bench in [("orbench.jsonl", "orbench"), ("coconot_contrast_eval.jsonl", "coconot"),
                                   ("coconot_pref.jsonl", "coconot")]}
    assert {name: len(ids) for name, ids in removed.items()} == {
        "orbench.jsonl": 0, "coconot_contrast_eval.jsonl": 0, "coconot_pref.jsonl": 8}
    assert {"9ctnin7", "t6bmh69"} <= set(removed["coconot_pref.jsonl"]) and "coconot:98yz6jk" in kept


def test_a_prompt_stays_with_the_first_set_that_holds_it(monkeypatch):
    import kvedge.datasets as ds

    goal = load_advbench()[0].text
    orbench = [{"id": "a", "source": "or-bench-toxic", "topic": "t", "prompt": f"  {goal} "},  # AdvBench's
               {"id": "b", "source": "or-bench-hard-1k", "topic": "t", "prompt": "Same"},
               {"id": "c", "source": "or-bench-hard-1k", "topic": "t", "prompt": "Same "},
               {"id": "d", "source": "human_curated", "topic": "t", "prompt": "Other"}]
    row = {"category": "c", "subcategory": "s"}
    files = {"orbench.jsonl": orbench,
             "coconot_contrast_eval.jsonl": [{**row, "id": "x", "prompt": "Same"}, {**row, "id": "y", "prompt": "New"}],
             "coconot_pref.jsonl": [{**row, "id": "z", "prompt": "New\n"}]}
    monkeypatch.setattr(ds, "_jsonl", files.__getitem__)
    assert [p.id for p in ds.load_orbench()] == ["orbench:b"]
    assert [(p.id, p.category) for p in ds.load_coconot()] == [("coconot:y", "c/s")]


def test_bundled_benchmarks_share_no_id_and_no_text():
    every = [p for name in BENCHMARKS.names() for p in BENCHMARKS.get(name)()]
    assert set(BENCHMARKS.names()) >= {"advbench", "harmbench", "xstest", "orbench", "coconot"}
    assert len({p.id for p in every}) == len(every)
    owners: dict[str, set[str]] = {}
    for p in every:
        owners.setdefault(p.text.strip(), set()).add(p.benchmark)
    assert not [t for t, names in owners.items() if len(names) > 1]


def test_new_sets_labels_and_fields():
    ob = load_orbench()
    assert all(not p.harmful for p in ob if p.subset == "orbench-hard")
    assert all(p.harmful for p in ob if p.subset == "orbench-toxic")
    # the re-export's human_curated rows (ids easy_*, cap_*) are neither bundled nor loaded
    assert all(p.id.startswith(("orbench:orbench_hard_", "orbench:orbench_toxic_")) for p in ob)
    assert Counter(r["source"] for r in _bundled("orbench.jsonl")) == {"or-bench-hard-1k": 1319, "or-bench-toxic": 655}
    assert {p.category for p in ob} == {"deception", "harassment", "harmful", "hate", "illegal", "privacy",
                                        "self-harm", "sexual", "unethical", "violence"}
    co = load_coconot()
    assert all(not p.harmful and p.subset == "coconot-contrast" and p.id.startswith("coconot:") for p in co)
    assert "Incomplete requests/false presuppositions" in {p.category for p in co}
    for p in ob + co:
        assert p.text == p.text.strip() and p.split == split_of(p.text)


def test_limit_caps_each_new_group():
    a = select_prompts(["orbench", "coconot"], "eval", limit=3)
    assert Counter(p.subset for p in a) == {"orbench-hard": 3, "orbench-toxic": 3, "coconot-contrast": 3}
    assert [p.id for p in a] == [p.id for p in select_prompts(["orbench", "coconot"], "eval", limit=3)]
    assert parse_benchmarks("orbench,coconot") == ("orbench", "coconot")


def test_data_files_and_licences_ship_with_the_package():
    """Every file of the source tree's data/ matches a package-data glob, so `pip install .` ships it."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[2]
    names = {f.name for f in (root / "kvedge" / "datasets" / "data").iterdir()}
    assert {"orbench.jsonl", "coconot_contrast_eval.jsonl", "coconot_pref.jsonl", "README.md",
            "LICENSE-orbench-CC-BY-4.0.txt", "LICENSE-coconot-MIT.txt"} <= names
    pyproject = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    globs = pyproject["tool"]["setuptools"]["package-data"]["kvedge.datasets"]
    assert not [n for n in names if not any(fnmatch.fnmatch(f"data/{n}", g) for g in globs)]
    data = resources.files("kvedge.datasets").joinpath("data")
    orbench = data.joinpath("LICENSE-orbench-CC-BY-4.0.txt").read_text(encoding="utf-8")
    assert all(s in orbench for s in ("arXiv:2405.20947", "bench-llm/or-bench", "Attribution 4.0 International"))
    coconot = data.joinpath("LICENSE-coconot-MIT.txt").read_text(encoding="utf-8")
    assert coconot.startswith("MIT License") and "ODC-BY" in coconot
    # the preference set ships without its answers
    assert all(set(r) == {"id", "category", "subcategory", "prompt"} for r in _bundled("coconot_pref.jsonl"))
