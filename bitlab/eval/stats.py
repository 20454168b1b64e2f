"""Uncertainty of accuracies: intervals, paired comparisons of two models, separated rankings.

- A proportion over independent images: the Wilson score interval (statsmodels), which keeps its
  coverage at small n and near 0 or 1, where the normal-approximation interval does not.
- An accuracy over out-of-context images: the images of one foreground object (up to 41
  backgrounds) are not independent, so the interval is a bootstrap that resamples objects, each
  with all its images (scipy's `bootstrap` on per-object sums). Where every image agrees the
  bootstrap has no spread; then the Wilson interval counts each object once. With fewer than
  `MIN_OBJECTS` objects a bootstrap has too few distinct resamples to show the spread between
  objects; then the interval is Wilson's over the images, and its method says that it speaks for
  these objects only (a class with one object: its backgrounds, not other objects of the class).
- Two models on the same images: the paired difference with a bootstrap interval (over objects,
  or over images when there are no objects) and McNemar's exact test on the discordant images.
- A ranking (most fooling backgrounds, hardest classes) names a group only when its interval lies
  wholly on one side of the interval of all other images pooled.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

# scipy.stats and statsmodels are imported where they are used: together they take ~1.4 s to
# import, paid otherwise by every command and notebook that imports bitlab.report and never
# computes an interval (ooc_tour, fewshot).

CONFIDENCE = 0.95
# 2,000 resamples put the Monte Carlo error of a 95 % percentile bound near 0.2 points for an
# accuracy over 81 objects, below the rounding of the one-decimal percentages the figures show.
RESAMPLES = 2000
SEED = 0  # the bootstrap is seeded: a rerun writes the same intervals
# Below 5 objects a bootstrap over objects has at most 126 distinct resamples (multisets of 5 from
# 5) and its percentile bounds sit on the few per-object means: too coarse to call an interval.
MIN_OBJECTS = 5


@dataclass(frozen=True)
class Estimate:
    """An accuracy (or a difference of two) with its `CONFIDENCE` interval."""

    value: float
    low: float
    high: float
    n: int  # images
    method: str  # "wilson" | "bootstrap over objects" | "bootstrap over images"
    clusters: int | None = None  # objects resampled (bootstrap over objects)

    def to_dict(self) -> dict:
        """As JSON wants it: NaN (no images) becomes None, and `clusters` is left out when unused."""
        out = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in asdict(self).items()}
        if out["clusters"] is None:
            del out["clusters"]
        return out

    @property
    def interval(self) -> list[float | None]:
        """[low, high], None for an undefined bound (JSON has no NaN)."""
        return [None if np.isnan(v) else v for v in (self.low, self.high)]


def wilson(successes: float, n: int, confidence: float = CONFIDENCE) -> Estimate:
    """`successes` of `n` independent trials, with the Wilson score interval (a fractional count is
    fine: `mean_over_objects` passes the sum of per-object shares)."""
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, "wilson")
    low, high = proportion_confint(successes, n, alpha=1 - confidence, method="wilson")
    return Estimate(successes / n, float(low), float(high), n, "wilson")


def _per_cluster(values: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums of `values` (N or N x m) and image counts per cluster."""
    _, inverse = np.unique(clusters, return_inverse=True)
    counts = np.bincount(inverse).astype(float)
    if values.ndim == 1:
        return np.bincount(inverse, weights=values), counts
    return np.stack([np.bincount(inverse, weights=v) for v in values.T], axis=1), counts


def _bootstrap(statistic, data: tuple[np.ndarray, ...], confidence: float, seed: int) -> tuple[float, float]:
    from scipy import stats as sps

    res = sps.bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=RESAMPLES,
                        confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def accuracy(correct: np.ndarray, clusters: np.ndarray | None = None, *, confidence: float = CONFIDENCE,
             seed: int = SEED) -> Estimate:
    """The share of `correct` (booleans), with an interval: Wilson when images are independent
    (`clusters` None, or one image per cluster), else a bootstrap over clusters (objects)."""
    correct = np.asarray(correct, dtype=float)
    n = len(correct)
    if clusters is None or n == 0 or len(np.unique(clusters)) == n:
        return wilson(int(correct.sum()), n, confidence)
    sums, counts = _per_cluster(correct, np.asarray(clusters))
    value = float(correct.mean())
    if np.all(correct == correct[0]):  # no spread to resample: each object counted once
        once = wilson(int(round(value * len(sums))), len(sums), confidence)
        return Estimate(value, once.low, once.high, n, "wilson over objects", len(sums))
    if len(sums) < MIN_OBJECTS:  # too few objects to resample: an interval for these objects only
        images = wilson(int(correct.sum()), n, confidence)
        return Estimate(value, images.low, images.high, n, f"wilson over images ({len(sums)} objects)", len(sums))
    low, high = _bootstrap(lambda s, c, axis=-1: s.sum(axis) / c.sum(axis), (sums, counts), confidence, seed)
    return Estimate(value, low, high, n, "bootstrap over objects", len(sums))


def mean_over_objects(values: np.ndarray, *, confidence: float = CONFIDENCE, seed: int = SEED) -> Estimate:
    """The mean of one number per object (a share in [0, 1], e.g. of its backgrounds that fool the
    model), each object weighing alike: a bootstrap over the objects; below `MIN_OBJECTS`, or when
    all agree, Wilson's interval with each object counted once (its share as a fractional success)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, "wilson over objects", 0)
    value = float(values.mean())
    if n < MIN_OBJECTS or np.all(values == values[0]):
        once = wilson(value * n, n, confidence)  # a fractional count of successes: Wilson takes it
        return Estimate(value, once.low, once.high, n, "wilson over objects", n)
    low, high = _bootstrap(lambda v, axis=-1: v.mean(axis), (values,), confidence, seed)
    return Estimate(value, low, high, n, "bootstrap over objects", n)


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of model A minus model B on the same images."""

    difference: Estimate
    a_only: int  # images A gets right and B wrong
    b_only: int
    mcnemar_p: float  # exact (binomial) McNemar test of a_only vs b_only

    def to_dict(self) -> dict:
        return {**self.difference.to_dict(), "a_only": self.a_only, "b_only": self.b_only,
                "mcnemar_p": self.mcnemar_p}


def paired_difference(a: np.ndarray, b: np.ndarray, clusters: np.ndarray | None = None, *,
                      confidence: float = CONFIDENCE, seed: int = SEED) -> PairedDifference:
    """A's accuracy minus B's on the same images (booleans in the same order), with a paired
    bootstrap interval over clusters (objects; each image its own cluster when None) and the
    exact McNemar p-value."""
    from statsmodels.stats.contingency_tables import mcnemar

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired results need the same images: {a.shape} vs {b.shape}")
    n = len(a)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    p = float(mcnemar([[0, a_only], [b_only, 0]], exact=True).pvalue) if a_only + b_only else 1.0
    value = float(a.mean() - b.mean()) if n else float("nan")
    objects = len(np.unique(clusters)) if clusters is not None else n
    by_objects = MIN_OBJECTS <= objects < n
    method = "bootstrap over objects" if by_objects else "bootstrap over images"
    if objects < min(MIN_OBJECTS, n):  # as `accuracy`: these objects only
        method += f" ({objects} objects)"
    if n == 0 or a_only + b_only == 0:  # identical answers: no difference to resample
        est = Estimate(value, value, value, n, method)
    else:
        groups = np.asarray(clusters) if by_objects else np.arange(n)
        sums, counts = _per_cluster(a.astype(float) - b.astype(float), groups)
        low, high = _bootstrap(lambda s, c, axis=-1: s.sum(axis) / c.sum(axis), (sums, counts), confidence, seed)
        est = Estimate(value, low, high, n, method, len(sums) if by_objects else None)
    return PairedDifference(est, a_only, b_only, p)


def by_group(correct: np.ndarray, groups: np.ndarray, clusters: np.ndarray | None = None, *,
             confidence: float = CONFIDENCE) -> tuple[dict[str, Estimate], dict[str, Estimate]]:
    """Each group's accuracy and the accuracy of all other images pooled (`separated`'s inputs),
    each with its interval (`accuracy`, clustered by `clusters`)."""
    correct, groups = np.asarray(correct, dtype=bool), np.asarray(groups)
    clusters = None if clusters is None else np.asarray(clusters)
    own, rest = {}, {}
    for g in sorted(set(groups.tolist())):
        inside = groups == g
        own[g] = accuracy(correct[inside], None if clusters is None else clusters[inside], confidence=confidence)
        rest[g] = accuracy(correct[~inside], None if clusters is None else clusters[~inside], confidence=confidence)
    return own, rest


def separated(groups: Mapping[str, Estimate], rest: Mapping[str, Estimate], side: str = "low") -> list[str]:
    """The groups whose interval lies wholly below (`side="low"`) or above the interval of the rest
    (`rest[g]`: every other image pooled), lowest (highest) first. Empty: nothing is separated."""
    if side not in ("low", "high"):
        raise ValueError(f"side must be 'low' or 'high', got {side!r}")
    if side == "low":
        hits = [g for g, e in groups.items() if e.high < rest[g].low]
        return sorted(hits, key=lambda g: (groups[g].value, g))
    hits = [g for g, e in groups.items() if e.low > rest[g].high]
    return sorted(hits, key=lambda g: (-groups[g].value, g))
