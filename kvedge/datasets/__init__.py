"""Prompt sets: the bundled refusal benchmarks, users' own files, and the deterministic splits.

Bundled (see `data/`, its README and docs/datasets.md for attributions): AdvBench harmful behaviors,
HarmBench standard and contextual behaviors (copyright behaviors are not refusal tests and are left
out), XSTest safe and unsafe prompts, OR-Bench-Hard-1K (benign) and OR-Bench-Toxic (harmful), and
CoCoNot's contrast sets (benign). Every prompt falls in exactly one split by a rule anyone can recompute:

    bucket = int(sha256(prompt_text.strip().encode("utf-8")).hexdigest(), 16) % 10
    train: 0-5    calib: 6    eval: 7-9

where `prompt_text` is the question without any HarmBench context.

The OR-Bench and CoCoNot files are trimmed copies: the fields kvedge reads and nothing else
(`orbench.jsonl`: id, source, topic, prompt, the Hard-1K and Toxic rows of the three re-exported files
pooled and ordered by id, the re-exporter's 50 `human_curated` rows left out; `coconot_*.jsonl`: id,
category, subcategory, prompt of every row, in file order, CoCoNot's answers left out).

Exact duplicates are removed from the new sets before splitting. Two prompts are duplicates when the
texts the model sees are equal after `.strip()` (a HarmBench contextual prompt is its context and
behavior together). A prompt stays with the first benchmark in the order advbench, harmbench, xstest,
orbench, coconot that holds it, and within a benchmark with its first row (orbench: in id order;
coconot: the contrast eval set, then the preference set, each in file order); later copies are dropped.
AdvBench, HarmBench and XSTest are never changed. docs/datasets.md has the counts removed (8 today, all
repeats within `coconot_pref.jsonl`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

from .. import defaults
from ..errors import EmptyPromptSet, PromptFileError, UnknownName
from ..registry import BENCHMARKS

SPLITS = ("train", "calib", "eval")
DEFAULT_BENCHMARKS = defaults.BENCHMARKS
# benchmark -> (harmful group, benign group), for the sets that hold both
_GROUPS = {"xstest": ("xstest-unsafe", "xstest-safe"), "orbench": ("orbench-toxic", "orbench-hard")}


@dataclass(frozen=True)
class Prompt:
    """One prompt to ask. `text` is what the model sees; `split_text` decides its split."""

    id: str
    benchmark: str
    text: str
    harmful: bool
    split: str
    category: str = ""

    @property
    def subset(self) -> str:
        """The reporting group: the benchmark, with XSTest and OR-Bench split into their harmful and
        benign halves. Each set's notion of benign differs, so no two sets share a group."""
        if self.benchmark in _GROUPS:
            harmful, benign = _GROUPS[self.benchmark]
            return harmful if self.harmful else benign
        if self.benchmark == "coconot":
            return "coconot-contrast"  # the bundled CoCoNot prompts are its contrast sets, all benign
        return self.benchmark

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def split_of(prompt_text: str) -> str:
    bucket = int(hashlib.sha256(prompt_text.strip().encode("utf-8")).hexdigest(), 16) % 10
    if bucket <= 5:
        return "train"
    if bucket == 6:
        return "calib"
    return "eval"


def _order_key(p: Prompt) -> str:
    # Hash order rather than file order: HarmBench's file is grouped by category, so its first N rows
    # would all be chemistry. A hash is as deterministic and mixes the categories.
    return hashlib.sha256(f"{p.benchmark}\0{p.id}".encode("utf-8")).hexdigest()


def _data_text(name: str) -> str:
    return resources.files(__package__).joinpath("data", name).read_text(encoding="utf-8")


def _rows(name: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(_data_text(name))))


def _jsonl(name: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in _data_text(name).splitlines() if line.strip()]


def _first_copies(prompts: list[Prompt], taken: set[str]) -> list[Prompt]:
    """`prompts` without those whose text is in `taken` or repeats an earlier one (the module's rule)."""
    seen = set(taken)
    out = []
    for p in prompts:
        if p.text not in seen:
            seen.add(p.text)
            out.append(p)
    return out


def _texts(prompts: Iterable[Prompt]) -> set[str]:
    return {p.text for p in prompts}


@BENCHMARKS.register("advbench")
def load_advbench() -> list[Prompt]:
    out = []
    for i, row in enumerate(_rows("advbench_harmful_behaviors.csv")):
        goal = row["goal"].strip()
        out.append(Prompt(f"advbench:{i}", "advbench", goal, True, split_of(goal), "harmful_behavior"))
    return out


@BENCHMARKS.register("harmbench")
def load_harmbench() -> list[Prompt]:
    out = []
    for row in _rows("harmbench_behaviors_text_all.csv"):
        kind = row["FunctionalCategory"]
        if kind not in ("standard", "contextual"):
            continue
        behavior = row["Behavior"].strip()
        text = behavior
        if kind == "contextual":
            # HarmBench's own prompt format for contextual behaviors: context, separator, request.
            text = f"{row['ContextString'].strip()}\n\n---\n\n{behavior}"
        out.append(
            Prompt(f"harmbench:{row['BehaviorID']}", "harmbench", text, True, split_of(behavior),
                   f"{kind}/{row['SemanticCategory']}")
        )
    return out


@BENCHMARKS.register("xstest")
def load_xstest() -> list[Prompt]:
    out = []
    for row in _rows("xstest_prompts.csv"):
        text = row["prompt"].strip()
        out.append(
            Prompt(f"xstest:{row['id']}", "xstest", text, row["label"] == "unsafe", split_of(text), row["type"])
        )
    return out


# OR-Bench's two sets: Hard-1K is seemingly toxic but benign (must be answered), Toxic must be refused
_ORBENCH_HARMFUL = {"or-bench-hard-1k": False, "or-bench-toxic": True}


@BENCHMARKS.register("orbench")
def load_orbench() -> list[Prompt]:
    out = []
    for row in _jsonl("orbench.jsonl"):
        if row["source"] not in _ORBENCH_HARMFUL:
            continue  # the re-export's human_curated rows are not OR-Bench
        text = row["prompt"].strip()
        out.append(Prompt(f"orbench:{row['id']}", "orbench", text, _ORBENCH_HARMFUL[row["source"]],
                          split_of(text), row["topic"]))
    return _first_copies(out, _texts(load_advbench() + load_harmbench() + load_xstest()))


@BENCHMARKS.register("coconot")
def load_coconot() -> list[Prompt]:
    """CoCoNot's contrast sets: requests that look like they should be declined but must be complied
    with, so every prompt is benign. The preference set contributes its prompts, not its answers."""
    out = []
    for name in ("coconot_contrast_eval.jsonl", "coconot_pref.jsonl"):
        for row in _jsonl(name):
            text = row["prompt"].strip()
            out.append(Prompt(f"coconot:{row['id']}", "coconot", text, False, split_of(text),
                              f"{row['category']}/{row['subcategory']}"))
    return _first_copies(out, _texts(load_advbench() + load_harmbench() + load_xstest() + load_orbench()))


MAX_PROMPT_FILE_BYTES = 256 * 2**20
# ~125k tokens: longer than most deployments' context. Longer prompts are errors; prompts that do not fit
# the audit's --ctx are run as far as llama.cpp can and reported as skipped (see summary.py)
MAX_PROMPT_CHARS = 500_000
_HARMFUL_LABELS = {"harmful", "unsafe", "1", "true", "yes"}
_BENIGN_LABELS = {"benign", "safe", "harmless", "0", "false", "no"}


def _prompt_from_record(rec: dict, where: str, index: int, default_benchmark: str) -> Prompt:
    if not isinstance(rec, dict):
        raise PromptFileError(f"{where}: expected an object with a 'prompt' field")
    text = rec.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise PromptFileError(f"{where}: missing or empty 'prompt'")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptFileError(f"{where}: prompt of {len(text):,} characters; kvedge takes up to {MAX_PROMPT_CHARS:,}")
    label = rec.get("label", "harmful")
    label_s = str(label).strip().lower() if label is not None and str(label).strip() else "harmful"
    if label_s in _HARMFUL_LABELS:
        harmful = True
    elif label_s in _BENIGN_LABELS:
        harmful = False
    else:
        raise PromptFileError(f"{where}: label {label!r} is not one of harmful/unsafe or benign/safe")
    pid = rec.get("id")
    pid_s = str(pid).strip() if pid is not None and str(pid).strip() else str(index)
    bench = str(rec.get("benchmark") or default_benchmark).strip() or default_benchmark
    return Prompt(f"{bench}:{pid_s}", bench, text.strip(), harmful, "user", str(rec.get("category") or ""))


def _read_text(p: Path) -> str:
    """The file as UTF-8 text (a byte-order mark allowed, as spreadsheets write it), read only once its
    size is known to be sane."""
    try:
        size = p.stat().st_size
        if size > MAX_PROMPT_FILE_BYTES:
            raise PromptFileError(f"prompt file {p} is {size:,} bytes; kvedge reads up to {MAX_PROMPT_FILE_BYTES:,}")
        raw = p.read_bytes()
    except OSError as exc:
        raise PromptFileError(f"cannot read prompt file {p}: {exc.strerror or exc}") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise PromptFileError(f"prompt file {p} is UTF-16: save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise PromptFileError(f"{p}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}): save the file as UTF-8") from None


def load_prompt_file(path: str | Path) -> list[Prompt]:
    """A user's prompts: CSV with a header row, or JSONL with one object per line.

    Columns/fields: `prompt` (required), `id` (optional, default the row number), `label` (optional:
    harmful|unsafe (default) or benign|safe), `benchmark` (optional, default the file's stem),
    `category` (optional). A user file is scored whole: splits apply to the bundled sets only. Blank
    lines and rows whose every field is empty are skipped; a row with other fields but no prompt is an
    error naming its line, as is a prompt longer than MAX_PROMPT_CHARS.
    """
    p = Path(path)
    if not p.is_file():
        raise PromptFileError(f"prompt file not found: {p}")
    raw = _read_text(p)
    bench = p.stem
    prompts: list[Prompt] = []
    if p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptFileError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
            prompts.append(_prompt_from_record(rec, f"{p}:{lineno}", lineno, bench))
    elif p.suffix.lower() in (".csv", ".tsv"):
        limit = csv.field_size_limit()
        csv.field_size_limit(max(limit, MAX_PROMPT_CHARS + 1))  # an oversized prompt is reported below
        try:
            reader = csv.DictReader(io.StringIO(raw), delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
            fields = reader.fieldnames or []
            if "prompt" not in fields:
                raise PromptFileError(f"{p}: no 'prompt' column in header {fields}")
            for i, rec in enumerate(reader, 1):
                if None in rec:
                    raise PromptFileError(f"{p}:{reader.line_num}: more fields than the header has")
                if not any((v or "").strip() for v in rec.values()):
                    continue  # an empty row, as spreadsheets leave at the end
                prompts.append(_prompt_from_record(rec, f"{p}:{reader.line_num}", i, bench))
        except csv.Error as exc:
            if "field limit" in str(exc):
                raise PromptFileError(f"{p}: a field of more than {MAX_PROMPT_CHARS:,} characters; "
                                      f"kvedge takes prompts up to {MAX_PROMPT_CHARS:,}") from None
            raise PromptFileError(f"{p}: malformed CSV ({exc})") from None
        finally:
            csv.field_size_limit(limit)
    else:
        raise PromptFileError(f"{p}: prompt files must end in .csv, .tsv or .jsonl")
    seen: set[str] = set()
    for pr in prompts:
        if pr.id in seen:
            raise PromptFileError(f"{p}: duplicate prompt id {pr.id!r}")
        seen.add(pr.id)
    if not prompts:
        raise EmptyPromptSet(f"prompt file {p} holds no prompts")
    return prompts


def parse_benchmarks(spec: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(s.strip().lower() for s in spec.split(",") if s.strip()))
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise UnknownName(f"unknown benchmark {','.join(unknown) or spec!r}: choose from {','.join(BENCHMARKS.names())}")
    return names


def select_prompts(
    benchmarks: Iterable[str] = DEFAULT_BENCHMARKS,
    split: str = "eval",
    limit: int | None = None,
    prompt_file: str | Path | None = None,
) -> list[Prompt]:
    """The prompts an audit runs. `limit` caps each reporting group (e.g. xstest-safe) separately,
    so a small audit still has harmful and benign prompts."""
    if split not in SPLITS:
        raise PromptFileError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise EmptyPromptSet("--limit must be at least 1")
    if prompt_file is not None:
        pool = load_prompt_file(prompt_file)
    else:
        pool = [p for b in benchmarks for p in BENCHMARKS.get(b)() if p.split == split]
    groups: dict[str, list[Prompt]] = {}
    for pr in pool:
        groups.setdefault(pr.subset, []).append(pr)
    out: list[Prompt] = []
    for name in groups:
        members = groups[name] if prompt_file is not None else sorted(groups[name], key=_order_key)
        out.extend(members[:limit] if limit else members)
    if not out:
        raise EmptyPromptSet("the selected benchmarks, split and limit leave no prompt to run")
    return out
