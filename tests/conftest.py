"""Fixtures both tiers share, and the tier rule.

tests/unit needs no llama.cpp, no model file and no torch model (fakes stand in: tests/support); it runs in
about two minutes: `pytest -m "not e2e"`. tests/e2e drives the real llama.cpp on the real default model,
real servers and the native build, through the `kvedge` CLI in a subprocess exactly as a user would; every
test there is marked `e2e` by tests/e2e/conftest.py. See docs/development.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvedge.gguf.model import default_model_path
from support.cli import run_cli
from support.fakes import BENIGN, HARMFUL, write_tiny_gguf
from support.httpfakes import FakeServer

TESTS = Path(__file__).resolve().parent
TIERS = {"unit": TESTS / "unit", "e2e": TESTS / "e2e"}


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    """Every test is in one tier's folder, and only the e2e folder's tests are marked e2e: so
    `-m "not e2e"` runs exactly tests/unit, and no test can be left out of a tier."""
    for item in items:
        path = Path(item.path).resolve()
        tier = next((name for name, d in TIERS.items() if d in path.parents), None)
        if tier is None:
            raise pytest.UsageError(f"{item.nodeid}: a test belongs in tests/unit or tests/e2e")
        if tier == "unit" and item.get_closest_marker("e2e") is not None:
            raise pytest.UsageError(f"{item.nodeid}: marked e2e but in tests/unit; move it to tests/e2e")


# -- the real default model (e2e) ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def small_audit(tmp_path_factory) -> dict:
    """One real audit shared by the report tests: f16 reference, noise run, q4_0 with rotation on and off."""
    out = tmp_path_factory.mktemp("audit")
    proc = run_cli("audit", "--kv", "f16,q4_0", "--rotation", "both", "--benchmarks", "advbench,harmbench,xstest", "--limit", "2", "--max-tokens", "24",
                   "--ctx", "2048", "--out", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    return {"out": out, "proc": proc, "report": json.loads((out / "report.json").read_text())}


@pytest.fixture(scope="session")
def native_build():
    """kvedge's native llama.cpp (CPU), from the per-user cache. Building it takes minutes, so it is a step
    run before pytest (`kvedge build-native cpu`, which reuses the cache), never a fixture: when the build is
    missing, every test that needs it fails saying so."""
    from kvedge.llama import native

    build = native.builds().get("cpu")
    if build is None:
        pytest.fail(f"the native llama.cpp build (cpu) is missing from {native.build_root()}: run "
                    "`kvedge build-native cpu` before pytest (README's test command does)", pytrace=False)
    return build


# -- a tiny model and a small prompt set, for the fake llama.cpp (unit) ---------------------------------------

@pytest.fixture
def tiny(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    rows = [{"id": f"h{i}", "prompt": t, "label": "harmful", "benchmark": "mini"} for i, t in enumerate(HARMFUL)]
    rows += [{"id": f"b{i}", "prompt": t, "label": "benign", "benchmark": "mini-safe"} for i, t in enumerate(BENIGN)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.fixture
def servers():
    """Loopback fakes of the servers kvedge talks to (tests/support/httpfakes.py), each started, all stopped
    after the test: `servers(kind, model, **kw)`."""
    started: list[FakeServer] = []

    def make(kind, model, **kw) -> FakeServer:
        s = FakeServer(kind, model, **kw)
        s.start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()
