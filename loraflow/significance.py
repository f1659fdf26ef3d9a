"""Is one model better than another on the same rows, beyond the noise of the sample? A paired
bootstrap of the mean per-row difference: rows are resampled with replacement, both models' scores
of a row stay together, so what the rows have in common (hard rows, easy rows) cancels out.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Difference:
    """mean(a - b) over the rows, with its confidence interval."""
    a: float
    b: float
    difference: float
    low: float
    high: float
    rows: int
    confidence: float

    def clears(self, margin: float) -> bool:
        """The whole interval lies above `margin`: a gain of more than `margin`, beyond the noise (a
        model scoring exactly as its rival, row for row, does not clear 0)."""
        return self.low > margin

    def verdict(self, margin: float) -> str:
        if self.clears(margin):
            return "pass"
        return "not significant" if self.difference >= margin else "FAIL"

    def describe(self) -> str:
        return (f"{self.a:.4f} vs {self.b:.4f}: {self.difference:+.4f} "
                f"({self.confidence:.0%} interval {self.low:+.4f} to {self.high:+.4f}, {self.rows} rows)")

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def paired_bootstrap(a: Sequence[float | None], b: Sequence[float | None], resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> Difference | None:
    """The difference of means of a and b on the rows both scored (None: a row the metric does not
    score), with a percentile bootstrap interval. Seeded, so the same scores give the same interval.
    None when no row is scored by both."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not pairs:
        return None
    scores = np.asarray(pairs, dtype=np.float64)
    diff = scores[:, 0] - scores[:, 1]
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // len(diff))  # bounded memory for large eval sets
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        means[start:start + n] = diff[rng.integers(0, len(diff), size=(n, len(diff)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Difference(a=float(scores[:, 0].mean()), b=float(scores[:, 1].mean()), difference=float(diff.mean()),
                      low=float(low), high=float(high), rows=len(diff), confidence=confidence)
