"""Small statistics: every rate kvedge prints comes with its n and an interval."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Rate:
    """k successes of n, with a 95% Wilson score interval."""

    k: int
    n: int
    rate: float | None
    lo: float | None
    hi: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def wilson(k: int, n: int, z: float = Z95) -> Rate:
    if n <= 0:
        return Rate(k, n, None, None, None)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the closed form leaves ~1e-17 of rounding at the ends; at k=0 (k=n) the bound is exactly 0 (1)
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return Rate(k, n, p, lo, hi)


def binom_two_sided(k: int, n: int, p: float = 0.5) -> float:
    """Exact two-sided binomial p-value (sum of outcomes no more likely than k)."""
    if n == 0:
        return 1.0
    pmf = [math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(n + 1)]
    tol = pmf[k] * (1 + 1e-7)
    return min(1.0, sum(x for x in pmf if x <= tol))


def binom_greater(k: int, n: int, p: float = 0.5) -> float:
    """Exact one-sided P(X >= k) for X ~ Binomial(n, p)."""
    if n == 0:
        return 1.0
    return min(1.0, sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def mcnemar_exact(b: int, c: int) -> float:
    """Exact McNemar test on the discordant pairs b (lost) and c (gained)."""
    return binom_two_sided(b, b + c, 0.5)


@dataclass(frozen=True)
class Estimate:
    """A mean (or ratio) over prompts with a 95% interval and the n it came from."""

    value: float | None
    lo: float | None
    hi: float | None
    n: int
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap(
    samples: Sequence[Sequence[float]],
    statistic: Callable[..., np.ndarray],
    n_boot: int = 2000,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap over prompts. `samples` are parallel per-prompt columns resampled together
    (paired), so ratios of two configs on the same prompts keep their pairing. `statistic` takes the
    columns as float arrays whose last axis runs over prompts and returns one value per leading index
    (nan where undefined): it is called once on the data and once on all resamples together. Seeded:
    the same data gives the same interval."""
    cols = [np.asarray(c, dtype=np.float64) for c in samples]
    n = cols[0].shape[-1] if cols else 0
    if n == 0:
        return Estimate(None, None, None, 0, "bootstrap")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        v = float(statistic(*cols))
        value = v if math.isfinite(v) else None
        if value is None or n < 2:
            return Estimate(value, value, value, n, "bootstrap")
        idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        stats = np.asarray(statistic(*[c[idx] for c in cols]), dtype=np.float64)
    stats = np.sort(stats[np.isfinite(stats)])
    if not stats.size:
        return Estimate(value, None, None, n, "bootstrap")
    lo = float(stats[int(0.025 * (stats.size - 1))])
    hi = float(stats[int(math.ceil(0.975 * (stats.size - 1)))])
    return Estimate(value, lo, hi, n, "bootstrap")


def mean(xs: np.ndarray) -> np.ndarray:
    return xs.mean(axis=-1)


def ratio_of_means(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """mean(a) / mean(b) of paired columns, computed as sum(a) / sum(b) (4 of 5 refusals kept is exactly
    0.8); nan where sum(b) is 0."""
    sb = b.sum(axis=-1)
    return np.where(sb != 0, a.sum(axis=-1) / np.where(sb != 0, sb, 1.0), np.nan)


def difference_of_means(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """mean(a) - mean(b) of paired columns."""
    return a.mean(axis=-1) - b.mean(axis=-1)


def mean_estimate(xs: Sequence[float]) -> Estimate:
    return bootstrap([list(xs)], mean)


def ratio_estimate(a: Sequence[float], b: Sequence[float]) -> Estimate:
    """mean(a)/mean(b) with a paired bootstrap interval (a and b measured on the same prompts)."""
    return bootstrap([list(a), list(b)], ratio_of_means)
