"""Markdown, HTML and terminal renderings of a sweep result (`kvedge.results.pcr.SweepResult`, schema kvedge.sweep/2)."""

from __future__ import annotations

from pathlib import Path

from ..results.pcr import SweepResult
from . import html, plots
from .fmt import est, md_table


def _name(rep: SweepResult) -> str:
    return Path(rep.model.path).name + (f" + {Path(rep.adapter).name}" if rep.adapter else "")


def sweep_summary_lines(rep: SweepResult) -> list[str]:
    """One terminal line per curve: transition and damage per width."""
    lines = []
    for c in rep.curves:
        t = c.transition
        pts = "  ".join(f"{p.bits}b:{p.damage.value:+.2f}" for p in c.points)
        benign = "  ".join(f"{p.bits}b:{p.margin_shift_benign.value:+.2f}" for p in c.points)
        lines.append(f"{c.cache:>3} rot {'on ' if c.rotation else 'off'}  collapse<= {t.collapse_bits or '-'}  "
                     f"safe>= {t.safe_bits or '-'}  damage {pts}  benign margin shift (nats) {benign}")
    return lines


def render_sweep_markdown(rep: SweepResult) -> str:
    lines = [f"# kvedge sweep: {_name(rep)}",
             "",
             "Generic intN group-32 caches (symmetric, f16 scale per 32 values) on all layers"
             + (f" but those the map `{rep.held.kv}` names, which keep its types" if rep.held else "")
             + ". Damage: share of the "
             f"f16 harmful/harmless gap (readout layer {rep.readout_layer}, g = {rep.gap:.3f}) erased, with a "
             f"95% bootstrap interval; noise floor +-{rep.noise_floor.floor:.4f}. Collapse: damage >= "
             f"{rep.collapse_threshold}; safe: every wider width's interval below {rep.safe_threshold}. "
             "Margin shifts: m_q - m_f16 of the first-token refusal margin per population (nats, positive toward "
             f"refusal; noise floors +-{rep.noise_floor.margin_floor_harmful:.4f} harmful, "
             f"+-{rep.noise_floor.margin_floor_benign:.4f} benign): a benign shift toward refusal is over-refusal. "
             f"{rep.timing.seconds:.0f} s.", ""]
    for c in rep.curves:
        t = c.transition
        lines += [f"## {c.cache.upper()}, rotation {'on' if c.rotation else 'off'}: collapse at <= "
                  f"{t.collapse_bits or 'none'} bits, safe from {t.safe_bits or 'none'} bits", "",
                  *md_table(["bits", "damage", "margin drop (harmful)", "margin shift harmful", "margin shift benign",
                             "damage benign", "KLD (benign)", "rel. L2 at l*"],
                            [[str(p.bits),
                              f"{p.damage.value:+.3f} [{p.damage.lo:+.3f}, {p.damage.hi:+.3f}]",
                              f"{p.margin_drop_harmful.value:+.3f}",
                              est(p.margin_shift_harmful.to_dict(), 3, True, with_n=True),
                              est(p.margin_shift_benign.to_dict(), 3, True, with_n=True),
                              est(p.damage_benign.to_dict(), 3, True), f"{p.kld_harmless.value:.4f}",
                              f"{p.relative_l2_readout:.4f}"] for p in c.points]), ""]
    return "\n".join(lines)


def render_html(rep: SweepResult) -> str:
    """sweep.html: damage against bit width for K, V and both, one panel per rotation setting."""
    meta = [f"generic intN group-32 caches on all layers; readout layer {rep.readout_layer}, f16 gap {rep.gap:.3f}",
            f"collapse: damage &gt;= {rep.collapse_threshold:g}; safe: every wider width's interval below "
            f"{rep.safe_threshold:g}; noise floor +-{rep.noise_floor.floor:.4f}",
            f"kvedge {html.esc(rep.kvedge_version)}; definitions in docs/pcr.md"]
    rotations = list(dict.fromkeys(c.rotation for c in rep.curves))
    panels = [(f"rotation {'on' if rot else 'off'}",
               [(c.cache.upper(), [p.bits for p in c.points],
                 [plots.Interval(p.damage.value, p.damage.lo, p.damage.hi) for p in c.points])
                for c in rep.curves if c.rotation == rot]) for rot in rotations]
    rows = [[c.cache.upper(), "on" if c.rotation else "off", str(c.transition.collapse_bits or "none"),
             str(c.transition.safe_bits or "none"),
             "  ".join(f"{p.bits}b {p.damage.value:+.3f}" for p in c.points)] for c in rep.curves]
    sections = [
        html.section("Damage against bit width", html.figure(
            plots.bit_curves(panels, rep.noise_floor.floor, (rep.collapse_threshold, rep.safe_threshold),
                             "bits", "Safety damage against cache bit width"), "bits",
            "Share of the f16 harmful/harmless gap the cache erases at each width, with 95% bootstrap intervals over "
            "the calibration prompts; dotted: the collapse and safe thresholds; grey: the noise floor.")),
        html.section("Transitions", html.table(["cache", "rotation", "collapse at <= bits", "safe from bits",
                                                "damage per width"], rows)),
    ]
    return html.page(f"kvedge sweep: {_name(rep)}", meta, sections, "figures drawn with matplotlib")
