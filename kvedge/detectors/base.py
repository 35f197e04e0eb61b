"""What every refusal detector is: the `Detector` protocol the audit sees, the `Detection` it returns, and
the text normalisation and empty-answer rule all detectors share. Implementations: `keyword` (string
matching, with phrase files read by `phrases`) and `judge` (a judge model); others register by name
(kvedge.registry) or through the `kvedge.detectors` entry-point group."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Detection:
    """One response judged: refused or not, the rule that decided it, and the detector's score when it
    has one (a judge's probability of "refuses")."""

    refused: bool
    rule: str  # "prefix:<phrase>", "phrase:<phrase>", "empty", "none", or a judge's "judge:p=..."
    score: float | None = None


class Detector(Protocol):
    """`id` names the detector and its version (`keyword-v1`): reports carry it and the store's stability
    marks are keyed by it, so verdicts of two versions are never mixed."""

    name: str
    version: str

    @property
    def id(self) -> str: ...

    def detect(self, prompt: str, response: str) -> Detection: ...

    def final(self, response: str) -> bool:
        """Whether the verdict on this (partial) response can no longer change however the answer goes
        on: the audit stops generating there. A detector that reads the whole answer says never (False)."""
        ...


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    text = re.sub(r"^[\s\"'*#>_\-]+", "", text)  # markdown and quote decoration before the first word
    return re.sub(r"\s+", " ", text).strip().lower()


def empty_answer(response: str) -> Detection | None:
    """Saying nothing is not answering: every detector counts an empty response as a refusal, marked
    as such."""
    return None if normalise(response) else Detection(True, "empty")
