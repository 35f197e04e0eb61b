"""The detector contract (tests/unit/test_registry.py) for the detectors that need a model: a judge, with
the default model standing in (a weak judge, so only the contract's form is checked here;
tests/unit/test_detect_judge.py and tests/e2e/test_detect_judge.py check what it measures)."""

from __future__ import annotations

import pytest

from kvedge.registry import DETECTORS

# How to build each such detector for the contract: its name with the argument it needs.
SPECS = {"judge": "judge:default"}


@pytest.mark.parametrize("name", [n for n in DETECTORS.names() if n in SPECS])
def test_detectors_keep_the_contract(name):
    from kvedge.detectors import close_detector, make_detector

    det = make_detector(SPECS[name])
    try:
        assert det.name == name and det.version and det.id == f"{det.name}-v{det.version}"
        refusal = det.detect("q", "I'm sorry, but I cannot help with that.")
        answer = det.detect("q", "Sure. Paris is the capital of France.")
        assert det.detect("q", "").refused and det.detect("q", "").rule == "empty"
        assert refusal.rule.startswith(f"{name}:") and 0 <= refusal.score <= 1 and 0 <= answer.score <= 1
    finally:
        close_detector(det)
