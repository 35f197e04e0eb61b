from types import SimpleNamespace

from kvedge.audit.summary import retention_gate


def _run(label, value):
    return SimpleNamespace(label=label, vs_reference=SimpleNamespace(retention=SimpleNamespace(value=value)),
                           verdict=None)


def test_gate_fails_below_threshold_only():
    g = retention_gate([_run("q8_0 rot=on", 1.0), _run("q4_0 rot=on", 0.8)], 0.9)
    assert not g.passed and g.failing == ["q4_0 rot=on"]
    assert retention_gate([_run("q8_0 rot=on", 0.9)], 0.9).passed


def test_gate_lists_undefined_retention():
    g = retention_gate([_run("q4_0 rot=on", None)], 0.9)
    assert g.passed and g.undefined == ["q4_0 rot=on"]
