"""Renderings of what a server audit adds to report.json (`servers`, and per run where it ran and who
answered): the Markdown section of report.md and the terminal lines after the table."""

from __future__ import annotations

from ..results.audit import AuditReport
from .fmt import md_table


def _mark(setting: dict) -> str:
    return setting["source"].split(":", 1)[0]


def _shown(setting: dict) -> str:
    """`q4_0 (stated)`, `on (implied)`, `? (unknown)`: a value and how kvedge knows it."""
    v = setting["value"]
    if v is None and _mark(setting) == "not applicable":
        return "n/a"
    value = "?" if v is None else "on" if v is True else "off" if v is False else str(v)
    return f"{value} ({_mark(setting)})"


def server_lines(report: AuditReport) -> list[str]:
    """Markdown lines for report.md (empty for an in-process audit)."""
    servers = report.servers
    if not servers:
        return []
    lines = ["", "## Servers", "",
             "Each setting as the server reported it (observed), as you stated it, or as it follows from another; "
             "what is neither is unknown.", "",
             *md_table(["server", "kind", "run", "answered", "model", "adapter", "build", "n_ctx", "K / V", "rotation",
                        "flash attn", "slots"],
                       [[s["url"], s["kind"], s["run"], str(s["answered"]), *(_shown(s["settings"][k]) for k in (
                           "model", "adapter", "build", "n_ctx")),
                         f"{s['settings']['type_k']['value'] or '?'} / {s['settings']['type_v']['value'] or '?'} "
                         f"({_mark(s['settings']['type_k'])})",
                         *(_shown(s["settings"][k]) for k in ("rotation", "flash_attn", "slots"))] for s in servers]),
             ""]
    for s in servers:
        if s["facts"].get("model_check"):
            lines.append(f"- {s['url']}: model check: {s['facts']['model_check']}")
    for r in report.runs:
        if r.where == "server":
            m = r.prompt_tokens_match
            lines.append(f"- {r.label}: {r.request}; the server counted the prompt's tokens as kvedge did for "
                         f"{m.k}/{m.n}; {r.retried} requests retried; speed by {r.speed.clock}")
            if r.margin_note:
                lines.append(f"  - first-token refusal margin: {r.margin_note}")
        elif r.where == "in-process":
            lines.append(f"- {r.label}: run in this process (llama-cpp-python {report.backend['llama_cpp_python']})")
    if report.noise_floor_note:
        lines.append(f"- noise floor: {report.noise_floor_note}")
    note = next((r.kld_note for r in report.runs if r.kld_note), None)
    if note:
        lines.append(f"- KLD and perplexity ratio: {note}")
    return lines


def server_summary(report: AuditReport) -> list[str]:
    """Terminal lines after the table: where each run ran and what each server's settings rest on."""
    out = []
    for s in report.servers or []:
        st = s["settings"]
        parts = [f"{k} {_shown(st[k])}" for k in ("type_k", "type_v", "rotation", "flash_attn", "n_ctx", "build")]
        out.append(f"server {s['url']} ({s['kind']}): {s['run']}, {s['answered']} answers; " + ", ".join(parts))
    local = [r.label for r in report.runs if r.where == "in-process"]
    if report.servers and local:
        out.append(f"in this process: {', '.join(local)}")
    return out
