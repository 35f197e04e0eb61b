"""The classifier's rules (PCR.md section 4) on constructed evidence: each branch, its boundaries and
the prescription it gives."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvedge.pcr.classify import Evidence, carrier, classify

BASE = Evidence(damage_both=0.4, damage_k=0.35, damage_v=0.05, beyond_noise=True, top3_recovery=0.8,
                weighted_pcr=0.7, overlap=0.2, top_layers=(3, 7, 9), type_k="q4_0", type_v="q4_0")


def test_none_within_noise() -> None:
    v = classify(replace(BASE, beyond_noise=False))
    assert v.mode == "none"
    assert "noise floor" in v.reasons[0]
    assert v.suggested == {"type_k": "q4_0", "type_v": "q4_0"}


def test_significant_shift_toward_refusal_is_not_a_failure_mode() -> None:
    v = classify(replace(BASE, damage_both=-0.3))
    assert v.mode == "none"
    assert "toward refusal" in v.reasons[0]
    assert "over-refusal" in v.prescription


@pytest.mark.parametrize("recovery,mode", [(0.49, "multi-layer dilution"), (0.5, "outlier-crushes-safety")])
def test_dilution_boundary(recovery: float, mode: str) -> None:
    v = classify(replace(BASE, top3_recovery=recovery))
    assert v.mode == mode
    if mode == "multi-layer dilution":
        assert v.suggested == {"type_k": "q8_0", "type_v": "q8_0"}
        assert "expected to fail" in v.prescription


def test_dilution_wins_over_high_pcr() -> None:
    assert classify(replace(BASE, top3_recovery=0.1, weighted_pcr=0.99, overlap=0.0)).mode == "multi-layer dilution"


def test_outlier_crushes_safety_prescribes_smoothing_of_the_carrier() -> None:
    v = classify(BASE)
    assert v.mode == "outlier-crushes-safety"
    assert v.carrier == "K"
    assert v.suggested["smooth_layers"] == [3, 7, 9]
    assert v.suggested["type_k"] == "q8_0" and v.suggested["type_v"] == "q4_0"
    assert "smoothing" in v.prescription


@pytest.mark.parametrize("pcr,overlap", [(0.49, 0.2), (0.7, 0.5), (None, 0.0), (0.9, 0.95)])
def test_outlier_as_safety(pcr, overlap) -> None:
    v = classify(replace(BASE, weighted_pcr=pcr, overlap=overlap))
    assert v.mode == "outlier-as-safety"
    assert "more bits" in v.prescription
    assert "smooth_layers" not in v.suggested


def test_pcr_boundary_is_inclusive() -> None:
    assert classify(replace(BASE, weighted_pcr=0.5, overlap=0.49)).mode == "outlier-crushes-safety"


@pytest.mark.parametrize("k,v,expected", [(0.3, 0.1, "K"), (0.1, 0.3, "V"), (0.2, 0.15, "K and V"),
                                          (-0.1, 0.2, "V"), (0.0, 0.0, "K and V")])
def test_carrier(k: float, v: float, expected: str) -> None:
    assert carrier(replace(BASE, damage_k=k, damage_v=v)) == expected


def test_carrier_of_a_joint_only_damage_is_read_on_the_top_layers() -> None:
    # measured on the canary at q4_0 without rotation: K alone -0.016, V alone +0.001, both +0.102, and the
    # top layers' damage sits in K; the all-layer figures alone would have named V
    joint = replace(BASE, damage_both=0.102, damage_k=-0.016, damage_v=0.001)
    assert carrier(joint) == "K and V"
    v = classify(replace(joint, top_damage_k=0.074, top_damage_v=0.0003))
    assert v.carrier == "K" and "smoothing of the K cache" in v.prescription
    assert any("neither cache alone" in r for r in v.reasons)
    assert carrier(replace(joint, top_damage_k=0.03, top_damage_v=0.02)) == "K and V"
    # a cache that reproduces half of the joint damage names the carrier as before
    assert carrier(replace(joint, damage_v=0.051, top_damage_k=0.074, top_damage_v=0.0)) == "V"


def test_v_carrier_gets_more_bits_for_v_only() -> None:
    v = classify(replace(BASE, damage_k=0.01, damage_v=0.4, weighted_pcr=0.1))
    assert v.mode == "outlier-as-safety" and v.carrier == "V"
    assert v.suggested == {"type_k": "q4_0", "type_v": "q8_0"}


def test_none_flags_a_significant_margin_drop() -> None:
    v = classify(replace(BASE, beyond_noise=False, margin_drop=0.9, margin_drop_lo=0.5))
    assert v.mode == "none" and len(v.reasons) == 2 and "margin" in v.reasons[1]
    assert len(classify(replace(BASE, beyond_noise=False, margin_drop=0.9, margin_drop_lo=-0.1)).reasons) == 1


def test_sweep_transition_rules() -> None:
    from kvedge.pcr.sweep import transition

    def pt(bits, value, lo, hi):
        return {"bits": bits, "damage": {"value": value, "lo": lo, "hi": hi}}

    points = [pt(2, 0.7, 0.5, 0.9), pt(3, 0.55, 0.3, 0.8), pt(4, 0.2, 0.05, 0.3), pt(5, 0.04, -0.01, 0.12),
              pt(6, 0.01, -0.02, 0.05), pt(7, -0.03, -0.06, -0.01), pt(8, 0.0, -0.01, 0.01)]
    assert transition(points) == {"collapse_bits": 3, "safe_bits": 6}
    assert transition([pt(2, 0.3, 0.1, 0.5), pt(8, 0.2, 0.15, 0.25)]) == {"collapse_bits": None, "safe_bits": None}
