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


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


@pytest.fixture(scope="module")
def pcr_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("pcr")
    proc = run_cli("pcr", "--kv", "q4_0", "--rotation", "both", "--out", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    return {"proc": proc, "out": out, "report": json.loads((out / "pcr.json").read_text()),
            "md": (out / "pcr.md").read_text()}


def test_report_holds_every_field_computed(pcr_run) -> None:
    rep = pcr_run["report"]
    assert rep["schema"] == "kvedge.pcr/1"
    assert rep["calibration"]["n_harmful"] == 10 and rep["calibration"]["n_harmless"] == 10
    assert rep["adapter"] and rep["adapter"].endswith("smollm2-canary-lora.gguf")
    sig = rep["signal"]
    assert 10 <= sig["readout_layer"] < 30 and sig["gap"] > 0
    assert len(sig["separation"]) == 30
    assert [r["rotation"] for r in rep["rotations"]] == [True, False]
    for r in rep["rotations"]:
        # the verdict is the classifier's rule applied to the evidence the report shows
        ev = dict(r["evidence"], top_layers=tuple(r["evidence"]["top_layers"]))
        assert json.loads(json.dumps(classify(Evidence(**ev)).to_dict())) == r["verdict"]
        for key in ("k_and_v", "k_only", "v_only"):
            x = r["all_layers"][key]
            assert _finite(x["damage"]["value"]) and x["damage"]["n"] == 10
            assert x["damage"]["lo"] <= x["damage"]["value"] <= x["damage"]["hi"]
            assert _finite(x["margin_drop_harmful"]["value"]) and _finite(x["kld_harmless"]["value"])
        assert r["all_layers"]["k_and_v"]["amplification"]["value"] > 0
        assert len(r["per_layer"]) == 30
        readout = sig["readout_layer"]
        for row in r["per_layer"][: readout + 1]:
            assert _finite(row["damage_k"]) and _finite(row["damage_v"])
            assert _finite(row["overlap_k"]) and _finite(row["overlap_v"])
        for row in r["per_layer"][readout + 1:]:
            assert row["damage_k"] is None  # layers after the readout cannot move the signal
        c = r["concentration"]
        singles = {row["layer"]: row["damage_k"] + row["damage_v"] for row in r["per_layer"][: readout + 1]}
        assert c["top3_layers"] == sorted(singles, key=lambda l: (-singles[l], l))[:3]
        d_all = r["all_layers"]["k_and_v"]["damage"]["value"]
        if d_all > 0:
            assert c["top3_recovery"] == pytest.approx(1 - c["damage_without_top3"] / d_all)
        else:
            assert c["top3_recovery"] is None
        assert len(r["pcr"]["layers"]) == 6 and r["pcr"]["bits_k"] == 4
        pcr_rows = [row for row in r["per_layer"] if "damage_group32" in row]
        assert len(pcr_rows) == 6
        for row in pcr_rows:
            if row["pcr"] is not None:
                assert row["pcr"] == pytest.approx(float(np.clip(1 - row["damage_channel"] / row["damage_group32"], -1, 1)))
    # rotation spreads outliers: fewer outlier channels survive in the rotated basis
    on, off = rep["rotations"]
    n_on = sum(row.get("outliers_k", 0) for row in on["per_layer"])
    n_off = sum(row.get("outliers_k", 0) for row in off["per_layer"])
    assert n_on <= n_off
    # and the simulation says what llama.cpp measures: q4_0 without rotation hurts more
    assert off["all_layers"]["k_and_v"]["kld_harmless"]["value"] > on["all_layers"]["k_and_v"]["kld_harmless"]["value"]


def test_layer_map_prescribed_for_concentrated_damage(pcr_run, model_path) -> None:
    """Where the verdict is concentrated damage the report holds the per-layer map search: prefixes of the
    damage ranking, each one layer more at q8_0, stopped at the first predicted safe; bytes from the map."""
    from kvedge.gguf.kvmap import parse_kv
    from kvedge.gguf.model import inspect_model
    from kvedge.pcr.layermap import CACHES
    from kvedge.pcr.stats import SAFE_DAMAGE

    model = inspect_model(model_path)
    audited = parse_kv("q4_0").bytes_per_token(model)
    for r in pcr_run["report"]["rotations"]:
        lm = r["layer_map"]
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
            assert row["safe"] == (row["damage"]["hi"] < SAFE_DAMAGE)
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
        assert q["n_prompts"] == 20


def test_markdown_and_summary(pcr_run) -> None:
    md, out = pcr_run["md"], pcr_run["proc"].stdout
    assert "## rotation on" in md and "## rotation off" in md and "Fidelity" in md
    assert "| layer | sep |" in md
    assert "verdict:" in out and "fidelity:" in out and "reports:" in out


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
    assert [c["cache"] for c in rep["curves"]] == ["k", "v", "k+v"]
    for c in rep["curves"]:
        d2, d8 = (p["damage"]["value"] for p in c["points"])
        k2, k8 = (p["kld_harmless"]["value"] for p in c["points"])
        assert k2 > k8  # 2 bits damage the model's output more than 8 bits
        assert abs(d8) < 0.1  # int8 (= q8_0) is close to f16
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
