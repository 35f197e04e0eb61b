"""PCR's typed result: the document it writes (keys present only sometimes, rows with their PCR keys inline),
read back by the readers of a pcr.json (prescribed_layer_map, the renderers). Constructed values; the e2e
tests check a real pass."""

from __future__ import annotations

import json

import pytest

from kvedge.api import prescribed_layer_map
from kvedge.gguf.kvmap import parse_kv
from kvedge.pcr.classify import classify
from kvedge.results.pcr import (
    PCR_SCHEMA,
    AllLayers,
    CacheRun,
    CalibPromptInfo,
    Calibration,
    Concentration,
    Evidence,
    Fidelity,
    FidelityTargets,
    KvSection,
    LayerMap,
    LayerReduction,
    LayerRow,
    MapAudited,
    MapRow,
    NoiseFloor,
    PcrLayers,
    PcrModel,
    PcrResult,
    PcrTiming,
    PopulationShift,
    QuantFidelity,
    RotationResult,
    Signal,
)
from kvedge.stats import Estimate


def _est(v: float, half: float = 0.02, n: int = 10) -> Estimate:
    return Estimate(v, v - half, v + half, n, "bootstrap")


def _run(d: float) -> CacheRun:
    return CacheRun(_est(d), _est(0.1), _est(0.5), _est(-0.5), _est(0.7, n=30), 0.01, _est(0.1), None)


def _shift(population: str, value: float, moved: bool = True) -> PopulationShift:
    failing = moved and (value > 0) == (population == "benign")
    return PopulationShift(population, _est(value, 0.2), _est(0.1), 0.002, moved,
                           ("toward refusal" if value > 0 else "away from refusal") if moved else None, failing,
                           False, abs(value) / 0.2)


EVIDENCE = Evidence(populations=(_shift("harmful", -0.3), _shift("benign", 0.7)), population="benign", shift_k=0.6,
                    shift_v=0.05, top3_recovery=0.8, weighted_pcr=0.7, overlap=0.1, top_layers=(3, 1, 2),
                    type_k="q4_0", type_v="q4_0")


def _rotation(rotation: bool, chosen: bool) -> RotationResult:
    row = MapRow(layers=(3,), kv="k=q4_0@3:q8_0/v=q4_0", bytes_per_token=100, vs_audited=1.1, damage=_est(0.05),
                 margin_drop_harmful=_est(0.1), damage_benign=_est(0.0), margin_shift_harmful=_est(-0.05),
                 margin_shift_benign=_est(0.02), safe=True, within_noise=False)
    uniform = MapRow(kv="k=q8_0/v=q4_0", bytes_per_token=150, vs_audited=1.5, damage=_est(0.0),
                     margin_drop_harmful=_est(0.0), damage_benign=_est(0.0), margin_shift_harmful=_est(0.0),
                     margin_shift_benign=_est(0.0), safe=True, within_noise=True)
    lm = (LayerMap(searched=True, criterion="c", population="benign", carrier="K", ranking=(3, 1),
                   audited=MapAudited("q4_0", 90), tried=(row,), chosen=row, uniform_upgrade=uniform) if chosen
          else LayerMap(searched=False, reason="verdict none: no damage to fix"))
    shifts = dict(margin_shift_harmful_k=-0.1, margin_shift_harmful_v=0.0, margin_shift_benign_k=0.3,
                  margin_shift_benign_v=0.01)
    rows = (LayerRow(layer=0, separation=0.1, damage_k=0.0, damage_v=0.0, damage_benign_k=0.0, damage_benign_v=0.0,
                     outliers_k=0, overlap_k=0.0, **shifts),
            LayerRow(layer=3, separation=1.0, damage_k=0.2, damage_v=0.0, damage_benign_k=0.1, damage_benign_v=0.0,
                     outliers_k=1, overlap_k=0.1, outliers_v=0, overlap_v=0.0,
                     reduction=LayerReduction(0.2, None, 0.05, None), **shifts),
            LayerRow(layer=4, separation=2.0, damage_k=None, damage_v=None, damage_benign_k=None, damage_benign_v=None,
                     **shifts))
    return RotationResult(rotation, "q4_0", "q4_0", AllLayers(_run(0.3), _run(0.25), None),
                          Concentration("benign", (3, 1, 2), 0.9, 0.06, 0.8), PcrLayers("benign", 4, 4, (3,), 0.7), 0.1,
                          rows, EVIDENCE, classify(EVIDENCE), lm)


def make_result() -> PcrResult:
    targets = FidelityTargets(0.99, 0.01, (0.5, 2.0), 0.5)
    return PcrResult(
        schema=PCR_SCHEMA, kvedge_version="0", model=PcrModel("/m.gguf", "0" * 64, "llama", 5, 3, 64, 64),
        adapter=None, kv=KvSection(name="q4_0", type_k="q4_0", type_v="q4_0", bytes_per_token=90),
        calibration=Calibration("calib", 1, 1, (CalibPromptInfo("a", "advbench", True, 40),
                                                CalibPromptInfo("b", "xstest-safe", False, 41)), 30, ("I",), ("Sure",)),
        signal=Signal(4, 10.0, (0.1, 0.2, 0.3, 1.0, 2.0), _est(5.0, n=1), _est(-1.0, n=1)),
        noise_floor=NoiseFloor("f32", _est(0.0, 1e-4), 1e-4, _est(0.0, 1e-4), 1e-4, _est(0.0, 2e-3), 2e-3,
                               _est(0.0, 2e-3, 30), 2e-3),
        fidelity=Fidelity(0.995, 0.002, 160, (QuantFidelity(True, 0.04, 0.04, 1.0, 0.6, 20, True),), True, True,
                          targets),
        rotations=(_rotation(True, False), _rotation(False, True)),
        timing=PcrTiming(1.0, 0.5, 0.1, 10, 1),
    )


def test_document_shape_and_round_trip() -> None:
    rep = make_result()
    doc = json.loads(json.dumps(rep.to_dict()))
    assert list(doc) == ["schema", "kvedge_version", "model", "adapter", "kv", "calibration", "signal",
                         "noise_floor", "fidelity", "rotations", "timing"]
    assert "layers_k" not in doc["kv"] and list(doc["kv"])[-1] == "bytes_per_token"
    rows = doc["rotations"][0]["per_layer"]
    assert list(rows[0])[-2:] == ["outliers_k", "overlap_k"] and "outliers_v" not in rows[0]
    # the PCR keys sit in the row itself, after the outlier keys, nulls included
    assert list(rows[1])[-4:] == ["shift_group32", "shift_group32_lo", "shift_channel", "pcr"]
    assert rows[1]["pcr"] is None and rows[2]["damage_k"] is None and "shift_group32" not in rows[2]
    ev = doc["rotations"][0]["evidence"]
    assert ev["population"] == "benign" and [p["population"] for p in ev["populations"]] == ["harmful", "benign"]
    assert doc["rotations"][0]["layer_map"] == {"searched": False, "reason": "verdict none: no damage to fix"}
    assert doc["fidelity"]["targets"]["ratio"] == [0.5, 2.0]
    assert PcrResult.from_dict(doc) == rep


def test_a_per_layer_map_keeps_its_overrides() -> None:
    kv = parse_kv("k=q4_0@3:q8_0/v=q4_0")
    sec = KvSection(name=kv.name, type_k=kv.type_k, type_v=kv.type_v, layers_k=kv.layers_k, bytes_per_token=9)
    assert sec.to_dict() == {"name": kv.name, **kv.key(), "bytes_per_token": 9}
    assert KvSection.from_dict(json.loads(json.dumps(sec.to_dict()))) == sec


def test_prescribed_layer_map_reads_the_typed_result_its_dict_and_its_file(tmp_path) -> None:
    rep = make_result()
    path = tmp_path / "pcr.json"
    path.write_text(json.dumps(rep.to_dict()))
    for source in (rep, rep.to_dict(), path, str(path)):
        assert prescribed_layer_map(source, False) == parse_kv("k=q4_0@3:q8_0/v=q4_0")
        assert prescribed_layer_map(source, True) is None


def test_write_reports_takes_the_typed_result_or_its_dict(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from kvedge.report import write_reports

    rep = make_result()
    a = write_reports(rep, tmp_path / "a", "pcr")
    b = write_reports(rep.to_dict(), tmp_path / "b", "pcr")
    for x, y in zip(a, b):
        assert x.read_text() == y.read_text()
    assert json.loads(a.json.read_text()) == json.loads(json.dumps(rep.to_dict()))
    md = a.md.read_text()
    assert "## rotation off: **outlier-crushes-safety**" in md
    assert "benign prompts move toward refusal (over-refusal): margin +0.70 [+0.50, +0.90] nats (n=10)" in md
    # the PCR figure never stands without saying what quantizer it credits
    assert md.count("a counterfactual quantizer llama.cpp does not have") >= 2
    assert "a counterfactual quantizer llama.cpp does not have" in a.html.read_text()
