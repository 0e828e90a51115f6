"""Small, exact statistics used by probes and the gate."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist


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


# ---- clustered intervals, sequential looks, ratios ------------------------------------------------------
# Images that share a prompt are not independent draws: a prompt that leaks tends to leak for every seed.
# Every proportion is therefore estimated with the prompt as the cluster: the Wilson interval is computed on
# the effective sample size n / deff, with the design effect deff = 1 + (m - 1) * icc from the intra-prompt
# correlation. An attack's output is a single prompt, so its seeds are independent draws for that prompt.

@dataclass(frozen=True)
class ClusteredProportion:
    hits: int
    n: int
    clusters: int
    rate: float | None
    low: float
    high: float
    n_effective: float
    design_effect: float
    icc: float | None  # the intra-prompt correlation used; None for a single cluster
    icc_source: str  # "estimated", "original model", "assumed" or "single prompt"

    def as_dict(self) -> dict:
        return {"hits": self.hits, "n": self.n, "prompts": self.clusters, "rate": self.rate, "ci_low": self.low,
                "ci_high": self.high, "n_effective": round(self.n_effective, 2),
                "design_effect": round(self.design_effect, 3), "icc": None if self.icc is None else round(self.icc, 4),
                "icc_source": self.icc_source}


def z_for(confidence: float = 0.95, looks: int = 1) -> float:
    """Two-sided normal quantile for ``confidence`` with the error split evenly over ``looks`` planned looks
    (Bonferroni alpha spending: valid whatever rule decides when to stop)."""
    alpha = (1 - confidence) / max(1, looks)
    return NormalDist().inv_cdf(1 - alpha / 2)


def intra_cluster_correlation(clusters: Sequence[tuple[int, int]]) -> float | None:
    """One-way ANOVA estimate of the intra-cluster correlation of binary outcomes, clipped to [0, 1];
    None when it cannot be estimated (fewer than two clusters, or no variation at all)."""
    clusters = [(h, m) for h, m in clusters if m > 0]
    k, n = len(clusters), sum(m for _, m in clusters)
    if k < 2 or n <= k:
        return None
    p = sum(h for h, _ in clusters) / n
    msb = sum(m * (h / m - p) ** 2 for h, m in clusters) / (k - 1)
    msw = sum(h * (1 - h / m) for h, m in clusters) / (n - k)
    m0 = (n - sum(m * m for _, m in clusters) / n) / (k - 1)
    denom = msb + (m0 - 1) * msw
    if denom <= 0:
        return None
    return min(1.0, max(0.0, (msb - msw) / denom))


def clustered_proportion(clusters: Sequence[tuple[int, int]], z: float = 1.959963984540054, *,
                         fallback_icc: float | None = None, assumed_icc: float = 0.2) -> ClusteredProportion:
    """Proportion of hits over (hits, images) clusters with a design-effect-corrected Wilson interval.

    The correlation comes from the clusters themselves where they vary, else ``fallback_icc`` (the same
    prompts and seeds on the original model), else ``assumed_icc``."""
    clusters = [(int(h), int(m)) for h, m in clusters if m > 0]
    hits, n, k = sum(h for h, _ in clusters), sum(m for _, m in clusters), len(clusters)
    if n == 0:
        return ClusteredProportion(0, 0, 0, None, 0.0, 1.0, 0.0, 1.0, None, "no samples")
    if k == 1:
        icc, source, deff = None, "single prompt", 1.0
    else:
        icc, source = intra_cluster_correlation(clusters), "estimated"
        if icc is None and fallback_icc is not None:
            icc, source = fallback_icc, "original model"
        if icc is None:
            icc, source = assumed_icc, "assumed"
        size = sum(m * m for _, m in clusters) / n  # size-weighted mean cluster size
        deff = max(1.0, 1 + (size - 1) * icc)
    n_eff = n / deff
    rate = hits / n
    low, high = _wilson_float(rate, n_eff, z)
    return ClusteredProportion(hits, n, k, rate, low, high, n_eff, deff, icc, source)


def _wilson_float(p: float, n: float, z: float) -> tuple[float, float]:
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n))) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def ratio_interval(edited: ClusteredProportion, original: ClusteredProportion) -> tuple[float | None, float | None, float | None]:
    """Retention edited/original with a MOVER-R interval (Donner and Zou) from the two proportions' intervals.

    It treats the two proportions as independent; the same prompts and seeds make them positively
    correlated, so the interval is conservative. (None, None, None) when the original never hit."""
    p1, p2 = edited.rate, original.rate
    if p1 is None or not p2:
        return None, None, None
    l1, u1, l2, u2 = edited.low, edited.high, original.low, original.high
    prod = p1 * p2
    low_disc = max(0.0, prod ** 2 - l1 * u2 * (2 * p1 - l1) * (2 * p2 - u2))
    low = (prod - math.sqrt(low_disc)) / (u2 * (2 * p2 - u2))
    if l2 <= 0:
        high = math.inf
    else:
        high_disc = max(0.0, prod ** 2 - u1 * l2 * (2 * p1 - u1) * (2 * p2 - l2))
        high = (prod + math.sqrt(high_disc)) / (l2 * (2 * p2 - l2))
    return p1 / p2, max(0.0, low), high


def clustered_mean(values_by_cluster: Sequence[Sequence[float]], z: float = 1.959963984540054) -> tuple[float | None, float | None, float | None]:
    """Mean of per-cluster means with a normal interval over clusters (values such as image similarities)."""
    means = [sum(v) / len(v) for v in values_by_cluster if len(v)]
    if not means:
        return None, None, None
    mean = sum(means) / len(means)
    if len(means) < 2:
        return mean, None, None
    sd = math.sqrt(sum((m - mean) ** 2 for m in means) / (len(means) - 1))
    half = z * sd / math.sqrt(len(means))
    return mean, mean - half, mean + half
