"""Renderings of kvedge's report dicts, one module per report kind (audit, pcr, sweep, compare), and the
one writer that puts a report's JSON and Markdown on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..errors import KvedgeError


def write_pair(report: dict[str, Any], markdown: str, out_dir: Path, name: str) -> tuple[Path, Path]:
    """`name`.json and `name`.md in `out_dir`, each written atomically."""
    jp, mp = Path(out_dir) / f"{name}.json", Path(out_dir) / f"{name}.md"
    atomic_write_text(jp, json.dumps(report, indent=2) + "\n")
    atomic_write_text(mp, markdown)
    return jp, mp


def read_document(path: Path, schema: str, error: type[KvedgeError], missing: str) -> dict[str, Any]:
    """A JSON document kvedge wrote, whose `schema` starts with `schema`; `error(...)` otherwise, with
    `missing` as the advice when the file is not there."""
    if not path.is_file():
        raise error(f"no {path.name} at {path}: {missing}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not a kvedge document: {exc}") from None
    found = doc.get("schema") if isinstance(doc, dict) else None
    if not str(found or "").startswith(schema):
        raise error(f"{path} is not a {schema} document (schema {found!r})")
    return doc
