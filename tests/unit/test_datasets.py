import hashlib
import json

import pytest

from kvedge.datasets import (load_advbench, load_harmbench, load_prompt_file, load_xstest, parse_benchmarks,
                             select_prompts, split_of)
from kvedge.errors import EmptyPromptSet, PromptFileError, UnknownName


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
    assert groups == {"advbench": 3, "harmbench": 3, "xstest-unsafe": 3, "xstest-safe": 3}
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
