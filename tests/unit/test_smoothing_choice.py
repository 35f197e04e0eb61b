"""Export's smoothing choice in simulation (mitigate/simulate.py): prescribed only when it reduces the margin
shift of the population that moved, whatever it does to KLD; the prediction with and without is reported."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from kvedge.mitigate.simulate import Recipe, Scored, SmoothingChoice, decide  # noqa: E402


def _scored(label: str, kld: float, benign: float, harmful: float = 0.0) -> Scored:
    return Scored(label, kld, 0.0, (kld,) * 3, 0.9, (harmful,) * 3, (benign - 0.01, benign, benign + 0.01))


BASE = _scored("no smoothing", 0.40, 0.72)


def test_lower_kld_with_a_larger_benign_shift_is_not_prescribed() -> None:
    # EVIDENCE.md's case: the export's recipe lowered KLD a little and doubled the benign shift
    worse = _scored("K alpha=0.25 on all layers", 0.38, 1.45)
    i, reason = decide(BASE, [worse], "benign")
    assert i is None and "no recipe reduces the benign margin shift" in reason
    assert "+1.450" in reason and "+0.720" in reason


def test_the_recipe_that_reduces_the_shift_is_chosen_even_at_a_higher_kld() -> None:
    better = _scored("K alpha=0.5 on evidence layers", 0.45, 0.30)
    best = _scored("K alpha=1 on evidence layers", 0.50, 0.10)
    i, reason = decide(BASE, [better, best], "benign")
    assert i == 1 and reason.startswith("K alpha=1 on evidence layers: predicted benign shift +0.100")


def test_the_harmful_population_reads_its_own_failure_direction() -> None:
    base = _scored("no smoothing", 0.4, 0.0, harmful=-0.6)  # refusals lost: the margin falls
    up = _scored("r", 0.4, 0.0, harmful=-0.2)
    assert decide(base, [up], "harmful")[0] == 0
    assert decide(base, [_scored("r", 0.1, 0.0, harmful=-0.9)], "harmful")[0] is None


def test_force_takes_the_best_and_says_it_does_not_help() -> None:
    i, reason = decide(BASE, [_scored("r", 0.3, 0.9)], "benign", force=True)
    assert i == 0 and "forced" in reason


def test_the_document_reports_the_prediction_with_and_without() -> None:
    r = Recipe(("k",), 0.5, (1, 3), "evidence")
    chosen = _scored(r.label, 0.45, 0.30)
    c = SmoothingChoice("q4_0", False, BASE, (chosen,), (r,), r, None, "why", "benign")
    d = c.to_dict()
    assert d["population"] == "benign" and d["predicted_shift"]["without"] == pytest.approx(0.72)
    assert d["predicted_shift"]["with"] == pytest.approx(0.30)
    assert SmoothingChoice.from_dict(d).baseline == BASE
