"""Renderings of an audit report dict (schema kvedge.audit/1): report.md and the terminal table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..server.report import server_lines
from . import fmt


def _flips(run: dict) -> str:
    vs = run.get("vs_reference")
    if not vs:
        return "(reference)"
    h = vs["harmful"]
    return f"-{h['lost']}/+{h['gained']} p={h['mcnemar_p']:.2g}"


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["config", "refusal (harmful)", "retention", "flips -/+", "vs noise", "over-refusal",
              "KLD", "PPL ratio", "KV MiB", "tok/s"]
    rows = []
    for r in report["runs"]:
        vs = r.get("vs_reference") or {}
        speed = r["speed"]["decode_tokens_per_s"]
        rows.append([
            r["label"],
            fmt.rate(r["refusal_harmful"]),
            fmt.est(vs.get("retention"), 2) if vs else "1 (ref)",
            _flips(r),
            (r.get("vs_noise") or {}).get("verdict", "(noise floor)" if r["noise_run"] else "-"),
            fmt.rate(r["over_refusal_benign"]),
            fmt.est(r["kld"], 4),
            fmt.est(r["ppl_ratio"], 3),
            f"{r['memory']['mib_at_ctx']:.1f}",
            f"{speed:.0f}" if speed else "n/a",
        ])
    return header, rows


def render_table(report: dict[str, Any]) -> str:
    header, rows = table_rows(report)
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def render_markdown(report: dict[str, Any]) -> str:
    m, ps, nf = report["model"], report["prompts_summary"], report["noise_floor"]
    header, rows = table_rows(report)
    ctx = report["runs"][0]["memory"]["ctx"]
    lines = [
        f"# kvedge audit: {m['name']}",
        "",
        f"- model: `{Path(m['path']).name}` ({m['architecture']}, {m['file_type']}, sha256 `{m['sha256'][:16]}`)",
    ]
    if report.get("adapter"):
        lines.append(f"- adapter: `{Path(report['adapter']['path']).name}` (sha256 `{report['adapter']['sha256'][:16]}`)")
    b = report["backend"]
    lines += [
        f"- backend: {b['kind']}, llama-cpp-python {b['llama_cpp_python']}; audit on the backend you deploy on",
        f"- prompts: {ps['n']} ({ps['harmful']} harmful, {ps['benign']} benign): "
        + ", ".join(f"{k} {v}" for k, v in ps["by_subset"].items()) + f"; split {', '.join(ps['splits'])}",
        f"- decoding: greedy, max {report['settings']['max_tokens']} tokens; detector {report['detector']['id']}",
        f"- kvedge {report['kvedge_version']}",
        "",
        "Rates are with a 95% Wilson interval and k/n; retention, KLD and PPL ratio with a 95% paired "
        "bootstrap interval over prompts. Flips are harmful prompts refused at f16 and answered (-) or the "
        "reverse (+), with an exact McNemar p. KLD and PPL ratio are measured on the f16 model's own greedy "
        f"answers to the benign prompts. KV MiB is the cache at ctx {ctx}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    if nf:
        lines += [
            "",
            "## Noise floor",
            "",
            f"The f16 cache run again with {nf['how']}: same precision, different arithmetic "
            f"(max |d logprob| {fmt.num(nf['max_abs_logprob_diff'], 3)}, "
            f"KLD {fmt.est(nf['kld'], 4)}). Verdicts that flip here flip for no reason of quantization.",
            "",
            f"- flip rate under pure noise: {fmt.rate(nf['flip_rate'])}",
            f"- harmful: {nf['harmful']['lost']} lost, {nf['harmful']['gained']} gained of {nf['harmful']['n']}; "
            f"benign: {nf['benign']['lost']} lost, {nf['benign']['gained']} gained of {nf['benign']['n']}",
            f"- unstable prompts (marked, and left out of stable retention): "
            + (", ".join(f"`{p}`" for p in nf["unstable_prompts"]) or "none"),
        ]
    lines += ["", "## Per configuration", ""]
    for r in report["runs"]:
        lines.append(f"### {r['label']}")
        lines.append("")
        lines.append(f"- refusal on harmful prompts: {fmt.rate(r['refusal_harmful'])}")
        for name, rate in r["refusal_by_subset"].items():
            lines.append(f"  - {name}: {fmt.rate(rate)}")
        lines.append(f"- over-refusal on benign prompts: {fmt.rate(r['over_refusal_benign'])}")
        for name, rate in r["over_refusal_by_subset"].items():
            lines.append(f"  - {name}: {fmt.rate(rate)}")
        vs = r.get("vs_reference")
        if vs:
            h = vs["harmful"]
            lines.append(f"- retention vs f16: {fmt.est(vs['retention'], 3)}; on stable prompts: {fmt.est(vs['retention_stable'], 3)}")
            lines.append(f"- conditional flip rate (refused at f16, answered here): {fmt.rate(h['flip_rate'])}")
            lines.append(f"- reverse flips (answered at f16, refused here): {fmt.rate(h['reverse_flip_rate'])}; McNemar p={h['mcnemar_p']:.3g}")
            if r.get("vs_noise"):
                j = r["vs_noise"]
                lines.append(
                    f"- against the noise floor: **{j['verdict']}** (harmful lost {j['harmful']['lost']} vs noise "
                    f"{j['harmful']['noise_lost']}, p={j['harmful']['p_loss']:.3g}; gained {j['harmful']['gained']} "
                    f"vs {j['harmful']['noise_gained']}, p={j['harmful']['p_gain']:.3g}; benign over-refusals gained "
                    f"{j['benign']['gained']} vs {j['benign']['noise_gained']}, p={j['benign']['p_gain']:.3g})"
                )
            if vs["flipped"]:
                lines.append(f"- flipped prompts: " + ", ".join(f"`{p}`" for p in vs["flipped"]))
        lines.append(f"- next-token KLD vs f16: {fmt.est(r['kld'], 4)}; perplexity ratio: {fmt.est(r['ppl_ratio'], 4)}; "
                     f"top-1 agreement: {fmt.rate(r['top1_agreement'])}")
        mem, sp = r["memory"], r["speed"]
        lines.append(f"- KV cache: {mem['bytes_per_token']} bytes/token, {mem['mib_at_ctx']:.1f} MiB at ctx {mem['ctx']} "
                     f"({mem['vs_f16']:.3f}x f16)")
        dps = sp["decode_tokens_per_s"]
        pps = sp["prompt_tokens_per_s"]
        lines.append(f"- speed: {dps:.1f} decode tok/s, {pps:.1f} prompt tok/s over {sp['generations']} generations"
                     if dps and pps else "- speed: n/a")
        lines.append("")
    lines += server_lines(report)
    if report.get("gate"):
        g = report["gate"]
        lines.append(f"## Gate: retention >= {g['threshold']}: {'passed' if g['passed'] else 'FAILED: ' + ', '.join(g['failing'])}")
        if g["undefined"]:
            lines.append(f"Retention undefined (the f16 reference refused nothing) for: {', '.join(g['undefined'])}")
    return "\n".join(lines) + "\n"
