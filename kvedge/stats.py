"""Small, dependency-free statistics: every rate kvedge prints comes with its n and an interval."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

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

    def fmt(self, pct: bool = True) -> str:
        if self.rate is None:
            return f"n/a (n={self.n})"
        f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.3f}")
        return f"{f(self.rate)} [{f(self.lo)}, {f(self.hi)}] ({self.k}/{self.n})"


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

    def fmt(self, digits: int = 3) -> str:
        if self.value is None:
            return f"n/a (n={self.n})"
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}] (n={self.n})"


def bootstrap(
    samples: Sequence[Sequence[float]],
    statistic: Callable[..., float | None],
    n_boot: int = 2000,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap over prompts. `samples` are parallel per-prompt columns resampled together
    (paired), so ratios of two configs on the same prompts keep their pairing. Seeded: the same data
    gives the same interval."""
    n = len(samples[0]) if samples else 0
    value = statistic(*samples) if n else None
    if value is None or n < 2:
        return Estimate(value, value, value, n, "bootstrap")
    rng = random.Random(seed)
    stats: list[float] = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        v = statistic(*[[col[i] for i in idx] for col in samples])
        if v is not None and math.isfinite(v):
            stats.append(v)
    if not stats:
        return Estimate(value, None, None, n, "bootstrap")
    stats.sort()
    lo = stats[int(0.025 * (len(stats) - 1))]
    hi = stats[int(math.ceil(0.975 * (len(stats) - 1)))]
    return Estimate(value, lo, hi, n, "bootstrap")


def mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def ratio_of_means(a: Sequence[float], b: Sequence[float]) -> float | None:
    ma, mb = mean(a), mean(b)
    if ma is None or mb is None or mb == 0:
        return None
    return ma / mb


def mean_estimate(xs: Sequence[float]) -> Estimate:
    return bootstrap([list(xs)], mean)


def ratio_estimate(a: Sequence[float], b: Sequence[float]) -> Estimate:
    """mean(a)/mean(b) with a paired bootstrap interval (a and b measured on the same prompts)."""
    return bootstrap([list(a), list(b)], ratio_of_means)
