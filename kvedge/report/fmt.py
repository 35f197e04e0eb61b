"""Number formats every rendering shares: a rate with its interval and k/n, an estimate with its
interval, a plain number. Inputs are the dicts of report.json (`Rate.to_dict`, `Estimate.to_dict`)."""

from __future__ import annotations


def num(x: float | None, digits: int = 3, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def rate(r: dict | None) -> str:
    """`98.3% [91-100] 59/60`: percentage, 95% interval in whole percent, k/n."""
    if not r or r.get("rate") is None:
        return "n/a"
    return f"{100 * r['rate']:.1f}% [{100 * r['lo']:.0f}-{100 * r['hi']:.0f}] {r['k']}/{r['n']}"


def est(e: dict | None, digits: int = 3, signed: bool = False, with_n: bool = False) -> str:
    """`0.078 [0.060, 0.096]`, optionally signed and with `(n=...)`."""
    if not e or e.get("value") is None:
        return "n/a"
    s = num(e["value"], digits, signed)
    if e.get("lo") is not None:
        s += f" [{num(e['lo'], digits, signed)}, {num(e['hi'], digits, signed)}]"
    return s + (f" (n={e['n']})" if with_n else "")


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table: a header row, its rule, one line a row, `|` inside a cell escaped."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in rows)]


def size(n: int | None) -> str:
    """Bytes as `1.5 GiB` / `310.2 MiB`."""
    if n is None:
        return "n/a"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
