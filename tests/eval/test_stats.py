"""Intervals and paired tests, each checked against an independent computation in the test."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bitlab.eval import stats

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_by_hand(k: float, n: int) -> tuple[float, float]:
    p, z2 = k / n, Z95 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(0, 10), (3, 12), (40, 41), (500, 1000), (1, 1)])
def test_wilson_interval_is_the_score_interval(k, n):
    est = stats.accuracy(np.arange(n) < k)
    assert est.method == "wilson" and est.n == n and est.value == k / n
    assert (est.low, est.high) == pytest.approx(wilson_by_hand(k, n), abs=1e-12)


def clustered(objects: int, per_object: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each object is recognised on all its backgrounds or on none: the extreme of dependence."""
    rng = np.random.default_rng(seed)
    right = rng.random(objects) < 0.6
    return np.repeat(right, per_object), np.repeat(np.arange(objects), per_object)


def test_bootstrap_over_objects_matches_resampling_objects_by_hand():
    correct, objects = clustered(30, 41, seed=1)
    est = stats.accuracy(correct, objects)
    assert est.method == "bootstrap over objects" and est.clusters == 30 and est.n == 30 * 41
    # the same percentile bootstrap written out: resample 30 objects with replacement
    per_object = correct.reshape(30, 41).mean(1)
    rng = np.random.default_rng(123)
    draws = per_object[rng.integers(0, 30, size=(20000, 30))].mean(1)
    low, high = np.percentile(draws, [2.5, 97.5])
    assert est.low == pytest.approx(low, abs=0.02) and est.high == pytest.approx(high, abs=0.02)
    # 1,230 images but the information of 30 objects: far wider than treating images as independent
    naive = stats.wilson(int(correct.sum()), len(correct))
    assert (est.high - est.low) > 3 * (naive.high - naive.low)


def test_bootstrap_is_seeded_and_falls_back_to_objects_when_every_image_agrees():
    correct, objects = clustered(20, 5, seed=2)
    assert stats.accuracy(correct, objects) == stats.accuracy(correct, objects)
    all_right = stats.accuracy(np.ones(100, bool), np.repeat(np.arange(20), 5))
    assert all_right.value == 1.0 and all_right.method == "wilson over objects"
    assert (all_right.low, all_right.high) == pytest.approx(wilson_by_hand(20, 20))
    # one image per object is the independent case
    assert stats.accuracy(correct[::5], objects[::5]).method == "wilson"


def mcnemar_exact_by_hand(b: int, c: int) -> float:
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def test_paired_difference_counts_discordant_images_and_tests_them_exactly():
    rng = np.random.default_rng(3)
    a = rng.random(200) < 0.7
    b = a.copy()
    flip = rng.choice(200, 30, replace=False)
    b[flip[:22]] = False  # B loses 22 images A has (some were already wrong: count them)
    b[flip[22:]] = True
    d = stats.paired_difference(a, b)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    assert (d.a_only, d.b_only) == (a_only, b_only)
    assert d.difference.value == pytest.approx((a_only - b_only) / 200)
    assert d.mcnemar_p == pytest.approx(mcnemar_exact_by_hand(a_only, b_only), rel=1e-9)
    assert d.difference.low < d.difference.value < d.difference.high
    assert d.difference.method == "bootstrap over images"


def test_paired_difference_of_identical_answers_is_exactly_zero():
    a = np.array([True, False, True, True])
    d = stats.paired_difference(a, a.copy(), np.array([0, 0, 1, 1]))
    assert d.mcnemar_p == 1.0 and (d.difference.value, d.difference.low, d.difference.high) == (0.0, 0.0, 0.0)


def test_paired_difference_over_objects_is_wider_than_over_images():
    rng = np.random.default_rng(4)
    objects = np.repeat(np.arange(25), 8)
    a = np.repeat(rng.random(25) < 0.7, 8)  # A: object-level all or nothing
    b = rng.random(200) < 0.5
    by_images = stats.paired_difference(a, b).difference
    by_objects = stats.paired_difference(a, b, objects).difference
    assert by_objects.method == "bootstrap over objects" and by_objects.clusters == 25
    assert (by_objects.high - by_objects.low) > 1.5 * (by_images.high - by_images.low)


def test_separated_names_only_groups_whose_interval_clears_the_rest():
    groups = {"water": stats.wilson(2, 40), "grass": stats.wilson(20, 40), "sky": stats.wilson(18, 40)}
    rest = {"water": stats.wilson(38, 80), "grass": stats.wilson(20, 80), "sky": stats.wilson(22, 80)}
    assert stats.separated(groups, rest, "low") == ["water"]
    assert stats.separated(groups, rest, "high") == []
    with pytest.raises(ValueError):
        stats.separated(groups, rest, "middle")


def test_few_objects_give_an_interval_over_images_that_says_so():
    """One object on 12 backgrounds: no spread between objects to resample; the interval is
    Wilson's over its images, and the method names the object count."""
    correct = np.arange(12) < 7
    est = stats.accuracy(correct, np.zeros(12, int))
    assert est.method == "wilson over images (1 objects)" and est.clusters == 1
    assert (est.low, est.high) == pytest.approx(wilson_by_hand(7, 12))
    four = stats.accuracy(np.arange(16) % 3 == 0, np.repeat(np.arange(4), 4))
    assert four.method == "wilson over images (4 objects)"
    five = stats.accuracy(np.arange(20) % 3 == 0, np.repeat(np.arange(5), 4))
    assert five.method == "bootstrap over objects" and five.clusters == 5
    d = stats.paired_difference(np.arange(12) < 7, np.arange(12) < 3, np.zeros(12, int))
    assert d.difference.method == "bootstrap over images (1 objects)" and d.difference.clusters is None


def test_estimates_serialise_without_nan():
    empty = stats.accuracy(np.zeros(0, bool))
    assert empty.to_dict()["value"] is None and empty.interval == [None, None]
    assert "clusters" not in stats.wilson(1, 2).to_dict()
    import json
    json.dumps(empty.to_dict(), allow_nan=False)  # valid JSON


def test_by_group_pools_the_rest_and_feeds_separated():
    correct = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], bool)
    groups = np.array(["water"] * 8 + ["grass"] * 8 + ["sky"] * 8)
    own, rest = stats.by_group(correct, groups)
    assert own["water"].value == 0.0 and rest["water"].value == 1.0 and rest["water"].n == 16
    assert (rest["grass"].value, rest["grass"].n) == (0.5, 16)
    assert stats.separated(own, rest, "low") == ["water"]
    # counted by hand: each group's interval is Wilson over its 8 images
    assert (own["sky"].low, own["sky"].high) == pytest.approx(wilson_by_hand(8, 8))


def test_mean_over_objects_resamples_objects():
    rng = np.random.default_rng(5)
    shares = rng.integers(0, 42, 30) / 41  # 30 objects, the share of their 41 backgrounds that fool
    est = stats.mean_over_objects(shares)
    draws = shares[np.random.default_rng(9).integers(0, 30, size=(20000, 30))].mean(1)
    low, high = np.percentile(draws, [2.5, 97.5])
    assert est.method == "bootstrap over objects" and est.value == pytest.approx(shares.mean())
    assert est.low == pytest.approx(low, abs=0.01) and est.high == pytest.approx(high, abs=0.01)
    few = stats.mean_over_objects(np.array([0.5, 0.25]))
    assert few.method == "wilson over objects" and (few.low, few.high) == pytest.approx(wilson_by_hand(0.75, 2))
