"""Markdown, HTML and terminal renderings of a PCR result (`kvedge.results.pcr.PcrResult`, schema kvedge.pcr/2)."""

from __future__ import annotations

import json
from pathlib import Path

from ..results.pcr import (
    FAILURE_SIGN,
    KvSection,
    LayerMap,
    LayerRow,
    PcrResult,
    RotationResult,
    describe,
)
from ..stats import Estimate
from . import html, plots
from .fmt import est, md_table, num

# The per-channel quantizer PCR credits is not one llama.cpp runs: said wherever the PCR figure is printed.
COUNTERFACTUAL_NOTE = ("int{b}-channel is one real-valued scale per channel over the tokens (KIVI-style): a "
                       "counterfactual quantizer llama.cpp does not have, so PCR says how much of the shift "
                       "per-channel granularity could remove, not what any llama.cpp cache type does")


def _e(e: Estimate | None, d: int = 3, signed: bool = False) -> str:
    return est(e.to_dict() if e is not None else None, d, signed, with_n=True)


def _rot(r: RotationResult) -> str:
    return "rotation on" if r.rotation else "rotation off"


def _kv_name(kv: KvSection) -> str:
    return kv.name or f"k={kv.type_k}/v={kv.type_v}"


def _bits(r: RotationResult) -> int | None:
    return r.pcr.bits_k or r.pcr.bits_v


def pcr_line(r: RotationResult, short: bool = False) -> str:
    """The PCR figure with what it is: never a bare 'per-channel scales remove X'."""
    b = _bits(r) or "N"
    if short:
        return (f"PCR {num(r.pcr.weighted_mean, 2)} = share of the shift int{b}-channel removes: a counterfactual "
                "quantizer llama.cpp does not have (one scale per channel, KIVI-style)")
    return (f"PCR {num(r.pcr.weighted_mean, 2)} on layers {list(r.pcr.layers)} ({r.pcr.population} shift): "
            + COUNTERFACTUAL_NOTE.format(b=b))


def layer_map_line(lm: LayerMap | None) -> str | None:
    """One line on the prescribed per-layer map, or None where the verdict prescribes none."""
    if not lm or not lm.searched:
        return None
    c, u = lm.chosen, lm.uniform_upgrade

    def shifts(row) -> str:
        return (f"margin harmful {_e(row.margin_shift_harmful, 2, True)}, benign "
                f"{_e(row.margin_shift_benign, 2, True)}")

    if c:
        return (f"layer map: {c.kv} predicted safe ({shifts(c)}), {c.vs_audited:.2f}x the audited KV bytes; "
                f"uniform {u.kv} {u.vs_audited:.2f}x")
    return (f"layer map: none of up to {len(lm.tried or ())} layers ranked by the {lm.population} shift predicted "
            f"safe; uniform {u.kv} ({shifts(u)}, {u.vs_audited:.2f}x, {'safe' if u.safe else 'not safe either'})")


def summary_lines(rep: PcrResult) -> list[str]:
    out = [f"PCR of {_kv_name(rep.kv)} on {Path(rep.model.path).name}"
           + (f" + {Path(rep.adapter).name}" if rep.adapter else "")]
    pad = f"  {'':13s} "
    for r in rep.rotations:
        v, ev = r.verdict, r.evidence
        out.append(f"  {_rot(r):13s} verdict: {v.mode} (carrier {v.carrier})")
        chosen = [p for p in ev.populations if p.population == ev.population]
        for p in chosen + [p for p in ev.populations if p.population != ev.population]:
            out.append(pad + describe(p))
        out.append(pad + f"layers by the {ev.population} shift: {list(ev.top_layers)}; " + pcr_line(r, short=True))
        out.append(pad + f"fix: {v.prescription}")
        line = layer_map_line(r.layer_map)
        if line:
            out.append(pad + line)
    f = rep.fidelity
    out.append(f"  fidelity: f16 top-1 {f.f16_top1:.3f}, KLD {f.f16_kld:.4f} over {f.n_positions} positions; "
               + "; ".join(f"{'rot on' if q.rotation else 'rot off'} KLD ratio {num(q.ratio, 2)}, "
                           f"Spearman {num(q.spearman, 2)}" for q in f.quantized))
    out.append(f"  {rep.timing.seconds:.0f} s, {rep.timing.torch_runs} torch runs")
    return out


def all_layer_table(r: RotationResult) -> tuple[list[str], list[list[str]]]:
    """The cache on all layers at once (K and V, K only, V only), both populations."""
    header = ["all layers", "margin shift harmful (nats)", "margin shift benign (nats)", "damage harmful",
              "damage benign", "rel. L2 at l*", "KLD (benign)"]
    rows = []
    for name, x in (("K and V", r.all_layers.k_and_v), ("K only", r.all_layers.k_only), ("V only", r.all_layers.v_only)):
        if x:
            rows.append([name, _e(x.margin_shift_harmful, 3, True), _e(x.margin_shift_benign, 3, True),
                         _e(x.damage, 3, True), _e(x.damage_benign, 3, True), f"{x.relative_l2_readout:.4f}",
                         _e(x.kld_harmless, 4)])
    return header, rows


def per_layer_table(r: RotationResult) -> tuple[list[str], list[list[str]]]:
    header = ["layer", "sep", "shift K harmful", "shift V harmful", "shift K benign", "shift V benign", "damage K",
              "damage V", "damage K benign", "damage V benign", "outliers K", "overlap K", "outliers V", "overlap V",
              "S group-32", "S channel", "PCR"]

    def count(n: int | None) -> str:
        return "" if n is None else str(n)

    rows = []
    for row in r.per_layer:
        red = row.reduction
        rows.append([str(row.layer), f"{row.separation:.2f}", num(row.margin_shift_harmful_k, 3, True),
                     num(row.margin_shift_harmful_v, 3, True), num(row.margin_shift_benign_k, 3, True),
                     num(row.margin_shift_benign_v, 3, True), num(row.damage_k, 4, True), num(row.damage_v, 4, True),
                     num(row.damage_benign_k, 4, True), num(row.damage_benign_v, 4, True),
                     count(row.outliers_k), num(row.overlap_k, 2), count(row.outliers_v), num(row.overlap_v, 2),
                     num(red.shift_group32 if red else None, 3, True), num(red.shift_channel if red else None, 3, True),
                     num(red.pcr if red else None, 2)])
    return header, rows


def render_markdown(rep: PcrResult) -> str:
    m, cal, sig, nf, f, t = rep.model, rep.calibration, rep.signal, rep.noise_floor, rep.fidelity, rep.timing
    L: list[str] = [
        f"# kvedge pcr: {_kv_name(rep.kv)}",
        "",
        f"- model: `{Path(m.path).name}` ({m.architecture}, {m.n_layer} layers, {m.n_head_kv} KV heads of "
        f"{m.head_dim_k}/{m.head_dim_v}), sha256 `{m.sha256[:16]}`",
    ]
    if rep.adapter:
        L.append(f"- adapter: `{Path(rep.adapter).name}`")
    L += [
        f"- calibration: {cal.n_harmful} harmful + {cal.n_harmless} benign prompts of the `{cal.split}` split "
        f"({', '.join(sorted({p.subset for p in cal.prompts}))}), {cal.shared_prefix_tokens} shared template tokens",
        f"- readout layer l* = {sig.readout_layer} (largest harmful/benign separation in the last two thirds, "
        f"Cohen's d {sig.separation[sig.readout_layer]:.2f}); f16 gap g = {sig.gap:.3f}",
        f"- first-token refusal margin at f16 (refusal vs compliance openings, nats): harmful "
        f"{_e(sig.margin_f16_harmful, 2, True)}, benign {_e(sig.margin_f16_harmless, 2, True)}",
        f"  - refusal tokens: {', '.join(repr(x) for x in cal.refusal_tokens)}",
        f"  - compliance tokens: {', '.join(repr(x) for x in cal.compliance_tokens)}",
        f"- noise floors ({nf.what}): margin harmful +-{nf.margin_floor_harmful:.4f} nats "
        f"({_e(nf.margin_shift_harmful, 4, True)}), benign +-{nf.margin_floor_benign:.4f} nats "
        f"({_e(nf.margin_shift_benign, 4, True)}); signal damage harmful +-{nf.floor:.4f}, benign "
        f"+-{nf.floor_benign:.4f} of the gap",
        f"- {t.seconds:.1f} s on {t.threads} threads ({t.torch_runs} torch runs; "
        f"llama.cpp {t.llama_cpp_seconds:.1f} s, loading {t.load_seconds:.1f} s); kvedge {rep.kvedge_version}",
        "",
        "Each population is measured apart. Margin shift: m_q - m_f16 of the first-token refusal margin (nats, "
        "positive toward refusal: a failure for benign prompts, over-refusal; negative: a failure for harmful "
        "prompts, refusals lost), mean over the population's prompts with a paired 95% bootstrap interval. Damage: "
        "the readout signal's move in the population's failure direction as a share of the f16 gap (harmful: the "
        "gap erased; benign: moving toward the harmful side). The verdict, the layer ranking, concentration, PCR and "
        "the layer map follow the population that moved. Definitions: docs/pcr.md.",
        "",
        "## Fidelity of the torch simulation to llama.cpp (this run)",
        "",
        f"- f16: top-1 agreement {f.f16_top1:.3f} (target >= {f.targets.f16_top1}), mean KLD {f.f16_kld:.4f} nats "
        f"(target < {f.targets.f16_kld}) over {f.n_positions} positions"
        + ("" if f.verified_architecture else "; **architecture not verified by kvedge's tests**"),
    ]
    for q in f.quantized:
        L.append(f"- {'rotation on' if q.rotation else 'rotation off'}: KLD vs f16 llama.cpp {q.llama_kld:.4f}, "
                 f"sim {q.sim_kld:.4f}, ratio {num(q.ratio, 2)} (target {f.targets.ratio[0]}-{f.targets.ratio[1]}), "
                 f"per-prompt Spearman {num(q.spearman, 2)} (target >= {f.targets.spearman}, n={q.n_prompts}): "
                 f"{'meets' if q.meets_target else 'misses'} the target")
    for r in rep.rotations:
        v, c, ev = r.verdict, r.concentration, r.evidence
        amp = r.all_layers.k_and_v.amplification
        L += [
            "",
            f"## {_rot(r)}: **{v.mode}**",
            "",
            f"- schemes: K {r.scheme_k}, V {r.scheme_v}",
            *[f"- {reason}" for reason in v.reasons],
            f"- carrier: {v.carrier}",
            f"- prescription: {v.prescription}",
            f"- try: `{json.dumps(v.suggested)}`",
            f"- the evidence below follows the **{ev.population}** prompts (failure-signed margin shift, nats)",
            "",
            *md_table(*all_layer_table(r)),
        ]
        L += [
            "",
            f"- vulnerability amplification: {num(amp.value if amp else None, 3)} (isotropic error would give "
            f"{num(amp.isotropic if amp else None, 3)}; ratio {num(amp.directional if amp else None, 2)})",
            f"- concentration of the {c.population} shift: top-3 layers {list(c.top3_layers)} hold "
            f"{num(c.top3_share, 2)} of the summed single-layer shift; keeping them at f16 leaves "
            f"{num(c.shift_without_top3, 3, True)} nats, recovery {num(c.top3_recovery, 2)}",
            f"- {pcr_line(r)}",
            f"- outlier overlap (importance mass on outlier channels, shift-weighted): {num(r.overlap, 2)}",
            "",
            *md_table(*per_layer_table(r)),
        ]
        L += _layer_map_markdown(r.layer_map)
    return "\n".join(L) + "\n"


def _layer_map_markdown(lm: LayerMap | None) -> list[str]:
    if not lm:
        return []
    L = ["", "### Per-layer map", ""]
    if not lm.searched:
        return L + [f"Not searched: {lm.reason}."]
    rows = list(lm.tried or ()) + [lm.uniform_upgrade]
    L += [f"More bits ({lm.carrier}) on the layers ranked by the single-layer {lm.population} shift "
          f"{list(lm.ranking or ())}, the audited `{lm.audited.kv}` elsewhere; {lm.criterion}.", "",
          *md_table(["map", "layers", "KV bytes/token", "vs audited", "margin shift harmful", "margin shift benign",
                     "damage harmful", "damage benign", "safe", "within noise"],
                    [[f"`{row.kv}`", str(list(row.layers)) if row.layers is not None else "all",
                      str(row.bytes_per_token), f"{row.vs_audited:.3f}", _e(row.margin_shift_harmful, 3, True),
                      _e(row.margin_shift_benign, 3, True), _e(row.damage, 3, True), _e(row.damage_benign, 3, True),
                      "yes" if row.safe else "no", "yes" if row.within_noise else "no"] for row in rows])]
    c = lm.chosen
    L += ["", f"Prescribed: `{c.kv}`." if c else "No map of the ranked layers was predicted safe: the uniform "
          "upgrade is the fix" + ("." if lm.uniform_upgrade.safe else ", and it is not predicted safe either.")]
    return L


def _failure(row: LayerRow, kind: str, population: str) -> float | None:
    shift = getattr(row, f"margin_shift_{population}_{kind}")
    return None if shift is None else FAILURE_SIGN[population] * shift


def render_html(rep: PcrResult) -> str:
    """pcr.html: the verdicts, the per-layer shift of the population that moved as a plot, and the tables."""
    m, sig, nf = rep.model, rep.signal, rep.noise_floor
    kv = _kv_name(rep.kv)
    meta = [f"model <code>{html.esc(Path(m.path).name)}</code> ({html.esc(m.architecture)}, {m.n_layer} layers), "
            f"sha256 <code>{html.esc(m.sha256[:16])}</code>"]
    if rep.adapter:
        meta.append(f"adapter <code>{html.esc(Path(rep.adapter).name)}</code>")
    meta += [f"readout layer {sig.readout_layer}, f16 gap {sig.gap:.3f}; margin noise floors +-"
             f"{nf.margin_floor_harmful:.4f} (harmful), +-{nf.margin_floor_benign:.4f} (benign) nats",
             f"kvedge {html.esc(rep.kvedge_version)}; definitions in docs/pcr.md"]
    sections = [html.section("Summary", "<pre>" + html.esc("\n".join(summary_lines(rep))) + "</pre>")]
    panels = []
    for r in rep.rotations:
        pop = r.evidence.population
        panels.append((f"{_rot(r)}: {pop} prompts", [row.layer for row in r.per_layer],
                       [_failure(row, "k", pop) for row in r.per_layer],
                       [_failure(row, "v", pop) for row in r.per_layer], sig.readout_layer))
    sections.append(html.section("Per-layer shift", html.figure(
        plots.layer_damage(panels, max(nf.margin_floor_harmful, nf.margin_floor_benign), "layers",
                           f"Per-layer margin shift of {kv}", ylabel="failure-direction shift (nats)"), "layers",
        "Shift of the first-token refusal margin of the population that moved (its title), in the direction that "
        "fails it (benign: toward refusal; harmful: away from it), when one layer's K (or V) cache is quantized and "
        "everything else is f16: the ranking PCR's concentration, PCR and layer map use. Grey: the noise floor (an f32 "
        "cache against f16).")))
    for r in rep.rotations:
        v = r.verdict
        sections.append(html.section(
            f"{_rot(r)}: {v.mode}",
            html.bullets([*(html.esc(x) for x in v.reasons), f"carrier: {html.esc(v.carrier)}",
                          f"prescription: <strong>{html.esc(v.prescription)}</strong>",
                          f"try: <code>{html.esc(json.dumps(v.suggested))}</code>", html.esc(pcr_line(r)),
                          *(html.esc(x) for x in [layer_map_line(r.layer_map)] if x)]),
            html.table(*all_layer_table(r)),
            "<h3>Per layer</h3>" + html.table(*per_layer_table(r))))
    return html.page(f"kvedge pcr: {kv}", meta, sections, "figures drawn with matplotlib")
