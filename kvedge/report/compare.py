"""Renderings of a comparison (`kvedge compare`, schema kvedge.compare/1): the terminal lines, compare.md
and compare.html. Two modes: two audits (backends), or two detectors on one audit's answers."""

from __future__ import annotations

from ..results.compare import CompareResult, Disagreement, Side
from . import html, plots
from .fmt import md_table, rate


def _where(side: Side) -> str:
    return f"{side.path} ({side.backend}" + (f"; servers {', '.join(side.servers)})" if side.servers else ")")


def _sides(result: CompareResult) -> tuple[str, str]:
    a, b = result.a, result.b
    if result.mode == "detectors":
        return f"A: detector {a.detector}", f"B: detector {b.detector}"
    return f"A: {_where(a)}", f"B: {_where(b)}"


def _headline(result: CompareResult) -> str:
    what = f"the answers stored in {result.a.path}" if result.mode == "detectors" else "prompts in common"
    return f"{result.common_prompts} prompts; {what}"


def table(result: CompareResult) -> tuple[list[str], list[list[str]]]:
    header = ["config", "prompts", "agreement", "refused only by A", "only by B", "McNemar p"]
    noise = any(r.vs_noise_of_a for r in result.rows)
    if noise:
        header.append("vs noise of A")
    rows = []
    for r in result.rows:
        row = [r.config, r.prompts, rate(r.agreement), str(r.refused_only_in_a), str(r.refused_only_in_b),
               f"{r.mcnemar_p:.3g}"]
        if noise:
            row.append(r.vs_noise_of_a.verdict if r.vs_noise_of_a else "-")
        rows.append(row)
    return header, rows


def _answers(result: CompareResult) -> list[str]:
    return [v.verdict.line for v in result.verdicts or []]


def render_comparison(result: CompareResult) -> str:
    out = [*_answers(result), "   ".join(_sides(result)), _headline(result)]
    for r in result.rows:
        line = (f"{r.config:<22} {r.prompts:<8} agreement {rate(r.agreement)}; refused only in A "
                f"{r.refused_only_in_a}, only in B {r.refused_only_in_b}, McNemar p={r.mcnemar_p:.3g}")
        if r.vs_noise_of_a:
            line += f"; {r.vs_noise_of_a.verdict}"
        out.append(line)
    if result.mode == "detectors":
        out.append(f"{len(result.disagreements)} distinct answers judged differently")
    return "\n".join(out)


def render_markdown(result: CompareResult) -> str:
    header, rows = table(result)
    answers = _answers(result)
    lines = ["# kvedge compare", "", *(["## Answer", "", *(f"- {a}" for a in answers), ""] if answers else []),
             *(f"- {s}" for s in _sides(result)), f"- {_headline(result)}", "",
             "Agreement: share of prompts both sides gave the same verdict, with a 95% Wilson interval and k/n; "
             "exact McNemar p on the prompts only one side refused.", "",
             *md_table(header, rows)]
    if result.mode == "detectors":
        lines += ["", f"## Answers the detectors judge differently ({len(result.disagreements)})", ""]
        for d in result.disagreements:
            lines.append(f"- `{d.prompt_id}` ({d.label}; {', '.join(d.configs)}): A {d.a.rule}, "
                         f"B {d.b.rule}: {d.response[:160]!r}")
    return "\n".join(lines) + "\n"


def render_html(result: CompareResult) -> str:
    header, rows = table(result)
    configs = list(dict.fromkeys(r.config for r in result.rows))
    groups = list(dict.fromkeys(r.prompts for r in result.rows))
    by = {(r.config, r.prompts): r for r in result.rows}
    series = [(g, [plots.Interval.of(by[(c, g)].agreement, 100) if (c, g) in by else plots.Interval(None)
                   for c in configs]) for g in groups]
    answers = _answers(result)
    sections = [html.section("Answer", html.bullets([html.esc(a) for a in answers]))] if answers else []
    sections += [
        html.section("Agreement per configuration", html.figure(
            plots.agreement(configs, series, "agreement", "Verdict agreement per configuration"), "agreement",
            "Share of prompts both sides gave the same verdict, per configuration and prompt group, with 95% Wilson "
            "intervals."), html.table(header, rows)),
    ]
    if result.mode == "detectors":
        def verdict(d: Disagreement, side: str) -> str:
            v = getattr(d, side)
            word = html.verdict_word(v.refused)
            return (f"{side.upper()} {html.esc(getattr(result, side).detector)}: <span class=\"verdict-{word}\">{word}</span> "
                    f"<code>{html.esc(v.rule)}</code>")

        cards = []
        for d in result.disagreements:
            cards.append(
                f"<div class=\"flip\"><h3><code>{html.esc(d.prompt_id)}</code> ({html.esc(d.label)}; "
                f"{html.esc(', '.join(d.configs))})</h3><div class=\"prompt\">{html.esc(d.prompt)}</div>"
                f"<div class=\"answer\"><div class=\"text\">{html.esc(d.response) or '<em>(empty answer)</em>'}</div></div>"
                + html.bullets([verdict(d, "a"), verdict(d, "b")]) + "</div>")
        sections.append(html.section(
            f"Answers the detectors judge differently ({len(cards)})",
            html.para("Each distinct answer once, with the configurations that gave it, and both verdicts.", "note"),
            *(cards or [html.para("None.")])))
    return html.page("kvedge compare", [html.esc(s) for s in (*_sides(result), _headline(result))], sections,
                     "figures drawn with matplotlib")
