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
from ..results import Result, plain

# schema name -> (module, Markdown renderer, HTML renderer)
_KINDS = {
    "kvedge.audit": ("audit", "render_markdown", "render_html"),
    "kvedge.pcr": ("pcr", "render_markdown", "render_html"),
    "kvedge.sweep": ("sweep", "render_sweep_markdown", "render_html"),
    "kvedge.compare": ("compare", "render_markdown", "render_html"),
    "kvedge.verify": ("mitigate", "render_verify_markdown", "render_html"),
    "kvedge.server-check": ("mitigate", "render_server_check_markdown", "render_server_check_html"),
}
# schema name -> the typed result (kvedge.results) its renderers take: a dict of that kind is read into it
_TYPED = {
    "kvedge.audit": ("kvedge.results.audit", "AuditReport"),
    "kvedge.pcr": ("kvedge.results.pcr", "PcrResult"),
    "kvedge.sweep": ("kvedge.results.pcr", "SweepResult"),
    "kvedge.compare": ("kvedge.results.compare", "CompareResult"),
    "kvedge.verify": ("kvedge.results.verify", "VerifyReport"),
    "kvedge.server-check": ("kvedge.results.verify", "ServerCheck"),
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


def _typed(report: Any) -> Result:
    """The typed result of a report: itself, or a report dict read into its kind's result type."""
    if isinstance(report, Result):
        return report
    module, name = _TYPED[_kind(report)]
    return getattr(importlib.import_module(module), name).from_dict(report)


def write_reports(report: Result | dict[str, Any], out_dir: Path, name: str) -> ReportFiles:
    """`name`.json, `name`.md and `name`.html in `out_dir`, each written atomically. `report` is a typed
    result (its `to_dict()` is the JSON, and the renderers read it) or its JSON document. Everything is
    rendered before the first file is written, so a renderer's failure leaves the old files whole."""
    typed = _typed(report)
    render_md, render_html = renderers(typed)
    text = json.dumps(typed.to_dict(), indent=2) + "\n"
    md, page = render_md(typed), render_html(typed)
    files = ReportFiles(*(Path(out_dir) / f"{name}.{ext}" for ext in ("json", "md", "html")))
    for path, body in zip(files, (text, md, page)):
        atomic_write_text(path, body)
    return files


def write_jsonl(rows: Iterable[Result | dict[str, Any]], path: Path) -> Path:
    """One JSON object a line (attempts.jsonl), written atomically."""
    atomic_write_text(path, "".join(json.dumps(plain(r), ensure_ascii=False) + "\n" for r in rows))
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
