"""The figures of the HTML reports, drawn with matplotlib into inline SVG.

Why matplotlib: it is the field's well-kept plotting library, it renders offline with no JavaScript,
and its SVG is one self-contained element (text drawn as paths, so no font is fetched or needed), which
prints sharp at any size and scales to a phone's width. Figures are built on `matplotlib.figure.Figure`
without pyplot (no global figure state) and saved with a fixed hash salt and no date, so the same
report dict gives byte-identical SVG.

Each function takes plain numbers read from a report dict by the renderer and returns one `<svg>`.
Intervals are drawn as error bars; the noise floor as a grey band.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any, Sequence

# Okabe-Ito: distinguishable with every common colour-vision deficiency, and in greyscale print
BLUE, ORANGE, GREEN, VERMILION, PURPLE, SKY, YELLOW, BLACK = (
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
CYCLE = (BLUE, VERMILION, GREEN, ORANGE, PURPLE, SKY, BLACK)
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "<", ">", "h")
BAND = "#d9d9d9"

_RC = {
    "svg.fonttype": "path",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e5e5e5",
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "legend.fontsize": 8,
}


@dataclass(frozen=True)
class Interval:
    """A value with its 95% interval (either bound may be missing)."""

    value: float | None
    lo: float | None = None
    hi: float | None = None

    @classmethod
    def of(cls, d: Any, scale: float = 1.0) -> "Interval":
        """From a Rate (`rate`) or an Estimate (`value`), typed or as its dict."""
        if not d:
            return cls(None)
        from .fmt import field

        v = field(d, "rate") if field(d, "rate") is not None else field(d, "value")
        f = lambda x: None if x is None else x * scale  # noqa: E731
        return cls(f(v), f(field(d, "lo")), f(field(d, "hi")))

    @property
    def ok(self) -> bool:
        return self.value is not None

    def err(self) -> tuple[float, float]:
        """Error-bar lengths below and above the value."""
        lo = self.value if self.lo is None else self.lo
        hi = self.value if self.hi is None else self.hi
        return max(0.0, self.value - lo), max(0.0, hi - self.value)


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, **kw):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def _svg(fig, name: str, title: str) -> str:
    """The figure as one `<svg>` element, labelled for screen readers; deterministic for `name`."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"kvedge-{name}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML declaration and DOCTYPE: this goes inline
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, count=1, flags=re.S)
    # several SVGs share one document: prefix every id and reference (glyphs, clip paths) with the name
    svg = re.sub(r'(\sid="|href="#|url\(#)', lambda m: f"{m.group(1)}{name}-", svg)
    esc = title.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
    return svg.replace("<svg ", f'<svg role="img" aria-label="{esc}" ', 1)


def _legend_below(fig, axes, ncols: int) -> None:
    """One legend under all panels, from the first panel's labelled artists."""
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=ncols)


DAMAGE = "damage (share of gap)"


def _ctx():
    import matplotlib

    return matplotlib.rc_context(_RC)


def rates(labels: Sequence[str], panels: Sequence[tuple[str, Sequence[Interval], tuple[float, float] | None]],
          name: str, title: str) -> str:
    """One panel per rate (percent, horizontal): each configuration's rate with its interval, and the
    noise band (lo, hi) in percent when given."""
    n = len(labels)
    with _ctx():
        fig, axes = _figure(6.4, 0.9 + 0.32 * n * len(panels), len(panels), 1, sharey=True)
        for k, (ax, (panel_title, vals, band)) in enumerate(zip(axes[:, 0], panels)):
            if band:
                ax.axvspan(band[0], band[1], color=BAND, zorder=0, label="noise band" if k == 0 else None)
            for i, v in enumerate(vals):
                if v.ok:
                    lo, hi = v.err()
                    ax.errorbar([v.value], [i], xerr=[[lo], [hi]], fmt=MARKERS[0], color=BLUE, ms=5, capsize=3)
            ax.set_yticks(range(n), labels)
            ax.set_ylim(n - 0.5, -0.5)
            ax.set_xlim(-2, 102)
            ax.set_xlabel("%")
            ax.set_title(panel_title, loc="left")
        if any(band for _, _, band in panels):
            fig.legend(loc="outside lower center")
        return _svg(fig, name, title)


def silent(points: Sequence[tuple[str, Interval, Interval, Interval, Interval]],
           bands: tuple[float, float], name: str, title: str) -> str:
    """The "silent" plot: per configuration (label, KLD, PPL ratio, refusal change, over-refusal change,
    changes in percentage points), the change in refusals against what the usual checks show. Rows:
    harmful refusal change and benign over-refusal change; columns: KLD (log scale) and PPL ratio.
    `bands` are the noise half-widths (points) for the two rows. Points without a value are skipped but
    keep their colour and marker, so a configuration looks the same in every plot of a report."""
    with _ctx():
        fig, axes = _figure(6.4, 5.4, 2, 2, sharex="col", sharey="row")
        for row, (ylabel, band) in enumerate((("refusal change, harmful (points)", bands[0]),
                                              ("over-refusal change, benign (points)", bands[1]))):
            for col in range(2):
                ax = axes[row, col]
                ax.axhspan(-band, band, color=BAND, zorder=0)
                ax.axhline(0, color="#888", lw=0.8, zorder=1)
                for i, (label, kld, ppl, dh, db) in enumerate(points):
                    x = (kld, ppl)[col]
                    y = (dh, db)[row]
                    if not (x.ok and y.ok):
                        continue
                    if col == 0 and x.value <= 0:
                        continue  # the reference itself: KLD 0 has no place on a log axis
                    ax.errorbar([x.value], [y.value], xerr=[[e] for e in x.err()], yerr=[[e] for e in y.err()],
                                fmt=MARKERS[i % len(MARKERS)], color=CYCLE[i % len(CYCLE)], ms=5, capsize=2,
                                label=label if row == 0 and col == 0 else None)
                if col == 0:
                    ax.set_xscale("log")
                    ax.set_ylabel(ylabel)
                if row == 1:
                    ax.set_xlabel(("next-token KLD vs f16 (nats, log)", "perplexity ratio vs f16")[col])
        _legend_below(fig, axes, 3)
        return _svg(fig, name, title)


def memory(points: Sequence[tuple[str, float, Interval]], band: tuple[float, float] | None,
           name: str, title: str) -> str:
    """KV cache MiB against refusal retention (1 = as many refusals as f16), one point per configuration."""
    with _ctx():
        fig, axes = _figure(6.4, 3.6)
        ax = axes[0, 0]
        if band:
            ax.axhspan(band[0], band[1], color=BAND, zorder=0, label="noise band")
        ax.axhline(1, color="#888", lw=0.8, zorder=1)
        span = max((mib for _, mib, _ in points), default=1.0) or 1.0
        for i, (label, mib, ret) in enumerate(points):
            if not ret.ok:
                continue
            # configurations of one cache size (rotation on and off) side by side rather than on top
            same = [j for j, (_, m, _) in enumerate(points) if m == mib]
            x = mib + (same.index(i) - (len(same) - 1) / 2) * 0.015 * span
            lo, hi = ret.err()
            ax.errorbar([x], [ret.value], yerr=[[lo], [hi]], fmt=MARKERS[i % len(MARKERS)],
                        color=CYCLE[i % len(CYCLE)], ms=6, capsize=3, label=label)
        ax.set_xlabel("KV cache at the audited context (MiB)")
        ax.set_ylabel("refusal retention vs f16")
        ax.set_xlim(left=0)
        fig.legend(loc="outside lower center", ncols=3)
        return _svg(fig, name, title)


def agreement(labels: Sequence[str], series: Sequence[tuple[str, Sequence[Interval]]], name: str, title: str) -> str:
    """Agreement (percent) per row label with Wilson intervals, one marker series per prompt group."""
    n = len(labels)
    with _ctx():
        fig, axes = _figure(6.4, 1.2 + 0.34 * n)
        ax = axes[0, 0]
        for j, (group, vals) in enumerate(series):
            off = (j - (len(series) - 1) / 2) * 0.18
            for i, v in enumerate(vals):
                if v.ok:
                    lo, hi = v.err()
                    ax.errorbar([v.value], [i + off], xerr=[[lo], [hi]], fmt=MARKERS[j], color=CYCLE[j], ms=5,
                                capsize=3, label=group if i == 0 else None)
        ax.set_yticks(range(n), labels)
        ax.set_ylim(n - 0.5, -0.5)
        ax.set_xlim(-2, 102)
        ax.set_xlabel("verdicts that agree (%)")
        fig.legend(loc="outside lower center", ncols=len(series))
        return _svg(fig, name, title)


def layer_damage(panels: Sequence[tuple[str, Sequence[int], Sequence[float | None], Sequence[float | None], int]],
                 floor: float, name: str, title: str, ylabel: str = DAMAGE) -> str:
    """Per-layer damage (or another per-layer effect, named by `ylabel`) of K alone and V alone, one panel per
    (title, layers, damage K, damage V, readout layer), with the noise floor as a band."""
    with _ctx():
        fig, axes = _figure(6.4, 2.4 * len(panels) + 0.6, len(panels), 1, sharex=True, sharey=True)
        for ax, (panel_title, layers, dk, dv, readout) in zip(axes[:, 0], panels):
            ax.axhspan(-floor, floor, color=BAND, zorder=0, label="noise floor")
            xs = [l for l, k in zip(layers, dk) if k is not None]
            ax.bar([x - 0.2 for x in xs], [k for k in dk if k is not None], width=0.4, color=BLUE, label="K only")
            xs = [l for l, v in zip(layers, dv) if v is not None]
            ax.bar([x + 0.2 for x in xs], [v for v in dv if v is not None], width=0.4, color=ORANGE, label="V only")
            ax.axvline(readout, color="#555", ls="--", lw=0.8, label="readout layer")
            ax.axhline(0, color="#888", lw=0.6)
            ax.set_title(panel_title, loc="left")
            ax.set_ylabel(ylabel)
        axes[-1, 0].set_xlabel("layer")
        _legend_below(fig, axes, 4)
        return _svg(fig, name, title)


def bit_curves(panels: Sequence[tuple[str, Sequence[tuple[str, Sequence[int], Sequence[Interval]]]]],
               floor: float, thresholds: tuple[float, float], name: str, title: str) -> str:
    """Damage against cache bit width: one panel per rotation setting, one curve per cache (K, V, both)
    with intervals; the collapse and safe thresholds as lines, the noise floor as a band."""
    collapse, safe = thresholds
    with _ctx():
        fig, axes = _figure(6.4, 2.6 * len(panels) + 0.6, len(panels), 1, sharex=True, sharey=True)
        for ax, (panel_title, curves) in zip(axes[:, 0], panels):
            ax.axhspan(-floor, floor, color=BAND, zorder=0, label="noise floor")
            ax.axhline(collapse, color=VERMILION, ls=":", lw=1, label=f"collapse ({collapse:g})")
            ax.axhline(safe, color=GREEN, ls=":", lw=1, label=f"safe ({safe:g})")
            for j, (cache, bits, dmg) in enumerate(curves):
                xs = [b for b, d in zip(bits, dmg) if d.ok]
                ys = [d.value for d in dmg if d.ok]
                errs = [d.err() for d in dmg if d.ok]
                ax.errorbar([x + (j - 1) * 0.06 for x in xs], ys, yerr=[[e[0] for e in errs], [e[1] for e in errs]],
                            fmt="-" + MARKERS[j], color=CYCLE[j], ms=4, capsize=2, label=cache)
            ax.set_title(panel_title, loc="left")
            ax.set_ylabel(DAMAGE)
        axes[-1, 0].set_xlabel("bits per value (intN, group 32)")
        _legend_below(fig, axes, 3)
        return _svg(fig, name, title)
