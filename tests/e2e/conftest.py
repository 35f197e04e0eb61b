"""Every test in tests/e2e is marked `e2e` here, by folder, so none can be left out of the marker:
`pytest -m e2e` (or `pytest tests/e2e`) runs this tier, `pytest -m "not e2e"` the unit tier."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.e2e)
