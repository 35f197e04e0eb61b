"""Markdown, HTML and terminal renderings of a PCR result (`kvedge.results.pcr.PcrResult`, schema kvedge.pcr/1)."""

from __future__ import annotations

import json
from pathlib import Path

from ..results.pcr import KvSection, LayerMap, PcrResult, RotationResult
from ..stats import Estimate
from . import html, plots
from .fmt import est, md_table, num


def _e(e: Estimate | None, d: int = 3, signed: bool = False) -> str:
    return est(e.to_dict() if e is not None else None, d, signed, with_n=True)


def _rot(r: RotationResult) -> str:
    return "rotation on" if r.rotation else "rotation off"


def _kv_name(kv: KvSection) -> str:
    return kv.name or f"k={kv.type_k}/v={kv.type_v}"


def layer_map_line(lm: LayerMap | None) -> str | None:
    """One line on the prescribed per-layer map, or None where the verdict prescribes none."""
    if not lm or not lm.searched:
        return None
    c, u = lm.chosen, lm.uniform_upgrade
    if c:
        return (f"layer map: {c.kv} predicted safe (damage {_e(c.damage, 3, True)}), "
                f"{c.vs_audited:.2f}x the audited KV bytes; uniform {u.kv} {u.vs_audited:.2f}x")
    return (f"layer map: none of up to {len(lm.tried or ())} ranked layers predicted safe; uniform {u.kv} "
            f"(damage {_e(u.damage, 3, True)}, {u.vs_audited:.2f}x)")


def summary_lines(rep: PcrResult) -> list[str]:
    out = [f"PCR of {_kv_name(rep.kv)} on {Path(rep.model.path).name}"
           + (f" + {Path(rep.adapter).name}" if rep.adapter else "")]
    for r in rep.rotations:
        v, ev = r.verdict, r.evidence
        out.append(f"  {_rot(r):13s} verdict: {v.mode} (carrier {v.carrier}); damage K+V "
                   f"{_e(r.all_layers.k_and_v.damage, 3, True)}, K {num(ev.damage_k, 3, True)}, "
                   f"V {num(ev.damage_v, 3, True)}")
        out.append(f"  {'':13s} fix: {v.prescription}")
        line = layer_map_line(r.layer_map)
        if line:
            out.append(f"  {'':13s} {line}")
    f = rep.fidelity
    out.append(f"  fidelity: f16 top-1 {f.f16_top1:.3f}, KLD {f.f16_kld:.4f} over {f.n_positions} positions; "
               + "; ".join(f"{'rot on' if q.rotation else 'rot off'} KLD ratio {num(q.ratio, 2)}, "
                           f"Spearman {num(q.spearman, 2)}" for q in f.quantized))
    out.append(f"  {rep.timing.seconds:.0f} s, {rep.timing.torch_runs} torch runs")
    return out


def all_layer_table(r: RotationResult) -> tuple[list[str], list[list[str]]]:
    """Damage of the cache on all layers at once: K and V, K only, V only."""
    header = ["all layers", "damage", "margin drop (harmful)", "rel. L2 at l*", "KLD (harmless)"]
    rows = []
    for name, x in (("K and V", r.all_layers.k_and_v), ("K only", r.all_layers.k_only), ("V only", r.all_layers.v_only)):
        if x:
            rows.append([name, _e(x.damage, 3, True), _e(x.margin_drop_harmful, 3, True),
                         f"{x.relative_l2_readout:.4f}", _e(x.kld_harmless, 4)])
    return header, rows


def per_layer_table(r: RotationResult) -> tuple[list[str], list[list[str]]]:
    header = ["layer", "sep", "damage K", "damage V", "outliers K", "overlap K", "outliers V", "overlap V",
              "D group-32", "D channel", "PCR"]

    def count(n: int | None) -> str:
        return "" if n is None else str(n)

    rows = []
    for row in r.per_layer:
        red = row.reduction
        rows.append([str(row.layer), f"{row.separation:.2f}", num(row.damage_k, 4, True), num(row.damage_v, 4, True),
                     count(row.outliers_k), num(row.overlap_k, 2), count(row.outliers_v), num(row.overlap_v, 2),
                     num(red.damage_group32 if red else None, 4, True), num(red.damage_channel if red else None, 4, True),
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
        f"- calibration: {cal.n_harmful} harmful + {cal.n_harmless} harmless prompts of the `{cal.split}` split "
        f"({', '.join(sorted({p.subset for p in cal.prompts}))}), {cal.shared_prefix_tokens} shared template tokens",
        f"- readout layer l* = {sig.readout_layer} (largest harmful/harmless separation in the last two thirds, "
        f"Cohen's d {sig.separation[sig.readout_layer]:.2f}); f16 gap g = {sig.gap:.3f}",
        f"- behavioural margin at f16 (refusal vs compliance openings, nats): harmful {_e(sig.margin_f16_harmful, 2, True)}, "
        f"harmless {_e(sig.margin_f16_harmless, 2, True)}",
        f"  - refusal tokens: {', '.join(repr(x) for x in cal.refusal_tokens)}",
        f"  - compliance tokens: {', '.join(repr(x) for x in cal.compliance_tokens)}",
        f"- noise floor: {nf.what}: {_e(nf.damage, 4, True)}; effects within +-{nf.floor:.4f} of the gap are noise",
        f"- {t.seconds:.1f} s on {t.threads} threads ({t.torch_runs} torch runs; "
        f"llama.cpp {t.llama_cpp_seconds:.1f} s, loading {t.load_seconds:.1f} s); kvedge {rep.kvedge_version}",
        "",
        "Damage is the share of the f16 harmful/harmless gap along the safety direction that the cache erases "
        "(mean over harmful prompts, 95% bootstrap interval; negative: pushed toward refusal). Definitions: docs/pcr.md.",
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
        v, c, p = r.verdict, r.concentration, r.pcr
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
            "",
            *md_table(*all_layer_table(r)),
        ]
        L += [
            "",
            f"- vulnerability amplification: {num(amp.value if amp else None, 3)} (isotropic error would give "
            f"{num(amp.isotropic if amp else None, 3)}; ratio {num(amp.directional if amp else None, 2)})",
            f"- concentration: top-3 layers {list(c.top3_layers)} hold {num(c.top3_share, 2)} of the single-layer damage; "
            f"keeping them at f16 leaves {num(c.damage_without_top3, 3, True)}, recovery {num(c.top3_recovery, 2)}",
            f"- PCR (int{p.bits_k or p.bits_v} channel vs group-32, on layers {list(p.layers)}): damage-weighted mean "
            f"{num(p.weighted_mean, 2)}",
            f"- outlier overlap (importance mass on outlier channels, damage-weighted): {num(r.overlap, 2)}",
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
    L += [f"More bits ({lm.carrier}) on the layers ranked by single-layer damage {list(lm.ranking or ())}, the audited "
          f"`{lm.audited.kv}` elsewhere; {lm.criterion}.", "",
          *md_table(["map", "layers", "KV bytes/token", "vs audited", "damage", "margin drop (harmful)", "safe",
                     "within noise"],
                    [[f"`{row.kv}`", str(list(row.layers)) if row.layers is not None else "all",
                      str(row.bytes_per_token), f"{row.vs_audited:.3f}", _e(row.damage, 3, True),
                      _e(row.margin_drop_harmful, 3, True), "yes" if row.safe else "no",
                      "yes" if row.within_noise else "no"] for row in rows])]
    c = lm.chosen
    L += ["", f"Prescribed: `{c.kv}`." if c else "No map of the ranked layers was predicted safe: the uniform "
          "upgrade is the fix."]
    return L


def render_html(rep: PcrResult) -> str:
    """pcr.html: the verdicts, the per-layer damage of each rotation setting as a plot, and the tables."""
    m, sig, nf = rep.model, rep.signal, rep.noise_floor
    kv = _kv_name(rep.kv)
    meta = [f"model <code>{html.esc(Path(m.path).name)}</code> ({html.esc(m.architecture)}, {m.n_layer} layers), "
            f"sha256 <code>{html.esc(m.sha256[:16])}</code>"]
    if rep.adapter:
        meta.append(f"adapter <code>{html.esc(Path(rep.adapter).name)}</code>")
    meta += [f"readout layer {sig.readout_layer}, f16 gap {sig.gap:.3f}; noise floor +-{nf.floor:.4f} of the gap",
             f"kvedge {html.esc(rep.kvedge_version)}; definitions in docs/pcr.md"]
    sections = [html.section("Summary", "<pre>" + html.esc("\n".join(summary_lines(rep))) + "</pre>")]
    panels = [(_rot(r), [row.layer for row in r.per_layer], [row.damage_k for row in r.per_layer],
               [row.damage_v for row in r.per_layer], sig.readout_layer) for r in rep.rotations]
    sections.append(html.section("Per-layer damage", html.figure(
        plots.layer_damage(panels, nf.floor, "layers", f"Per-layer safety damage of {kv}"), "layers",
        "Share of the f16 harmful/harmless gap at the readout layer that quantizing one layer's K (or V) cache "
        "erases, everything else at f16; negative: pushed toward refusal. Layers after the readout cannot move it. "
        "Grey: the noise floor (an f32 cache against f16).")))
    for r in rep.rotations:
        v = r.verdict
        sections.append(html.section(
            f"{_rot(r)}: {v.mode}",
            html.bullets([*(html.esc(x) for x in v.reasons), f"carrier: {html.esc(v.carrier)}",
                          f"prescription: <strong>{html.esc(v.prescription)}</strong>",
                          f"try: <code>{html.esc(json.dumps(v.suggested))}</code>",
                          *(html.esc(x) for x in [layer_map_line(r.layer_map)] if x)]),
            html.table(*all_layer_table(r)),
            "<h3>Per layer</h3>" + html.table(*per_layer_table(r))))
    return html.page(f"kvedge pcr: {kv}", meta, sections, "figures drawn with matplotlib")
