"""`kvedge pcr` and `kvedge sweep` end to end: real llama.cpp (tokenization, continuations, fidelity
references) and the real torch pass on the default model with the canary adapter, through the CLI. Bad
input: tests/unit/test_pcr.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("torch")

from support.browser import browser_or_skip, load  # noqa: E402
from support.cli import run_cli  # noqa: E402
from kvedge.pcr.classify import Evidence, classify  # noqa: E402
from kvedge.results.pcr import FAILURE_SIGN  # noqa: E402


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


@pytest.fixture(scope="module")
def pcr_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("pcr")
    proc = run_cli("pcr", "--kv", "q4_0", "--rotation", "both", "--out", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    return {"proc": proc, "out": out, "report": json.loads((out / "pcr.json").read_text()),
            "md": (out / "pcr.md").read_text()}


def _failure(row: dict, kind: str, population: str) -> float:
    shift = row[f"margin_shift_{population}_{kind}"]
    return 0.0 if shift is None else FAILURE_SIGN[population] * shift


def test_report_holds_every_field_computed(pcr_run) -> None:
    rep = pcr_run["report"]
    assert rep["schema"] == "kvedge.pcr/2"
    assert rep["calibration"]["n_harmful"] == 10 and rep["calibration"]["n_harmless"] == 30
    assert rep["adapter"] and rep["adapter"].endswith("smollm2-canary-lora.gguf")
    sig = rep["signal"]
    assert 10 <= sig["readout_layer"] < 30 and sig["gap"] > 0
    assert len(sig["separation"]) == 30
    nf = rep["noise_floor"]
    assert nf["margin_shift_benign"]["n"] == 30 and nf["margin_floor_benign"] >= abs(nf["margin_shift_benign"]["value"])
    assert [r["rotation"] for r in rep["rotations"]] == [True, False]
    for r in rep["rotations"]:
        # the verdict is the classifier's rule applied to the evidence the report shows
        ev = Evidence.from_dict(r["evidence"])
        assert json.loads(json.dumps(classify(ev).to_dict())) == r["verdict"]
        pop = ev.population
        # the verdict names the population the evidence follows first, with its interval and n
        assert r["verdict"]["reasons"][0].startswith(f"{pop} prompts ") and "nats (n=" in r["verdict"]["reasons"][0]
        for key in ("k_and_v", "k_only", "v_only"):
            x = r["all_layers"][key]
            assert _finite(x["damage"]["value"]) and x["damage"]["n"] == 10
            assert x["damage"]["lo"] <= x["damage"]["value"] <= x["damage"]["hi"]
            assert x["damage_benign"]["n"] == x["margin_shift_benign"]["n"] == 30
            assert x["margin_shift_harmful"]["value"] == pytest.approx(-x["margin_drop_harmful"]["value"])
            assert _finite(x["margin_drop_harmful"]["value"]) and _finite(x["kld_harmless"]["value"])
        assert r["all_layers"]["k_and_v"]["amplification"]["value"] > 0
        assert len(r["per_layer"]) == 30
        readout = sig["readout_layer"]
        lm = r["layer_map"]
        measured = [k for k in ("k", "v") if r["per_layer"][0][f"margin_shift_benign_{k}"] is not None]
        assert measured  # the carrier's caches, at least
        for row in r["per_layer"]:
            for kind in measured:  # per layer, each population apart, on every layer
                assert _finite(row[f"margin_shift_harmful_{kind}"]) and _finite(row[f"margin_shift_benign_{kind}"])
                if row["layer"] <= readout:
                    assert _finite(row[f"damage_{kind}"]) and _finite(row[f"damage_benign_{kind}"])
                else:
                    assert row[f"damage_{kind}"] is None  # layers after the readout cannot move the signal
        for row in r["per_layer"][: readout + 1]:
            assert _finite(row["overlap_k"]) and _finite(row["overlap_v"])
        # the ranking, concentration and PCR follow the chosen population's failure-signed single-layer shift
        c = r["concentration"]
        assert c["population"] == r["pcr"]["population"] == pop
        singles = {row["layer"]: _failure(row, "k", pop) + _failure(row, "v", pop) for row in r["per_layer"]}
        assert c["top3_layers"] == sorted(singles, key=lambda l: (-singles[l], l))[:3]
        f_all = FAILURE_SIGN[pop] * r["all_layers"]["k_and_v"][f"margin_shift_{pop}"]["value"]
        if f_all > 0:
            assert c["top3_recovery"] == pytest.approx(1 - c["shift_without_top3"] / f_all)
        else:
            assert c["top3_recovery"] is None
        assert len(r["pcr"]["layers"]) == 6 and r["pcr"]["bits_k"] == 4
        pcr_rows = [row for row in r["per_layer"] if "shift_group32" in row]
        assert len(pcr_rows) == 6
        for row in pcr_rows:
            if row["pcr"] is not None:
                assert row["pcr"] == pytest.approx(float(np.clip(1 - row["shift_channel"] / row["shift_group32"], -1, 1)))
        if lm["searched"]:
            assert lm["population"] == pop
    # rotation spreads outliers: fewer outlier channels survive in the rotated basis
    on, off = rep["rotations"]
    n_on = sum(row.get("outliers_k", 0) for row in on["per_layer"])
    n_off = sum(row.get("outliers_k", 0) for row in off["per_layer"])
    assert n_on <= n_off
    # and the simulation says what llama.cpp measures: q4_0 without rotation hurts more
    assert off["all_layers"]["k_and_v"]["kld_harmless"]["value"] > on["all_layers"]["k_and_v"]["kld_harmless"]["value"]


def test_the_canarys_over_refusal_is_the_population_that_moved(pcr_run) -> None:
    """EVIDENCE.md: on the canary, q4_0 without rotation moves the benign prompts' margin toward refusal by
    about +0.7 nats; PCR must name that population and direction, not the harmful one."""
    off = pcr_run["report"]["rotations"][1]
    benign = next(p for p in off["evidence"]["populations"] if p["population"] == "benign")
    assert benign["moved"] and benign["failure"] and benign["direction"] == "toward refusal"
    assert benign["margin_shift"]["lo"] > 0
    assert off["evidence"]["population"] == "benign"


def test_layer_map_prescribed_for_concentrated_damage(pcr_run, model_path) -> None:
    """Where the verdict is concentrated damage the report holds the per-layer map search: prefixes of the
    damage ranking, each one layer more at q8_0, stopped at the first predicted safe; bytes from the map."""
    from kvedge.api import prescribed_layer_map
    from kvedge.gguf.kvmap import parse_kv
    from kvedge.gguf.model import inspect_model
    from kvedge.pcr.layermap import CACHES
    from kvedge.pcr.stats import SAFE_SHIFT

    model = inspect_model(model_path)
    audited = parse_kv("q4_0").bytes_per_token(model)
    for r in pcr_run["report"]["rotations"]:
        lm = r["layer_map"]
        chosen = prescribed_layer_map(pcr_run["out"] / "pcr.json", r["rotation"])
        assert chosen == (parse_kv(lm["chosen"]["kv"]) if lm.get("chosen") else None)
        if r["verdict"]["mode"] not in ("outlier-crushes-safety", "outlier-as-safety"):
            assert not lm["searched"]
            continue
        assert lm["searched"] and lm["tried"]
        for i, row in enumerate(lm["tried"]):
            config = parse_kv(row["kv"]).resolve(model)
            assert row["layers"] == sorted(lm["ranking"][: i + 1])
            for kind in CACHES[lm["carrier"]]:  # more bits on the carrier cache, on exactly those layers
                assert [l for l, _ in getattr(config, f"layers_{kind}")] == row["layers"]
            assert row["bytes_per_token"] == config.bytes_per_token(model) > audited
            # predicted safe: both populations' failure-direction margin shift below the band
            assert row["safe"] == (-row["margin_shift_harmful"]["lo"] < SAFE_SHIFT and
                                   row["margin_shift_benign"]["hi"] < SAFE_SHIFT)
            assert row["safe"] is (i == len(lm["tried"]) - 1 and lm["chosen"] is not None)
        assert lm["uniform_upgrade"]["vs_audited"] > lm["tried"][-1]["vs_audited"]
        assert "layer map:" in pcr_run["proc"].stdout and "### Per-layer map" in pcr_run["md"]


def test_fidelity_measured_in_the_run(pcr_run) -> None:
    f = pcr_run["report"]["fidelity"]
    assert f["n_positions"] >= 20
    assert f["f16_kld"] < 0.01  # PCR.md section 2 target
    assert f["f16_top1"] >= 0.9
    for q in f["quantized"]:
        assert q["llama_kld"] > 0 and q["sim_kld"] > 0
        assert 0.25 <= q["ratio"] <= 4.0
        assert q["n_prompts"] == 40


def test_markdown_and_summary(pcr_run) -> None:
    md, out = pcr_run["md"], pcr_run["proc"].stdout
    assert "## rotation on" in md and "## rotation off" in md and "Fidelity" in md
    assert "| layer | sep |" in md
    assert "verdict:" in out and "fidelity:" in out and "reports:" in out
    # the per-channel figure is never printed without saying llama.cpp has no such quantizer
    for text in (md, out, (pcr_run["out"] / "pcr.html").read_text()):
        assert "a counterfactual quantizer llama.cpp does not have" in text
    assert "benign prompts" in out and "harmful prompts" in out


def test_pcr_html_in_a_browser(pcr_run) -> None:
    """pcr.html: the per-layer damage plot with a panel per rotation setting, loading cleanly."""
    page = (pcr_run["out"] / "pcr.html").read_text()
    assert page.count('<figure class="plot"') == 1 and "rotation on" in page and "rotation off" in page
    assert "<script" not in page
    binary = browser_or_skip()
    loaded = load(pcr_run["out"] / "pcr.html", binary=binary, pdf=False)
    assert loaded.errors == [] and loaded.plots == 1


def test_sweep_locates_the_transition(tmp_path) -> None:
    proc = run_cli("sweep", "--bits", "2,8", "--rotation", "off", "--out", str(tmp_path), "-q")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((tmp_path / "sweep.json").read_text())
    assert rep["schema"] == "kvedge.sweep/2"
    assert [c["cache"] for c in rep["curves"]] == ["k", "v", "k+v"]
    for c in rep["curves"]:
        d2, d8 = (p["damage"]["value"] for p in c["points"])
        k2, k8 = (p["kld_harmless"]["value"] for p in c["points"])
        assert k2 > k8  # 2 bits damage the model's output more than 8 bits
        assert abs(d8) < 0.1  # int8 (= q8_0) is close to f16
        b2, b8 = (p["margin_shift_benign"] for p in c["points"])
        assert b8["n"] == 30 and abs(b8["value"]) < abs(b2["value"])  # each population apart, per width
    both = rep["curves"][2]
    assert both["transition"]["safe_bits"] == 8  # int8 = q8_0 erases far less than a tenth of the gap
    assert (tmp_path / "sweep.md").read_text().startswith("# kvedge sweep")
    page = (tmp_path / "sweep.html").read_text()
    assert page.count('<figure class="plot"') == 1 and "<script" not in page


def test_sweep_holds_a_maps_layers(tmp_path) -> None:
    """--kv with a per-layer map: the layers it names keep their types while the rest sweep (torch only)."""
    runs = {}
    for name, extra in (("plain", []), ("held", ["--kv", "k=q4_0@19+17+11:q8_0/v=q4_0"])):
        proc = run_cli("sweep", "--bits", "3", "--rotation", "off", "--out", str(tmp_path / name), "-q", *extra)
        assert proc.returncode == 0, proc.stderr
        runs[name] = json.loads((tmp_path / name / "sweep.json").read_text())
    assert runs["plain"]["held"] is None
    assert runs["held"]["held"]["kv"] == "k=q4_0@11+17+19:q8_0/v=q4_0"
    damage = {n: {c["cache"]: c["points"][0]["damage"]["value"] for c in r["curves"]} for n, r in runs.items()}
    assert damage["held"]["k"] != damage["plain"]["k"]  # three K layers at q8_0 instead of int3
    assert damage["held"]["v"] == damage["plain"]["v"]  # the map names no V layer
    assert "keep its types" in (tmp_path / "held" / "sweep.md").read_text()
