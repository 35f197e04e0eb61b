"""PCR on both populations: damage and margin shift per population on constructed tensors, every
direction reachable, the choice of the population the evidence follows."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvedge.pcr import stats as st  # noqa: E402
from kvedge.stats import Estimate  # noqa: E402

HARMFUL = torch.tensor([True, True, False, False, False])


def test_damage_is_signed_per_population() -> None:
    s_ref = torch.tensor([10.0, 10.0, 0.0, 0.0, 0.0])
    # every prompt's signal falls by 2 (gap 10): harmful prompts lose a fifth of the gap, benign ones move
    # away from the harmful side (negative: not their failure)
    down = s_ref - 2.0
    assert st.damage(s_ref, down, HARMFUL, 10.0, "harmful").value == pytest.approx(0.2)
    assert st.damage(s_ref, down, HARMFUL, 10.0, "benign").value == pytest.approx(-0.2)
    up = s_ref + torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0])
    assert st.damage(s_ref, up, HARMFUL, 10.0, "benign").value == pytest.approx(0.2)
    assert st.damage(s_ref, up, HARMFUL, 10.0, "benign").n == 3
    assert st.damage(s_ref, up, HARMFUL, 10.0) == st.damage(s_ref, up, HARMFUL, 10.0, "harmful")  # kvedge.pcr/1's


def test_margin_shift_is_paired_per_population() -> None:
    m_ref = torch.tensor([5.0, 6.0, -1.0, -2.0, -3.0], dtype=torch.float64)  # margins are float64 (stats.margin)
    m_q = m_ref + torch.tensor([-1.0, -1.0, 0.5, 0.7, 0.9], dtype=torch.float64)
    h, b = st.margin_shift(m_ref, m_q, HARMFUL, "harmful"), st.margin_shift(m_ref, m_q, HARMFUL, "benign")
    assert h.value == pytest.approx(-1.0) and h.lo == pytest.approx(-1.0) and h.n == 2  # no spread, no width
    assert b.value == pytest.approx(0.7) and b.n == 3 and 0.5 <= b.lo < b.value < b.hi <= 0.9 + 1e-12


def _est(value: float, half: float, n: int = 10) -> Estimate:
    return Estimate(value, value - half, value + half, n, "bootstrap")


@pytest.mark.parametrize("population,value,direction,failure", [
    ("harmful", -0.6, "away from refusal", True),  # refusals lost
    ("harmful", +0.6, "toward refusal", False),  # refused more firmly
    ("benign", +0.6, "toward refusal", True),  # over-refusal
    ("benign", -0.6, "away from refusal", False),  # less over-refusal
])
def test_every_direction_is_reachable(population, value, direction, failure) -> None:
    p = st.population_shift(population, _est(value, 0.2), _est(0.0, 0.1), 0.01)
    assert p.moved and p.direction == direction and p.failure is failure
    assert p.failure_shift.value == pytest.approx(0.6 if failure else -0.6)
    assert p.safe is (not failure)  # a shift the way that does not fail the population is inside the band
    assert p.strength == pytest.approx(0.6 / 0.2)


def test_within_noise_and_safe_band() -> None:
    still = st.population_shift("benign", _est(0.05, 0.1), _est(0.0, 0.1), 0.01)
    assert not still.moved and still.direction is None and not still.failure
    # beyond a tiny arithmetic floor but inside the practical band: moved, failing, and safe
    small = st.population_shift("benign", _est(0.05, 0.03), _est(0.0, 0.1), 0.001)
    assert small.moved and small.failure and small.safe
    assert not st.population_shift("benign", _est(0.05, 0.06), _est(0.0, 0.1), 0.001).safe  # hi 0.11
    # the floor, not the interval, decides when it is the wider
    assert not st.population_shift("harmful", _est(-0.05, 0.01), _est(0.0, 0.1), 0.1).moved
    assert st.floor(_est(0.001, 0.002)) == pytest.approx(0.003)


def _pop(population, value, half, n=10):
    return st.population_shift(population, _est(value, half, n), _est(0.0, 0.1, n), 0.002)


def test_the_population_that_moved_the_way_that_fails_it_is_followed() -> None:
    # both fail: the stronger relative to its noise, not the larger in nats
    h, b = _pop("harmful", -0.64, 0.35), _pop("benign", 0.89, 0.43, 30)
    assert st.moved_population((h, b)).population == "benign"  # 2.07 against 1.83
    h2 = _pop("harmful", -0.64, 0.2)
    assert st.moved_population((h2, b)).population == "harmful"  # 3.2 against 2.07
    # a failing population wins over a stronger one that moved the harmless way
    refused_more, over = _pop("harmful", 2.0, 0.1), _pop("benign", 0.3, 0.2, 30)
    assert st.moved_population((refused_more, over)).population == "benign"
    # only a harmless movement: followed (the verdict will be none), over one that did not move
    assert st.moved_population((refused_more, _pop("benign", 0.01, 0.2, 30))).population == "harmful"
    # nothing moved: the larger failure-direction shift
    assert st.moved_population((_pop("harmful", -0.05, 0.2), _pop("benign", 0.02, 0.2, 30))).population == "harmful"
