"""Renderings of kvedge's report dicts, one module per report kind (audit, pcr, sweep, compare), and the
one writer that puts a report's JSON and Markdown on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text


def write_pair(report: dict[str, Any], markdown: str, out_dir: Path, name: str) -> tuple[Path, Path]:
    """`name`.json and `name`.md in `out_dir`, each written atomically."""
    jp, mp = Path(out_dir) / f"{name}.json", Path(out_dir) / f"{name}.md"
    atomic_write_text(jp, json.dumps(report, indent=2) + "\n")
    atomic_write_text(mp, markdown)
    return jp, mp
