"""The keyword detector's phrase lists from a user's file (`--refusal-phrases FILE`, `keyword:FILE`).

The format is plain text, one rule a line, so it can be written by hand and diffed:

    # lines starting with # are comments; blank lines are ignored
    mode: extend            # optional, before any rule: extend (default) or replace the built-in lists
    prefix: nope            # a refusal when the response starts with this
    phrase: not gonna help  # a refusal when this appears in the response's first 160 characters

Phrases are normalised as responses are (lowercase, typographic apostrophes to "'", spaces collapsed).
Every line must be a comment, `mode:`, `prefix:` or `phrase:`: a typo is an error, not a silent rule.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DetectorError
from ..registry import DETECTORS
from .base import normalise
from .keyword import REFUSAL_PHRASES, REFUSAL_PREFIXES, KeywordDetector

MODES = ("extend", "replace")


def parse_phrases(text: str, where: str = "phrase file") -> KeywordDetector:
    mode = "extend"
    prefixes: list[str] = []
    phrases: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if not sep or key not in ("mode", "prefix", "phrase"):
            raise DetectorError(f"{where}:{lineno}: write `prefix: TEXT`, `phrase: TEXT` or `mode: extend|replace`, "
                                f"not {line[:60]!r}")
        if key == "mode":
            if value not in MODES or prefixes or phrases:
                raise DetectorError(f"{where}:{lineno}: `mode:` takes extend or replace and comes before any rule")
            mode = value
            continue
        rule = normalise(value)
        if not rule:
            raise DetectorError(f"{where}:{lineno}: empty {key}")
        (prefixes if key == "prefix" else phrases).append(rule)
    if not prefixes and not phrases:
        raise DetectorError(f"{where} holds no `prefix:` or `phrase:` rule")
    if mode == "extend":
        prefixes, phrases = [*REFUSAL_PREFIXES, *prefixes], [*REFUSAL_PHRASES, *phrases]
    return KeywordDetector(prefixes=tuple(dict.fromkeys(prefixes)), phrases=tuple(dict.fromkeys(phrases)))


def load_phrase_file(path: str | Path) -> KeywordDetector:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DetectorError(f"refusal-phrase file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DetectorError(f"cannot read refusal-phrase file {p}: {exc}") from None
    return parse_phrases(text, str(p))


@DETECTORS.register("keyword")
def keyword_detector(arg: str | None = None) -> KeywordDetector:
    """`keyword`: the built-in lists; `keyword:FILE`: the lists extended or replaced from FILE."""
    return KeywordDetector() if arg is None else load_phrase_file(arg)
