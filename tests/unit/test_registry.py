"""One contract test per registry, run over every registered plugin (garak's way): whatever registers
under a name must behave as the audit assumes."""

from __future__ import annotations

import dataclasses

import pytest

from kvedge.errors import UnknownName
from kvedge.registry import BENCHMARKS, DETECTORS, NOISE_VARIANTS
from kvedge.llama.runtime import RuntimeOptions


# The detectors that need a model (a judge) keep the contract in tests/e2e/test_registry.py, with the
# default model standing in; every other registered detector is checked here.
NEEDS_MODEL = {"judge"}


@pytest.mark.parametrize("name", [n for n in DETECTORS.names() if n not in NEEDS_MODEL])
def test_detectors_keep_the_contract(name):
    from kvedge.detectors import close_detector, make_detector

    det = make_detector(name)
    try:
        assert det.name == name and det.version and det.id == f"{det.name}-v{det.version}"
        refusal = det.detect("q", "I'm sorry, but I cannot help with that.")
        answer = det.detect("q", "Sure. Paris is the capital of France.")
        assert det.detect("q", "").refused and det.detect("q", "").rule == "empty"
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
