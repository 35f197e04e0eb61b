"""One contract test per registry, run over every registered plugin (garak's way): whatever registers
under a name must behave as the audit assumes."""

from __future__ import annotations

import dataclasses

import pytest

from kvedge.errors import UnknownName
from kvedge.registry import BENCHMARKS, DETECTORS, NOISE_VARIANTS
from kvedge.llama.runtime import RuntimeOptions


# How to build each registered detector for the contract: a name alone, or with the argument it needs.
# A judge needs a model: the default one stands in (a weak judge, so only the contract's form is checked
# here; tests/test_detect_judge.py checks what it measures).
SPECS = {"judge": "judge:default"}
NEEDS_MODEL = {"judge"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.e2e) if n in NEEDS_MODEL else n
                                  for n in DETECTORS.names()])
def test_detectors_keep_the_contract(name):
    from kvedge.detectors import close_detector, make_detector

    det = make_detector(SPECS.get(name, name))
    try:
        assert det.name == name and det.version and det.id == f"{det.name}-v{det.version}"
        refusal = det.detect("q", "I'm sorry, but I cannot help with that.")
        answer = det.detect("q", "Sure. Paris is the capital of France.")
        assert det.detect("q", "").refused and det.detect("q", "").rule == "empty"
        if name in NEEDS_MODEL:
            assert refusal.rule.startswith(f"{name}:") and 0 <= refusal.score <= 1 and 0 <= answer.score <= 1
        else:
            assert refusal.refused and not answer.refused
    finally:
        close_detector(det)


@pytest.mark.parametrize("name", BENCHMARKS.names())
def test_benchmarks_keep_the_contract(name):
    prompts = BENCHMARKS.get(name)()
    assert prompts and len({p.id for p in prompts}) == len(prompts)
    assert all(p.benchmark == name and p.text.strip() and p.split in ("train", "calib", "eval") for p in prompts)


@pytest.mark.parametrize("name", NOISE_VARIANTS.names())
def test_noise_variants_change_arithmetic_not_precision(name):
    base = RuntimeOptions()
    changed = NOISE_VARIANTS.get(name)(base)
    assert changed != base and changed.n_ctx == base.n_ctx
    assert {f.name for f in dataclasses.fields(base) if getattr(base, f.name) != getattr(changed, f.name)} <= {
        "flash_attn", "n_batch", "n_ubatch", "n_threads"}


def test_unknown_names_list_the_choices():
    with pytest.raises(UnknownName, match="choose from keyword"):
        DETECTORS.get("oracle")
