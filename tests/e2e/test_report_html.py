"""The real default audit's report.html opened in a real headless Chromium. What an audit writes beside
report.json, on a fake llama.cpp: tests/unit/test_report_html.py."""

from __future__ import annotations

import os
from pathlib import Path

from support.browser import browser_or_skip, load


def test_default_audit_report_in_a_headless_browser(small_audit, tmp_path):
    """The real default audit's report.html in Chromium: it loads with no console error, asks for nothing
    but itself, shows every plot, fits a phone's width, and prints."""
    binary = browser_or_skip()
    html_path = small_audit["out"] / "report.html"
    desktop = load(html_path, width=1000, height=1400, binary=binary)
    assert desktop.errors == []
    assert desktop.requests == [html_path.resolve().as_uri()]
    assert desktop.figures == 3 and desktop.plots == 3
    assert desktop.title.startswith("kvedge audit:")
    assert desktop.pdf.startswith(b"%PDF") and len(desktop.pdf) > 20_000
    assert desktop.screenshot.startswith(b"\x89PNG") and len(desktop.screenshot) > 20_000
    phone = load(html_path, width=390, height=844, binary=binary, pdf=False)
    assert phone.errors == [] and phone.plots == 3 and phone.overflow_px == 0
    shot = Path(os.environ.get("KVEDGE_SCREENSHOT", tmp_path / "report.png"))
    shot.write_bytes(desktop.screenshot)
