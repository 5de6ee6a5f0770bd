"""Paired bootstrap confidence intervals for the difference between two rows.

Two rows of an evaluation are scored on the same held-out segments, so their losses are
paired: what varies between segments (a hard paragraph, an easy one) is shared by both
rows and cancels in the per-segment difference. The interval is the percentile bootstrap
of the mean of those differences (resampling segments with replacement): it says whether
"row A has a lower loss than row B" holds beyond the luck of which segments were drawn.
Seeded, so the same losses give the same interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import IFPError


@dataclass(frozen=True)
class Interval:
    """Mean of ``a - b`` over ``n`` paired items and its ``level`` confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_json(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "level": self.level,
                "excludes_zero": self.excludes_zero}


def paired_bootstrap(a, b, *, resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> Interval:
    """The mean of ``a[i] - b[i]`` and its percentile bootstrap interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise IFPError(f"paired bootstrap: the two rows must score the same items, got {a.shape} and {b.shape}")
    if a.size < 2:
        raise IFPError(f"paired bootstrap: needs at least 2 paired items, got {a.size}")
    if not 0 < level < 1:
        raise IFPError(f"paired bootstrap: level must be in (0, 1), got {level}")
    d = a - b
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Interval(float(d.mean()), float(low), float(high), int(d.size), level)
