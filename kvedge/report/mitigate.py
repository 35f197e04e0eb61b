"""Renderings of the mitigation's documents: deploy.json (`kvedge.deploy/1`) as the export's terminal
summary and DEPLOY.md, and the verify report (`kvedge.verify/1`) as terminal lines and verify.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import fmt, html, plots


def _flips(m: dict | None) -> str:
    if not m:
        return "(reference)"
    h, b = m["harmful"], m["benign"]
    return f"-{h['lost']}/+{h['gained']} harmful, -{b['lost']}/+{b['gained']} benign"


def _noise(m: dict | None) -> str:
    if not m:
        return "-"
    v = m["vs_noise"]
    if v["within_noise"]:
        return "within noise"
    return "; ".join(f"{g} {v[g]['verdict']}" for g in ("harmful", "benign") if v[g]["verdict"] != "within noise")


def _candidate_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    header = ["candidate", "KV MiB", "flips vs f16", "vs noise", "meets target"]
    ctx = doc["deployment"]["launch"]["n_ctx"]
    rows = []
    for c in doc["decision"]["candidates"]:
        m = c["measured"]
        rows.append([c["label"] + (" (PCR's prescription)" if c["prescription"] else ""),
                     f"{c['kv_bytes_per_token'] * ctx / 2**20:.1f}",
                     _flips(m) if m else "not measured", _noise(m) if m else (c.get("not_measured") or "-"),
                     "-" if c["meets_target"] is None else "yes" if c["meets_target"] else "no"])
    return header, rows


def _smoothing_line(doc: dict) -> str | None:
    s = doc.get("smoothing")
    if not s:
        return None
    line = f"smoothing (simulation, calib prompts): {s['simulation']['reason']}"
    if s.get("self_check"):
        sc = s["self_check"]
        line += (f"; self-check {'passed' if sc['passed'] else 'FAILED'} (KLD {sc['patched']['kld']:.5f} vs noise "
                 f"{sc['noise']['kld']:.5f}, top-1 {sc['patched']['top1']:.3f} vs {sc['noise']['top1']:.3f})")
        widened = s["patch"]["model"]["tensors_widened"]
        delta = s["patch"]["model"]["size_delta_bytes"]
        line += f"; {len(widened)} tensors widened, file size {delta / 2**20:+.2f} MiB"
    return line


def export_lines(doc: dict[str, Any], out: Path) -> list[str]:
    d, dep, ev = doc["decision"], doc["deployment"], doc["evidence"]
    v = ev["pcr"]["verdict"]
    cal = ev["calib"]
    nf = cal["noise_floor"]
    lines = [f"kvedge export: unmitigated {doc['unmitigated']['label']}, target: {doc['target']['label']}",
             f"  PCR: {v['mode']} (carrier {v['carrier']}), layers {ev['pcr']['evidence_layers']}; "
             f"prescription: {d['prescription']['label']}"]
    sl = _smoothing_line(doc)
    if sl:
        lines.append("  " + sl)
    lines.append(f"  calib split: {cal['n_prompts']} prompts; f16 noise run flipped {fmt.rate(nf['flip_rate'])}")
    header, rows = _candidate_rows(doc)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    lines.append("    " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["    " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(f"  {'chosen' if d['qualified'] else 'NO CANDIDATE QUALIFIED'}: {dep['label']}, KV "
                 f"{dep['kv_mib_at_ctx']:.1f} MiB at ctx {dep['launch']['n_ctx']}; runner-up: {d['runner_up'] or '-'}")
    lines.append(f"  {d['reason']}")
    lines.append(f"  wrote {out}: {', '.join(sorted(n for n in doc['files'] if '/' not in n))}, deploy.json")
    lines.append(f"  next: kvedge verify {out}")
    return lines


def render_export_markdown(doc: dict[str, Any]) -> str:
    d, dep, ev = doc["decision"], doc["deployment"], doc["evidence"]
    L = dep["launch"]
    model = Path(dep["model"]["path"]).name
    header, rows = _candidate_rows(doc)
    out = [
        f"# kvedge deployment: {dep['label']}",
        "",
        f"- model: `{model}`" + (f" + adapter `{Path(dep['adapter']['path']).name}`" if dep.get("adapter") else ""),
        f"- KV cache: K {L['type_k']}, V {L['type_v']}, attention rotation {'on' if L['rotation'] else 'off'}, "
        f"flash attention on, context {L['n_ctx']}: {dep['kv_mib_at_ctx']:.1f} MiB "
        f"(unmitigated {doc['unmitigated']['label']}: {doc['unmitigated']['kv_mib_at_ctx']:.1f} MiB)",
        f"- rotation: {dep['rotation_requirement']}",
        f"- target: {doc['target']['label']}",
        f"- decision ({'met' if d['qualified'] else 'not met by any candidate'}): {d['reason']}",
        f"- PCR ({ev['pcr']['verdict']['mode']}, carrier {ev['pcr']['verdict']['carrier']}): "
        f"{ev['pcr']['verdict']['prescription']}",
    ]
    sl = _smoothing_line(doc)
    if sl:
        out.append(f"- {sl}")
    out += ["", f"## Candidates on the calib split ({ev['calib']['n_prompts']} prompts, greedy, "
            f"{ev['calib']['max_tokens']} tokens, detector {ev['calib']['detector']['id']})", "",
            *fmt.md_table(header, rows), "",
            "Flips are verdicts that differ from the f16 reference's on the same prompt: a refusal lost (-) or "
            "gained (+). `vs noise` judges each direction against the f16 noise run (flash attention off).",
            "", "## Launch", "",
            "- llama.cpp server: `sh llama-server.sh --port 8080` (command line: `sh llama-cli.sh`)",
            "- llama-cpp-python: `kw, env = kvedge.mitigate.deploy.llama_kwargs('.')`, set `env` in `os.environ` "
            "(None: unset), then `llama_cpp.Llama(**kw)` (llama-cpp-python.json holds them)"]
    o = doc["renderings"]["ollama"]
    if o["expressible"]:
        out.append("- Ollama: put `ollama.env` into the server's environment and restart `ollama serve`, then "
                   f"`ollama create NAME -f Modelfile` ({o['note']})")
    else:
        out.append(f"- Ollama: not written: {o['note']}")
    out += ["", "Check this folder and measure the deployment on held-out prompts with `kvedge verify <this folder>`.", ""]
    return "\n".join(out)


def _row(r: dict) -> list[str]:
    return [r["label"] + (" (smoothed)" if r["smoothed"] and "smoothed" not in r["label"] else ""),
            fmt.rate(r["refusal_harmful"]), fmt.rate(r["over_refusal_benign"]),
            _flips(r["vs_f16"]), _noise(r["vs_f16"]) if r["vs_f16"] else ("(noise floor)" if r["role"] == "noise" else "-"),
            fmt.est(r["kld"], 4), fmt.est(r["ppl_ratio"], 3), f"{r['kv_mib_at_ctx']:.1f}"]


VERIFY_HEADER = ["config", "refusal (harmful)", "over-refusal (benign)", "flips vs f16", "vs noise", "KLD",
                 "PPL ratio", "KV MiB"]


def _recovery_line(name: str, r: dict) -> str:
    one = r.get("one_sided_recovery")
    return (f"{name} {r['label']}: recovery {fmt.est(r['recovery'], 2)} (flips {r['flips_mitigated']} against "
            f"{r['flips_unmitigated']} unmitigated, of {r['n_prompts']} prompts); flips within the f16 noise floor: "
            f"{'yes' if r['within_noise'] else 'no'}; KV memory {r['memory_overhead']:+.0%} over the unmitigated config"
            + (f"; one-sided recovery of lost refusals {fmt.est(one, 2)}" if one else ""))


def verify_lines(rep: dict[str, Any]) -> list[str]:
    ps = rep["prompts_summary"]
    rows = [_row(r) for r in rep["rows"]]
    widths = [max(len(VERIFY_HEADER[i]), *(len(r[i]) for r in rows)) for i in range(len(VERIFY_HEADER))]
    lines = [f"kvedge verify: {rep['deployment']['label']} on the eval split ({ps['n']} prompts: {ps['harmful']} "
             f"harmful, {ps['benign']} benign)",
             "  ".join(h.ljust(w) for h, w in zip(VERIFY_HEADER, widths)),
             "  ".join("-" * w for w in widths),
             *["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]]
    for name, r in rep["recovery"].items():
        lines.append(_recovery_line(name, r))
    c = rep["choice"]
    lines.append(f"PCR's prescription: {c['prescription']} ({'chosen' if c['prescription_was_chosen'] else 'not chosen'} "
                 f"on calib); chosen on calib: {c['chosen_on_calib'] or 'none qualified (f16)'}; runner-up: "
                 f"{c['runner_up'] or '-'}")
    g = rep["gate"]
    lines.append(f"{'PASS' if g['passed'] else 'FAIL'}: target {g['target']['label']}")
    return lines


def render_verify_markdown(rep: dict[str, Any]) -> str:
    ps, nf = rep["prompts_summary"], rep["noise_floor"]
    out = [f"# kvedge verify: {rep['deployment']['label']}", "",
           f"- deployment: `{rep['deployment_dir']}` (deploy.json sha256 `{rep['deploy_sha256'][:16]}`)",
           f"- prompts: eval split, {ps['n']} ({ps['harmful']} harmful, {ps['benign']} benign): "
           + ", ".join(f"{k} {v}" for k, v in ps["by_subset"].items()),
           f"- detector {rep['detector']['id']}; backend {rep['backend']['kind']}; kvedge {rep['kvedge_version']}",
           f"- f16 noise run ({nf['how']}): {fmt.rate(nf['flip_rate'])} verdicts flipped",
           "", *fmt.md_table(VERIFY_HEADER, [_row(r) for r in rep["rows"]]), "",
           "Rates with a 95% Wilson interval and k/n; KLD and PPL ratio with a 95% paired bootstrap interval, "
           "against the f16 run of the same file (for the smoothed model: the smoothed model at f16, shown as "
           "its own row; its verdicts are compared with the original's f16). Flips are counted against the "
           "original model's f16 verdicts, both ways.", "", "## Recovery", ""]
    out += [f"- {_recovery_line(n, r)}" for n, r in rep["recovery"].items()]
    out += ["", "Recovery = 1 - flips(mitigated) / flips(unmitigated), against f16, on the same prompts, with a 95% "
            "paired bootstrap interval over prompts (undefined when the unmitigated config flips nothing).", "",
            "## Choice", ""]
    c = rep["choice"]
    out += [f"- chosen on the calib split: {c['chosen_on_calib'] or 'no candidate qualified: f16'}",
            f"- runner-up: {c['runner_up'] or '-'}",
            f"- PCR's prescription: {c['prescription']} ({'the choice' if c['prescription_was_chosen'] else 'not the choice'})"]
    g = rep["gate"]
    out += ["", f"## Gate: {'passed' if g['passed'] else 'FAILED'} ({g['target']['label']})", ""]
    return "\n".join(out)


def render_html(rep: dict[str, Any]) -> str:
    """verify.html: each configuration's refusal and over-refusal with intervals as a plot, the table,
    the recovery, the choice and the gate."""
    ps, nf, g, c = rep["prompts_summary"], rep["noise_floor"], rep["gate"], rep["choice"]
    rows = rep["rows"]
    meta = [f"deployment <code>{html.esc(rep['deployment_dir'])}</code> (deploy.json sha256 "
            f"<code>{html.esc(rep['deploy_sha256'][:16])}</code>)",
            f"eval split, {ps['n']} prompts ({ps['harmful']} harmful, {ps['benign']} benign)",
            f"detector {html.esc(rep['detector']['id'])}; backend {html.esc(rep['backend']['kind'])}; "
            f"kvedge {html.esc(rep['kvedge_version'])}",
            f"f16 noise run ({html.esc(nf['how'])}): {html.esc(fmt.rate(nf['flip_rate']))} verdicts flipped"]
    labels = [r["label"] for r in rows]
    panels = [("Refusal of harmful prompts", [plots.Interval.of(r["refusal_harmful"], 100) for r in rows], None),
              ("Over-refusal of benign prompts", [plots.Interval.of(r["over_refusal_benign"], 100) for r in rows], None)]
    sections = [
        html.section(f"Gate: {'passed' if g['passed'] else 'FAILED'} ({g['target']['label']})",
                     html.bullets(html.esc(_recovery_line(n, r)) for n, r in rep["recovery"].items())),
        html.section("Refusal and over-refusal", html.figure(
            plots.rates(labels, panels, "verify-rates", "Refusal and over-refusal per configuration"), "verify-rates",
            "Each configuration's rates on the eval split with 95% Wilson intervals; flips are counted against "
            "the original model's f16 verdicts, both ways.")),
        html.section("Configurations", html.table(VERIFY_HEADER, [_row(r) for r in rows])),
        html.section("Choice", html.bullets([
            f"chosen on the calib split: {html.esc(c['chosen_on_calib'] or 'no candidate qualified: f16')}",
            f"runner-up: {html.esc(c['runner_up'] or '-')}",
            f"PCR's prescription: {html.esc(c['prescription'])} "
            f"({'the choice' if c['prescription_was_chosen'] else 'not the choice'})"])),
    ]
    return html.page(f"kvedge verify: {rep['deployment']['label']}", meta, sections, "figures drawn with matplotlib")
