"""Renderings of the mitigation's documents: deploy.json (kvedge.results.deploy.DeployDocument) as the
export's terminal summary and DEPLOY.md, and verify.json (kvedge.results.verify.VerifyReport) as terminal
lines, verify.md and verify.html."""

from __future__ import annotations

from pathlib import Path

from ..results.deploy import PRECONDITION_CHECKS, CandidateDoc, DeployDocument
from ..results.verify import Recovery, ServerCheck, VerifyReport, VerifyRow
from . import fmt, html, plots


def _candidate_rows(doc: DeployDocument) -> tuple[list[str], list[list[str]]]:
    header = ["candidate", "KV MiB", "verdict", "margin shift harmful", "margin shift benign", "flips -/+"]
    ctx = doc.deployment.launch.n_ctx
    rows = []
    for c in doc.decision.candidates:
        rows.append([c.label + (" (PCR's prescription)" if c.prescription else ""),
                     f"{c.kv_bytes_per_token * ctx / 2**20:.1f}", *_measured_cells(c)])
    return header, rows


def _measured_cells(c: CandidateDoc) -> list[str]:
    m = c.measured
    if m is None:
        return [c.not_measured or "not measured", "-", "-", "-"]
    v = m.verdict
    return [v.verdict, fmt.est(v.harmful.shift, 2, signed=True), fmt.est(v.benign.shift, 2, signed=True),
            f"-{m.harmful.lost}/+{m.harmful.gained}, -{m.benign.lost}/+{m.benign.gained}"]


def _smoothing_line(doc: DeployDocument) -> str | None:
    s = doc.smoothing
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


def _transform_line(doc: DeployDocument) -> str | None:
    t = doc.k_transform
    if not t:
        return None
    line = f"K transform (simulation, calib prompts): {t['simulation']['reason']}"
    if t.get("self_check"):
        sc = t["self_check"]
        line += (f"; self-check {'passed' if sc['passed'] else 'FAILED'} (KLD {sc['patched']['kld']:.5f} vs noise "
                 f"{sc['noise']['kld']:.5f}, top-1 {sc['patched']['top1']:.3f} vs {sc['noise']['top1']:.3f})")
    return line


def _rule(doc: DeployDocument) -> str:
    eq = doc.equivalence
    return (f"candidates tested from the safest down, each judged against f16 by the verdict function "
            f"(equivalent: flips within the noise floor and the margin shift's 95% interval inside "
            f"+-{eq.delta:.2f} nats, {eq.source}); the last shown equivalent is deployed")


def export_lines(doc: DeployDocument, out: Path) -> list[str]:
    d, dep, ev = doc.decision, doc.deployment, doc.evidence
    v = ev["pcr"]["verdict"]
    cal = ev["calib"]
    nf = cal["noise_floor"]
    lines = [f"kvedge export: unmitigated {doc.unmitigated.label}; {_rule(doc)}",
             f"  PCR: {v['mode']} (carrier {v['carrier']}), layers {ev['pcr']['evidence_layers']}; "
             f"prescription: {d.prescription['label']}"]
    for sl in (_smoothing_line(doc), _transform_line(doc)):
        if sl:
            lines.append("  " + sl)
    lines.append(f"  calib split: {cal['n_prompts']} prompts; f16 noise run flipped {fmt.rate(nf['flip_rate'])}")
    header, rows = _candidate_rows(doc)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    lines.append("    " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["    " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append(f"  {'chosen' if d.qualified else 'NO CANDIDATE SHOWN EQUIVALENT'}: {dep.label}, KV "
                 f"{dep.kv_mib_at_ctx:.1f} MiB at ctx {dep.launch.n_ctx} (unmitigated "
                 f"{doc.unmitigated.kv_mib_at_ctx:.1f} MiB)")
    lines.append(f"  {d.reason}")
    lines.append(f"  wrote {out}: {', '.join(sorted(n for n in doc.files or {} if '/' not in n))}, deploy.json")
    lines.append(f"  next: kvedge verify {out}")
    return lines


def render_export_markdown(doc: DeployDocument) -> str:
    d, dep, ev = doc.decision, doc.deployment, doc.evidence
    L = dep.launch
    header, rows = _candidate_rows(doc)
    out = [
        f"# kvedge deployment: {dep.label}",
        "",
        f"- model: `{Path(dep.model.path).name}`" + (f" + adapter `{Path(dep.adapter.path).name}`" if dep.adapter else ""),
        f"- KV cache: K {L.type_k}, V {L.type_v}, attention rotation {'on' if L.rotation else 'off'}, "
        f"flash attention on, context {L.n_ctx}: {dep.kv_mib_at_ctx:.1f} MiB "
        f"(unmitigated {doc.unmitigated.label}: {doc.unmitigated.kv_mib_at_ctx:.1f} MiB)",
        f"- rotation: {dep.rotation_requirement}",
        f"- rule: {_rule(doc)}",
        f"- decision ({'a candidate was shown equivalent' if d.qualified else 'no candidate was shown equivalent'}): "
        f"{d.reason}",
        f"- PCR ({ev['pcr']['verdict']['mode']}, carrier {ev['pcr']['verdict']['carrier']}): "
        f"{ev['pcr']['verdict']['prescription']}",
    ]
    if L.layer_types:
        out.append("- per-layer cache types: only kvedge's native llama.cpp build can run this map (llama-cpp-python "
                   "with `LLAMA_CPP_LIB_PATH` pointing at it, see the native-builds guide); stock llama.cpp, "
                   "llama-server and Ollama take one type for K and one for V and cannot express it")
    if L.k_transform:
        out.append("- K transform: the model file carries kvedge's K transform (centring and per-channel scales of K "
                   "after RoPE, in its `kvedge.k_transform.*` metadata). Only kvedge's native llama.cpp applies it: "
                   "llama-cpp-python with `LLAMA_CPP_LIB_PATH` pointing at the library `kvedge build-native` builds, "
                   "llama-server/llama-cli built from the same patched tree. A stock llama.cpp, llama-server or Ollama "
                   "loads the file and ignores the transform: it then runs the unmitigated cache")
    for sl in (_smoothing_line(doc), _transform_line(doc)):
        if sl:
            out.append(f"- {sl}")
    out += ["", f"## Candidates on the calib split ({ev['calib']['n_prompts']} prompts, greedy, "
            f"{ev['calib']['max_tokens']} tokens, detector {ev['calib']['detector']['id']})", "",
            *fmt.md_table(header, rows), "",
            "In the order tested, from the most KV bytes down. Each is judged against the f16 reference on the same "
            "prompts: flips are refusals lost (-) and gained (+), harmful prompts then benign, judged against the "
            "f16 noise run; the margin shift is the mean paired change of the first-token refusal margin (nats, "
            "positive toward refusal), with its 95% interval.",
            *(f"- {c.measured.verdict.line}" for c in doc.decision.candidates if c.measured),
            "", "## Launch", "",
            "- llama.cpp server: `sh llama-server.sh --port 8080` (command line: `sh llama-cli.sh`)",
            "- llama-cpp-python: `kw, env = kvedge.mitigate.deploy.llama_kwargs('.')`, set `env` in `os.environ` "
            "(None: unset), then `llama_cpp.Llama(**kw)` (llama-cpp-python.json holds them)"]
    o = doc.renderings["ollama"]
    if o["expressible"]:
        out.append("- Ollama: put `ollama.env` into the server's environment and restart `ollama serve`, then "
                   f"`ollama create NAME -f Modelfile` ({o['note']})")
    else:
        out.append(f"- Ollama: not written: {o['note']}")
    out += _precondition_lines(dep.preconditions)
    out += ["", "Check this folder and measure the deployment on held-out prompts with `kvedge verify <this folder>`.", ""]
    return "\n".join(out)


def _precondition_lines(pre: list[dict] | None) -> list[str]:
    """What must hold in the runtime for it to run what was verified (kvedge.mitigate.preconditions)."""
    if not pre:
        return []
    out = ["", "## Preconditions", "",
           "The runtime runs the configuration verified here only when these hold, and most of them fail silently."]
    for p in pre:
        out.append(f"- **{p['requirement']}** ({', '.join(p['runtimes'])}): {p['why']}. Checked: {PRECONDITION_CHECKS[p['check']]}.")
    return out


VERIFY_HEADER = ["config", "verdict", "refusal (harmful)", "over-refusal (benign)", "margin shift harmful",
                 "margin shift benign", "flips -/+", "KLD", "KV MiB"]


def _row(r: VerifyRow) -> list[str]:
    v = r.verdict
    return [r.label + (" (smoothed)" if r.smoothed and "smoothed" not in r.label and "k-transform" not in r.label else ""),
            v.verdict if v else ("(reference)" if r.role == "reference" else "(noise floor)" if r.role == "noise"
                                 else "-"),
            fmt.rate(r.refusal_harmful), fmt.rate(r.over_refusal_benign),
            fmt.est(v.harmful.shift, 2, signed=True) if v else "-", fmt.est(v.benign.shift, 2, signed=True) if v else "-",
            f"-{r.harmful.lost}/+{r.harmful.gained}, -{r.benign.lost}/+{r.benign.gained}" if r.harmful else "-",
            fmt.est(r.kld, 4), f"{r.kv_mib_at_ctx:.1f}"]


def _recovery_line(name: str, r: Recovery) -> str:
    return (f"{name} {r.label}: {r.verdict.verdict}; recovery of the flips {fmt.est(r.flips, 2)} ({r.flips_mitigated} "
            f"against {r.flips_unmitigated} unmitigated, of {r.n_prompts} prompts); of the margin shift: harmful "
            f"{fmt.est(r.margin_harmful, 2)}, benign {fmt.est(r.margin_benign, 2)}; KV memory {r.memory_overhead:+.0%} "
            "over the unmitigated config")


def verify_lines(rep: VerifyReport) -> list[str]:
    ps = rep.prompts_summary
    rows = [_row(r) for r in rep.rows]
    widths = [max(len(VERIFY_HEADER[i]), *(len(r[i]) for r in rows)) for i in range(len(VERIFY_HEADER))]
    lines = [rep.gate.line,
             f"kvedge verify: {rep.deployment['label']} on the eval split ({ps.n} prompts: {ps.harmful} "
             f"harmful, {ps.benign} benign)",
             "  ".join(h.ljust(w) for h, w in zip(VERIFY_HEADER, widths)),
             "  ".join("-" * w for w in widths),
             *["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]]
    for name, r in rep.recovery.items():
        lines.append(_recovery_line(name, r))
    c = rep.choice
    lines.append(f"PCR's prescription: {c['prescription']} ({'chosen' if c['prescription_was_chosen'] else 'not chosen'} "
                 f"on calib); chosen on calib: {c['chosen_on_calib'] or 'none shown equivalent (f16)'}")
    lines.append(f"{'PASS' if rep.gate.passed else 'FAIL'}: the deployment is {rep.gate.verdict} "
                 f"(+-{rep.equivalence.delta:.2f} nats)")
    return lines


def render_verify_markdown(rep: VerifyReport) -> str:
    ps, nf = rep.prompts_summary, rep.noise_floor
    out = [f"# kvedge verify: {rep.deployment['label']}", "",
           f"## {'Passed' if rep.gate.passed else 'Failed'}: {rep.gate.line}", "",
           f"- deployment: `{rep.deployment_dir}` (deploy.json sha256 `{rep.deploy_sha256[:16]}`)",
           f"- prompts: eval split, {ps.n} ({ps.harmful} harmful, {ps.benign} benign): "
           + ", ".join(f"{k} {v}" for k, v in ps.by_subset.items()),
           f"- detector {rep.detector.id}; backend {rep.backend['kind']}; kvedge {rep.kvedge_version}",
           f"- f16 noise run ({nf.how}): {fmt.rate(nf.flip_rate)} verdicts flipped",
           f"- equivalence margin: +-{rep.equivalence.delta:.2f} nats ({rep.equivalence.source})",
           "", *fmt.md_table(VERIFY_HEADER, [_row(r) for r in rep.rows]), "",
           "Rates with a 95% Wilson interval and k/n; margin shifts and KLD with a 95% paired bootstrap interval. "
           "Verdicts, flips and margin shifts are against the original model's f16 run on the same prompts; KLD "
           "against the f16 run of the same file (for the smoothed model: the smoothed model at f16, shown as its "
           "own row).", "", "## Recovery", ""]
    out += [f"- {_recovery_line(n, r)}" for n, r in rep.recovery.items()]
    out += ["", "Recovery = 1 - flips(mitigated) / flips(unmitigated), and 1 - shift(mitigated) / shift(unmitigated) "
            "of the mean first-token margin per population, on the same prompts, with a 95% paired bootstrap "
            "interval (undefined when the unmitigated config moved nothing).", "", "## Choice", ""]
    c = rep.choice
    out += [f"- chosen on the calib split: {c['chosen_on_calib'] or 'no candidate shown equivalent: f16'}",
            f"- the sequence stopped at: {c['stopped_at'] or '-'}",
            f"- PCR's prescription: {c['prescription']} ({'the choice' if c['prescription_was_chosen'] else 'not the choice'})",
            ""]
    return "\n".join(out)


def render_html(rep: VerifyReport) -> str:
    """verify.html: each configuration's refusal and over-refusal with intervals as a plot, the table,
    the recovery, the choice and the gate."""
    ps, nf, g, c = rep.prompts_summary, rep.noise_floor, rep.gate, rep.choice
    rows = rep.rows
    meta = [f"deployment <code>{html.esc(rep.deployment_dir)}</code> (deploy.json sha256 "
            f"<code>{html.esc(rep.deploy_sha256[:16])}</code>)",
            f"eval split, {ps.n} prompts ({ps.harmful} harmful, {ps.benign} benign)",
            f"detector {html.esc(rep.detector.id)}; backend {html.esc(rep.backend['kind'])}; "
            f"kvedge {html.esc(rep.kvedge_version)}",
            f"f16 noise run ({html.esc(nf.how)}): {html.esc(fmt.rate(nf.flip_rate))} verdicts flipped"]
    labels = [r.label for r in rows]
    panels = [("Refusal of harmful prompts", [plots.Interval.of(r.refusal_harmful, 100) for r in rows], None),
              ("Over-refusal of benign prompts", [plots.Interval.of(r.over_refusal_benign, 100) for r in rows], None)]
    sections = [
        html.section(f"Gate: {'passed' if g.passed else 'FAILED'}", html.para(html.esc(g.line)),
                     html.bullets(html.esc(_recovery_line(n, r)) for n, r in rep.recovery.items())),
        html.section("Refusal and over-refusal", html.figure(
            plots.rates(labels, panels, "verify-rates", "Refusal and over-refusal per configuration"), "verify-rates",
            "Each configuration's rates on the eval split with 95% Wilson intervals; flips are counted against "
            "the original model's f16 verdicts, both ways.")),
        html.section("Configurations", html.table(VERIFY_HEADER, [_row(r) for r in rows])),
        html.section("Choice", html.bullets([
            f"chosen on the calib split: {html.esc(c['chosen_on_calib'] or 'no candidate shown equivalent: f16')}",
            f"the sequence stopped at: {html.esc(c['stopped_at'] or '-')}",
            f"PCR's prescription: {html.esc(c['prescription'])} "
            f"({'the choice' if c['prescription_was_chosen'] else 'not the choice'})"])),
    ]
    return html.page(f"kvedge verify: {rep.deployment['label']}", meta, sections, "figures drawn with matplotlib")


SERVER_CHECK_HEADER = ["item", "deploy.json", "server", "how kvedge knows", "finding"]


def _server_rows(rep: ServerCheck) -> list[list[str]]:
    return [[r.item, r.deployed, r.server, r.source, r.status] for r in rep.rows]


def server_check_lines(rep: ServerCheck) -> list[str]:
    """The terminal's lines: one per row that is not ok, then the finding."""
    out = [f"{r.item}: {r.status} (deploy.json {r.deployed}; server {r.server}; {r.source})"
           for r in rep.rows if r.status != "ok"]
    return out + [rep.line]


def render_server_check_markdown(rep: ServerCheck) -> str:
    return "\n".join([f"# kvedge verify --server: {rep.deployment}", "", f"- server: {rep.url} ({rep.kind})",
                      f"- kvedge {rep.kvedge_version}", "", f"**{rep.line}**", "",
                      *fmt.md_table(SERVER_CHECK_HEADER, _server_rows(rep)), "",
                      "An unknown is not a pass: the server does not show it, so kvedge cannot tell it runs what "
                      "deploy.json says. Behaviour is measured by an audit, not by this check.", ""])


def render_server_check_html(rep: ServerCheck) -> str:
    return html.page(f"kvedge verify --server: {rep.deployment}",
                     [f"server <code>{html.esc(rep.url)}</code> ({html.esc(rep.kind)})",
                      f"kvedge {html.esc(rep.kvedge_version)}"],
                     [html.section("Finding", html.para(f"<strong>{html.esc(rep.line)}</strong>")),
                      html.section("What the server shows", html.table(SERVER_CHECK_HEADER, _server_rows(rep)),
                                   html.para("An unknown is not a pass: the server does not show it.", "note"))])
