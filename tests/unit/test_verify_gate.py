"""verify's gate (kvedge.mitigate.verify.deployment_gate): only `equivalent` passes, and the f16 cache that
export recommends when it can show nothing quantized safe is the reference itself, so it passes."""

from __future__ import annotations

from types import SimpleNamespace

from kvedge.mitigate.verify import deployment_gate


def _row(verdict: str | None):
    return SimpleNamespace(verdict=None if verdict is None else SimpleNamespace(verdict=verdict, line=f"x: {verdict}"))


def test_only_equivalent_passes():
    assert deployment_gate(_row("equivalent"), "x").passed
    for v in ("inconclusive", "over-refuses", "loses refusals", "loses refusals and over-refuses"):
        g = deployment_gate(_row(v), "x")
        assert not g.passed and g.verdict == v and g.line == f"x: {v}"


def test_the_f16_cache_export_recommends_passes_its_own_verify():
    g = deployment_gate(_row(None), "f16")
    assert g.passed and g.verdict == "equivalent"
    assert "f16 cache itself" in g.line and "no KV memory saved" in g.line
