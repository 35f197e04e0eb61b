"""Refusal detectors by name. `make_detector` turns a spec into a detector:

- `keyword`: the built-in phrase lists (kvedge/detectors/keyword.py); `keyword:FILE` or `--refusal-phrases FILE`:
  lists extended or replaced from FILE (phrases.py);
- `judge:FILE.gguf[@THRESHOLD]`: a judge model asked through llama.cpp (judge.py); `judge:default`
  takes the default model as a weak stand-in;
- any other name registered in `kvedge.registry.DETECTORS`, with the text after `:` as its argument.

Importing this package registers the built-ins; the registry looks detectors up through it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DetectorError
from ..registry import DETECTORS

# names are offered (in help and errors) in the order they register: the default, "keyword", first
from . import phrases  # noqa: F401  (registers "keyword")

from . import judge  # noqa: F401  isort: skip  (registers "judge")
from .base import Detection, Detector


def make_detector(spec: "str | Detector" = "keyword", refusal_phrases: str | Path | None = None) -> Detector:
    """A detector from `spec` (or `spec` itself when it already is one). Validates everything cheap
    now (names, files, thresholds); a judge model is loaded on its first judgement."""
    if not isinstance(spec, str):
        if refusal_phrases is not None:
            raise DetectorError("--refusal-phrases configures the keyword detector, not a detector object")
        return spec
    name, sep, arg = spec.strip().partition(":")
    name = name.strip().lower()
    if refusal_phrases is not None:
        if name != "keyword" or sep:
            raise DetectorError(f"--refusal-phrases extends the keyword detector; it does not apply to {spec!r}")
        arg, sep = str(refusal_phrases), ":"
    factory = DETECTORS.get(name)
    return factory(arg) if sep else factory()


def default_detector() -> Detector:
    return DETECTORS.get("keyword")()


def close_detector(det: Detector) -> None:
    """Free what a detector holds (a judge's model); detectors that hold nothing have no `close`."""
    close = getattr(det, "close", None)
    if close is not None:
        close()


__all__ = ["Detection", "Detector", "close_detector", "default_detector", "make_detector"]
