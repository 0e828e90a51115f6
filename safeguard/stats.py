"""Small, exact statistics used by probes and the gate."""
from __future__ import annotations

import math


def wilson_interval(hits: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a proportion; (0, 1) when n == 0 (nothing is known)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def roc_auc(scores: list[float], labels: list[bool]) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def min_samples_for(threshold: float, z: float = 1.959963984540054) -> int:
    """Smallest n whose Wilson upper bound with zero hits is at most ``threshold``."""
    if threshold <= 0:
        raise ValueError("a zero threshold can never be shown with finite samples")
    return math.ceil(z * z * (1 - threshold) / threshold - 1e-9)


def samples_needed(rate: float, threshold: float, z: float = 1.959963984540054, limit: int = 10**7) -> int | None:
    """Smallest n whose Wilson upper bound at the observed ``rate`` is at most ``threshold``; None if none
    up to ``limit`` (a rate at or over the threshold can never pass)."""
    if rate >= threshold:
        return None

    def upper(n: int) -> float:
        return wilson_interval(round(rate * n), n, z)[1]

    hi = 1
    while upper(hi) > threshold:
        hi *= 2
        if hi > limit:
            return None
    lo = hi // 2
    while lo + 1 < hi:  # the bound shrinks with n (up to rounding of the hit count), so bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if upper(mid) > threshold else (lo, mid)
    return hi
