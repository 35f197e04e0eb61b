"""Renderings of an audit's report (kvedge.results.audit.AuditReport, schema kvedge.audit/1): report.md,
report.html and the terminal table."""

from __future__ import annotations

from pathlib import Path

from ..llama.applied import AppliedRotation
from ..results.audit import AuditReport, RunResult
from ..stats import wilson
from . import fmt, html, plots
from .server import server_lines


def _flips(run: RunResult) -> str:
    """Refusals lost/gained against f16, harmful and benign prompts."""
    vs = run.vs_reference
    if not vs:
        return "(reference)"
    return f"-{vs.harmful.lost}/+{vs.harmful.gained}, -{vs.benign.lost}/+{vs.benign.gained}"


def _verdict(r: RunResult) -> str:
    if r.verdict:
        return r.verdict.verdict
    return "(reference)" if r.reference else "(noise floor)" if r.noise_run else "-"


def _shift(r: RunResult, population: str) -> str:
    if r.reference:
        return "(reference)"
    if r.margin is None:
        return "not available"
    return fmt.est(getattr(r.margin, f"shift_{population}"), 2, signed=True)


def answer_lines(report: AuditReport) -> list[str]:
    """The answer, one line a configuration: its verdict in words with the evidence that decided it, and
    a warning where llama.cpp applied another rotation than the one asked for."""
    return [r.verdict.line for r in report.runs if r.verdict] + [
        f"{r.label}: {r.rotation_note}" for r in report.runs if r.rotation_note]


def rotation_applied(r: RunResult) -> str:
    """The attention rotation asked for and the one llama.cpp says it applied, per cache side."""
    asked = "not applicable (f16 cache)" if r.rotation is None else "on" if r.rotation else "off"
    if r.applied_rotation is None:
        told = "not observable (a server)" if r.where == "server" else "not recorded"
    else:
        told = AppliedRotation.from_dict(r.applied_rotation).words()
    return f"asked {asked}; applied by llama.cpp: {told}"


def table_rows(report: AuditReport) -> tuple[list[str], list[list[str]]]:
    header = ["config", "verdict", "refusal (harmful)", "over-refusal", "margin shift harmful",
              "margin shift benign", "flips -/+", "KLD", "PPL ratio", "KV MiB", "tok/s"]
    rows = []
    for r in report.runs:
        speed = r.speed.decode_tokens_per_s
        rows.append([
            r.label,
            _verdict(r),
            fmt.rate(r.refusal_harmful),
            fmt.rate(r.over_refusal_benign),
            _shift(r, "harmful"),
            _shift(r, "benign"),
            _flips(r),
            fmt.est(r.kld, 4),
            fmt.est(r.ppl_ratio, 3),
            f"{r.memory.mib_at_ctx:.1f}",
            f"{speed:.0f}" if speed else "n/a",
        ])
    return header, rows


def render_table(report: AuditReport) -> str:
    header, rows = table_rows(report)
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def render_markdown(report: AuditReport) -> str:
    m, ps, nf = report.model, report.prompts_summary, report.noise_floor
    header, rows = table_rows(report)
    ctx = report.runs[0].memory.ctx
    lines = [f"# kvedge audit: {m.name}", ""]
    answers = answer_lines(report)
    if answers:
        lines += ["## Answer", "", *(f"- {a}" for a in answers), "", _equivalence_note(report), ""]
    lines += [
        f"- model: `{Path(m.path).name}` ({m.architecture}, {m.file_type}, sha256 `{m.sha256[:16]}`)",
    ]
    if report.adapter:
        lines.append(f"- adapter: `{Path(report.adapter.path).name}` (sha256 `{report.adapter.sha256[:16]}`)")
    b = report.backend
    lib = b.get("library") or {}
    native = (f", kvedge's native build (llama.cpp {lib.get('llama_cpp_commit')}, per-layer patch "
              f"{str(lib.get('patch_sha256'))[:12]})" if lib.get("kind") == "native" else "")
    lines += [
        f"- backend: {b['kind']}, llama-cpp-python {b['llama_cpp_python']}{native}; audit on the backend you deploy on",
        f"- prompts: {ps.n} ({ps.harmful} harmful, {ps.benign} benign): "
        + ", ".join(f"{k} {v}" for k, v in ps.by_subset.items()) + f"; split {', '.join(ps.splits)}",
        *(["- skipped, longer than the context (no room for an answer): "
           + ", ".join(f"`{x['id']}` ({x['n_prompt_tokens']} tokens)" for x in ps.skipped_too_long)]
          if ps.skipped_too_long else []),
        f"- decoding: greedy, max {report.settings.max_tokens} tokens; detector {report.detector.id}",
        f"- kvedge {report.kvedge_version}",
        "",
        "Rates are with a 95% Wilson interval and k/n; margin shifts, KLD and PPL ratio with a 95% paired "
        "bootstrap interval over prompts. The margin is the first-token refusal margin (log-odds, in nats, of "
        "opening the answer as a refusal rather than as compliance); its shift is the mean paired change "
        "against f16, positive toward refusal. Flips are refusals lost (-) and gained (+) against f16, harmful "
        "prompts then benign. KLD and PPL ratio are measured on the f16 model's own greedy answers to the "
        f"benign prompts. KV MiB is the cache at ctx {ctx}.",
        "",
        *fmt.md_table(header, rows),
    ]
    if nf:
        lines += [
            "",
            "## Noise floor",
            "",
            f"The f16 cache run again with {nf.how}: same precision, different arithmetic "
            f"(max |d logprob| {fmt.num(nf.max_abs_logprob_diff, 3)}, "
            f"KLD {fmt.est(nf.kld, 4)}). Verdicts that flip here flip for no reason of quantization.",
            "",
            f"- flip rate under pure noise: {fmt.rate(nf.flip_rate)}",
            f"- harmful: {nf.harmful.lost} lost, {nf.harmful.gained} gained of {nf.harmful.n}; "
            f"benign: {nf.benign.lost} lost, {nf.benign.gained} gained of {nf.benign.n}",
            "- unstable prompts (marked, and left out of stable retention): "
            + (", ".join(f"`{p}`" for p in nf.unstable_prompts) or "none"),
        ]
    lines += ["", "## Per configuration", ""]
    for r in report.runs:
        lines.append(f"### {r.label}")
        lines.append("")
        lines.append(f"- refusal on harmful prompts: {fmt.rate(r.refusal_harmful)}")
        for name, rate in r.refusal_by_subset.items():
            lines.append(f"  - {name}: {fmt.rate(rate)}")
        lines.append(f"- over-refusal on benign prompts: {fmt.rate(r.over_refusal_benign)}")
        for name, rate in r.over_refusal_by_subset.items():
            lines.append(f"  - {name}: {fmt.rate(rate)}")
        vs = r.vs_reference
        if vs:
            h = vs.harmful
            lines.append(f"- retention vs f16: {fmt.est(vs.retention, 3)}; on stable prompts: {fmt.est(vs.retention_stable, 3)}")
            lines.append(f"- conditional flip rate (refused at f16, answered here): {fmt.rate(h.flip_rate)}")
            lines.append(f"- reverse flips (answered at f16, refused here): {fmt.rate(h.reverse_flip_rate)}; McNemar p={h.mcnemar_p:.3g}")
            if r.vs_noise:
                j = r.vs_noise
                lines.append(
                    f"- against the noise floor: **{j.verdict}** (harmful lost {j.harmful.lost} vs noise "
                    f"{j.harmful.noise_lost}, p={j.harmful.p_loss:.3g}; gained {j.harmful.gained} "
                    f"vs {j.harmful.noise_gained}, p={j.harmful.p_gain:.3g}; benign over-refusals gained "
                    f"{j.benign.gained} vs {j.benign.noise_gained}, p={j.benign.p_gain:.3g})"
                )
            if vs.flipped:
                lines.append("- flipped prompts: " + ", ".join(f"`{p}`" for p in vs.flipped))
        lines += _margin_lines(r)
        lines.append(f"- attention rotation: {rotation_applied(r)}")
        lines.append(f"- next-token KLD vs f16: {fmt.est(r.kld, 4)}; perplexity ratio: {fmt.est(r.ppl_ratio, 4)}; "
                     f"top-1 agreement: {fmt.rate(r.top1_agreement)}")
        mem, sp = r.memory, r.speed
        lines.append(f"- KV cache: {mem.bytes_per_token} bytes/token, {mem.mib_at_ctx:.1f} MiB at ctx {mem.ctx} "
                     f"({mem.vs_f16:.3f}x f16)")
        dps = sp.decode_tokens_per_s
        pps = sp.prompt_tokens_per_s
        lines.append(f"- speed: {dps:.1f} decode tok/s, {pps:.1f} prompt tok/s over {sp.generations} generations"
                     if dps and pps else "- speed: n/a")
        lines.append("")
    lines += server_lines(report)
    if report.gate:
        g = report.gate
        lines.append(f"## Gate: retention >= {g.threshold}: {'passed' if g.passed else 'FAILED: ' + ', '.join(g.failing)}")
        if g.undefined:
            lines.append(f"Retention undefined (the f16 reference refused nothing) for: {', '.join(g.undefined)}")
    return "\n".join(lines) + "\n"


def _equivalence_note(report: AuditReport) -> str:
    eq = report.equivalence
    return ("A configuration is equivalent when, for harmful and benign prompts apart, its verdict flips are "
            "within the noise floor and the 95% interval of its mean margin shift lies inside "
            f"+-{eq.delta:.2f} nats ({eq.source}); it over-refuses or loses refusals when a population is shown to "
            "move toward or away from refusal; otherwise it is inconclusive on these prompts.")


def _margin_lines(r: RunResult) -> list[str]:
    if r.margin is None:
        return ["- first-token refusal margin: not available (no margin could be read for this run)"]
    m = r.margin
    out = [f"- first-token refusal margin: harmful {fmt.est(m.harmful, 2, signed=True)}, benign "
           f"{fmt.est(m.benign, 2, signed=True)}" + (f" ({m.missing} prompts without one)" if m.missing else "")]
    if m.shift_harmful is not None:
        out.append(f"- margin shift vs f16: harmful {fmt.est(m.shift_harmful, 3, signed=True)}, benign "
                   f"{fmt.est(m.shift_benign, 3, signed=True)}")
        out += [f"  - {s}: {fmt.est(e, 3, signed=True)} (n={e.n})" for s, e in (m.shift_by_subset or {}).items()]
    if r.verdict:
        v = r.verdict
        out.append(f"- verdict: **{v.verdict}**" + "".join(
            f"; {c.population}: {c.direction} (flips {c.flips})" for c in (v.harmful, v.benign)))
    return out


def _noise_half_widths(report: AuditReport) -> tuple[float, float] | None:
    """How far pure arithmetic moved verdicts, per group (harmful, benign): the 95% Wilson upper bound of
    the share of that group's verdicts that flipped between the two f16 runs. None without a noise run."""
    nf = report.noise_floor
    if not nf:
        return None
    return tuple(wilson(g.lost + g.gained, g.n).hi or 0.0 for g in (nf.harmful, nf.benign))


def _flip_cards(report: AuditReport) -> list[str]:
    labels = [r.label for r in report.runs]
    ref = report.reference.label
    cards = []
    for p in report.prompts:
        if p.answers is None:
            continue
        boxes = [html.answer_box(lab, p.refused[lab], p.rule[lab], p.answers[lab],
                                 p.refused[lab] != p.refused[ref]) for lab in labels]
        tags = [p.subset, "harmful" if p.harmful else "benign"] + (["unstable under noise"] if p.unstable else [])
        cards.append(f"<div class=\"flip\"><h3><code>{html.esc(p.id)}</code> ({html.esc(', '.join(tags))})</h3>"
                     f"<div class=\"prompt\">{html.esc(p.text)}</div>"
                     f"<div class=\"pair\">{''.join(boxes)}</div></div>")
    return cards


def render_html(report: AuditReport) -> str:
    """report.html: the audit's figures, table and flipped prompts, from the same result as report.md."""
    m, ps, nf, det = report.model, report.prompts_summary, report.noise_floor, report.detector
    runs = report.runs
    labels = [r.label for r in runs]
    ref = report.reference
    hw = _noise_half_widths(report)
    b = report.backend
    meta = [f"model <code>{html.esc(Path(m.path).name)}</code> ({html.esc(m.architecture)}, "
            f"{html.esc(m.file_type)}, sha256 <code>{html.esc(m.sha256[:16])}</code>)"]
    if report.adapter:
        meta.append(f"adapter <code>{html.esc(Path(report.adapter.path).name)}</code>")
    meta += [
        f"backend {html.esc(b['kind'])}, llama-cpp-python {html.esc(b['llama_cpp_python'])}",
        f"{ps.n} prompts ({ps.harmful} harmful, {ps.benign} benign): "
        + html.esc(", ".join(f"{k} {v}" for k, v in ps.by_subset.items())) + f"; split {html.esc(', '.join(ps.splits))}",
        f"greedy, max {report.settings.max_tokens} tokens; verdicts by detector <strong>{html.esc(det.id)}</strong>",
    ]
    header, rows = table_rows(report)
    answers = answer_lines(report)
    sections = [html.section("Answer", html.bullets([html.esc(a) for a in answers]),
                             html.para(html.esc(_equivalence_note(report)), "note"))] if answers else []
    sections += [html.section(
        "Summary", html.table(header, rows),
        html.para("Rates with a 95% Wilson interval and k/n; margin shifts, KLD and PPL ratio with a 95% paired "
                  "bootstrap interval over prompts. The margin shift is the mean paired change of the first-token "
                  "refusal margin against f16 (nats, positive toward refusal). Flips: refusals lost (-) and gained "
                  "(+) against f16, harmful prompts then benign. KLD and PPL ratio are measured on the f16 model's "
                  "own greedy answers to the benign prompts.", "note"))]

    def band_note(centre: str) -> str:
        if not nf:
            return "No noise run (--noise none), so no noise band."
        return (f"The grey band is the noise floor: {centre} plus or minus the 95% upper bound of the share of the "
                f"group's verdicts that flipped when only the arithmetic changed ({html.esc(nf.how)}).")
    pct = lambda x: 100 * x  # noqa: E731
    rate_panels = [
        ("Refusal of harmful prompts (higher is safer)", [plots.Interval.of(r.refusal_harmful, 100) for r in runs],
         (pct(ref.refusal_harmful.rate - hw[0]), pct(ref.refusal_harmful.rate + hw[0]))
         if hw and ref.refusal_harmful.rate is not None else None),
        ("Over-refusal of benign prompts (lower is better)", [plots.Interval.of(r.over_refusal_benign, 100) for r in runs],
         (pct(ref.over_refusal_benign.rate - hw[1]), pct(ref.over_refusal_benign.rate + hw[1]))
         if hw and ref.over_refusal_benign.rate is not None else None),
    ]
    sections.append(html.section("Refusal and over-refusal per configuration", html.figure(
        plots.rates(labels, rate_panels, "rates", "Refusal and over-refusal per configuration"), "rates",
        "Each configuration's refusal rate on harmful prompts and over-refusal rate on benign ones, with 95% "
        "Wilson intervals. " + band_note("the f16 reference's rate"))))

    silent_points = [(r.label, plots.Interval.of(r.kld), plots.Interval.of(r.ppl_ratio),
                      plots.Interval.of(r.vs_reference.refusal_change if r.vs_reference else None, 100),
                      plots.Interval.of(r.vs_reference.over_refusal_change if r.vs_reference else None, 100))
                     for r in runs]
    sections.append(html.section("Would perplexity have told you?", html.figure(
        plots.silent(silent_points, (pct(hw[0]), pct(hw[1])) if hw else (0.0, 0.0), "silent",
                     "Refusal change against KLD and perplexity ratio"), "silent",
        "One point per configuration: the change in refusals (percentage points against f16, 95% paired bootstrap "
        "interval) against the next-token KLD and the perplexity ratio the usual check reports. A point far from "
        "zero at a small KLD or PPL ratio is a change perplexity would not have shown. " + band_note("no change"))))

    ref_rate = ref.refusal_harmful.rate
    mem_points = [(r.label, r.memory.mib_at_ctx,
                   plots.Interval(1.0) if r.reference else plots.Interval.of(r.vs_reference.retention))
                  for r in runs]
    mem_band = (1 - hw[0] / ref_rate, 1 + hw[0] / ref_rate) if hw and ref_rate else None
    sections.append(html.section("Memory and retention", html.figure(
        plots.memory(mem_points, mem_band, "memory", "KV cache memory against refusal retention"), "memory",
        f"KV cache size at ctx {runs[0].memory.ctx} against refusal retention (refusals kept relative to f16, "
        "95% paired bootstrap interval). " + band_note("a retention of 1, relative to the f16 refusal rate"))))

    if nf:
        sections.append(html.section("Noise floor", html.bullets([
            f"f16 run again with {html.esc(nf.how)}: same precision, different arithmetic (max |d logprob| "
            f"{fmt.num(nf.max_abs_logprob_diff, 3)}, KLD {fmt.est(nf.kld, 4)})",
            f"flip rate under pure noise: {fmt.rate(nf.flip_rate)}",
            f"harmful: {nf.harmful.lost} lost, {nf.harmful.gained} gained of {nf.harmful.n}; "
            f"benign: {nf.benign.lost} lost, {nf.benign.gained} gained of {nf.benign.n}",
            "unstable prompts: " + (", ".join(f"<code>{html.esc(p)}</code>" for p in nf.unstable_prompts) or "none"),
        ])))

    sections.append(html.section("Attention rotation", html.table(
        ["config", "rotation"], [[r.label, rotation_applied(r)] for r in runs]),
        html.para("What kvedge asked llama.cpp for, and what llama.cpp's log says it applied to each cache side "
                  "when it made the run's context (it rotates only a quantized side whose head size is a multiple "
                  "of 64; builds before the rotation never rotate).", "note")))

    subsets = list(dict.fromkeys([*runs[0].refusal_by_subset, *runs[0].over_refusal_by_subset]))
    sub_rows = [[r.label, *[fmt.rate({**r.refusal_by_subset, **r.over_refusal_by_subset}[s]) for s in subsets]]
                for r in runs]
    sections.append(html.section("Refusal by benchmark", html.table(["config", *subsets], sub_rows),
                                 html.para("Refusal rate per prompt group (for benign groups: over-refusal).", "note")))

    cards = _flip_cards(report)
    sections.append(html.section(
        f"Prompts whose verdict changed ({len(cards)})",
        html.para("Every configuration's answer to each prompt whose verdict is not the same in all of them, side "
                  f"by side; the verdict and the rule of {html.esc(det.id)} that decided it.", "note"),
        *(cards or [html.para("None: every prompt got the same verdict in every configuration.")])))

    if report.gate:
        g = report.gate
        sections.append(html.section("Gate", html.para(
            f"retention &gt;= {g.threshold}: " + ("passed" if g.passed else "<strong>FAILED</strong>: "
                                                  + html.esc(", ".join(g.failing))))))
    footer = (f"kvedge {html.esc(report.kvedge_version)}; computed from the store <code>"
              f"{html.esc(report.settings.store)}</code>; figures drawn with matplotlib.")
    return html.page(f"kvedge audit: {m.name}", meta, sections, footer)
