"""Number formats every rendering shares: a rate with its interval and k/n, an estimate with its
interval, a plain number. Inputs are `kvedge.stats.Rate` / `Estimate`, or their dicts in a JSON document."""

from __future__ import annotations

from typing import Any


def field(x: Any, name: str) -> Any:
    """A Rate's or Estimate's field, whether it is the typed value or its dict."""
    return x.get(name) if isinstance(x, dict) else getattr(x, name, None)


def num(x: float | None, digits: int = 3, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def rate(r: Any) -> str:
    """`98.3% [91-100] 59/60`: percentage, 95% interval in whole percent, k/n."""
    if not r or field(r, "rate") is None:
        return "n/a"
    f = lambda name: field(r, name)  # noqa: E731
    return f"{100 * f('rate'):.1f}% [{100 * f('lo'):.0f}-{100 * f('hi'):.0f}] {f('k')}/{f('n')}"


def est(e: Any, digits: int = 3, signed: bool = False, with_n: bool = False) -> str:
    """`0.078 [0.060, 0.096]`, optionally signed and with `(n=...)`."""
    if not e or field(e, "value") is None:
        return "n/a"
    s = num(field(e, "value"), digits, signed)
    if field(e, "lo") is not None:
        s += f" [{num(field(e, 'lo'), digits, signed)}, {num(field(e, 'hi'), digits, signed)}]"
    return s + (f" (n={field(e, 'n')})" if with_n else "")


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
