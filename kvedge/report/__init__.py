"""Renderings of kvedge's reports, one module per report kind (audit, pcr, sweep, compare), and the one
writer that puts a report on disk: its JSON, Markdown and self-contained HTML, side by side. A report is a
typed result (kvedge.results) or, for the kinds not yet typed, a dict.

The renderers of a kind are found from the report's `schema` (`kvedge.audit/1` -> audit), so every
command writes its three files the same way, and a new kind registers its two renderers in `_KINDS`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import KvedgeError
from ..io import atomic_write_text
from ..results import Result

# schema name -> (module, Markdown renderer, HTML renderer)
_KINDS = {
    "kvedge.audit": ("audit", "render_markdown", "render_html"),
    "kvedge.pcr": ("pcr", "render_markdown", "render_html"),
    "kvedge.sweep": ("sweep", "render_sweep_markdown", "render_html"),
    "kvedge.compare": ("compare", "render_markdown", "render_html"),
    "kvedge.verify": ("mitigate", "render_verify_markdown", "render_html"),
}
# kinds whose renderers take the typed result (kvedge.results): a dict of that kind is read into it first
_TYPED = {
    "kvedge.pcr": ("kvedge.results.pcr", "PcrResult"),
    "kvedge.sweep": ("kvedge.results.pcr", "SweepResult"),
}


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    md: Path
    html: Path

    def __iter__(self):
        return iter((self.json, self.md, self.html))


def _kind(report: Any) -> str:
    schema = report.get("schema", "") if isinstance(report, dict) else getattr(report, "schema", "")
    return str(schema).split("/")[0]


def renderers(report: Any):
    module, md, page = _KINDS[_kind(report)]
    mod = importlib.import_module(f"{__name__}.{module}")
    return getattr(mod, md), getattr(mod, page)


def _for_renderers(report: Any) -> Any:
    """What the kind's renderers take: the typed result for the kinds in _TYPED, else the dict."""
    typed = _TYPED.get(_kind(report))
    if typed is None:
        return report.to_dict() if isinstance(report, Result) else report
    if isinstance(report, Result):
        return report
    return getattr(importlib.import_module(typed[0]), typed[1]).from_dict(report)


def write_reports(report: dict[str, Any] | Result, out_dir: Path, name: str) -> ReportFiles:
    """`name`.json, `name`.md and `name`.html in `out_dir`, each written atomically. `report` is a typed
    result (its `to_dict()` is the JSON) or a report dict. Everything is rendered before the first file is
    written, so a renderer's failure leaves the old files whole."""
    render_md, render_html = renderers(report)
    doc = report.to_dict() if isinstance(report, Result) else report
    text = json.dumps(doc, indent=2) + "\n"
    arg = _for_renderers(report)
    md, page = render_md(arg), render_html(arg)
    files = ReportFiles(*(Path(out_dir) / f"{name}.{ext}" for ext in ("json", "md", "html")))
    for path, body in zip(files, (text, md, page)):
        atomic_write_text(path, body)
    return files


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> Path:
    """One JSON object a line (attempts.jsonl), written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return Path(path)


def read_document(path: Path, schema: str, error: type[KvedgeError], missing: str) -> dict[str, Any]:
    """A JSON document kvedge wrote, whose `schema` starts with `schema`; `error(...)` otherwise, with
    `missing` as the advice when the file is not there."""
    if not path.is_file():
        raise error(f"no {path.name} in {path.parent}: {missing}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not a kvedge document: {exc}") from None
    found = doc.get("schema") if isinstance(doc, dict) else None
    if not str(found or "").startswith(schema):
        raise error(f"{path} is not a {schema} document (schema {found!r})")
    return doc
