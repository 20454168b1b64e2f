"""The comparison tables: every number recounted in the test from the per-image answers."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bitlab.errors import BitlabError
from bitlab.eval import tables
from bitlab.eval.results import Results
from tests.eval.test_stats import mcnemar_exact_by_hand, wilson_by_hand

OBJECTS, BACKGROUNDS = 8, 5


def _results(label: str, seed: int, context: bool = True) -> Results:
    """8 objects (4 classes x 2) on 5 backgrounds, answers drawn at random; the object alone right
    for even objects; background 'b0' a usual context of every class."""
    rng = np.random.default_rng(seed)
    rows = []
    for o in range(OBJECTS):
        for b in range(BACKGROUNDS):
            right = bool(rng.random() < 0.6)
            row = {"image": f"c{o // 2}/o{o}__b{b}.png", "class": f"c{o // 2}", "background": f"b{b}",
                   "fg_uid": f"o{o}", "usual_context": b == 0, "top1_correct": right}
            if context:
                row.update({"object_alone_correct": o % 2 == 0,
                            "context_consistent_error": (not right) and bool(rng.random() < 0.5)})
            rows.append(row)
    df = pd.DataFrame(rows)
    if context:
        for c in ("object_alone_correct", "context_consistent_error"):
            df[c] = df[c].astype("boolean")
    return Results(Path(label), {"model": {"label": label}, "dataset": {"role": "ooc"}}, {}, df)


def test_per_background_counts_and_paired_differences():
    a, b = _results("A", 1), _results("B", 2, context=False)
    t = tables.table([a, b], "background").set_index("background")
    assert list(t.index) == ["(all)", "b0", "b1", "b2", "b3", "b4"]
    pa, pb = a.predictions, b.predictions
    for bg in ("b0", "b3"):
        ra, rb = pa[pa["background"] == bg], pb[pb["background"] == bg]
        k, n = int(ra["top1_correct"].sum()), len(ra)
        assert t.loc[bg, "n"] == n == OBJECTS
        # one image per object on a background: independent images, Wilson's interval
        assert t.loc[bg, "top1[A]"] == pytest.approx(k / n)
        assert (t.loc[bg, "top1_low[A]"], t.loc[bg, "top1_high[A]"]) == pytest.approx(wilson_by_hand(k, n))
        alone = ra["object_alone_correct"].to_numpy(bool)
        right = ra["top1_correct"].to_numpy(bool)
        assert t.loc[bg, "background_gap[A]"] == pytest.approx(alone.mean() - right.mean())
        assert t.loc[bg, "gap_mcnemar_p[A]"] == pytest.approx(
            mcnemar_exact_by_hand(int((alone & ~right).sum()), int((~alone & right).sum())) if (alone != right).any() else 1.0)
        assert t.loc[bg, "fooled_by_context[A]"] == pytest.approx((alone & ~right).mean())
        wrong = ~right
        assert t.loc[bg, "errors[A]"] == wrong.sum()
        if wrong.any():
            assert t.loc[bg, "context_consistent_of_errors[A]"] == pytest.approx(
                ra["context_consistent_error"].to_numpy(bool)[wrong].mean())
        other = rb["top1_correct"].to_numpy(bool)
        assert t.loc[bg, "diff_top1[B - A]"] == pytest.approx(other.mean() - right.mean())
        assert t.loc[bg, "B_only[B - A]"] == int((other & ~right).sum())
        assert t.loc[bg, "A_only[B - A]"] == int((~other & right).sum())
    assert "only_fg_top1[B]" not in t  # B was evaluated without variants: no context columns
    assert math.isclose(t.loc["(all)", "top1[A]"], pa["top1_correct"].mean())


def test_per_class_and_per_object_intervals_know_what_is_independent():
    a = _results("A", 3)
    per_class = tables.table([a], "class").set_index("class")
    assert per_class.loc["c1", "n"] == 2 * BACKGROUNDS
    # (all) holds 8 objects x 5 backgrounds: resampled by object
    per_object = tables.table([a], "object").set_index("object")
    assert per_object.loc["o3", "class"] == "c1" and per_object.loc["(all)", "class"] == ""
    g = a.predictions[a.predictions["fg_uid"] == "o3"]
    k = int(g["top1_correct"].sum())
    # the images of one object are its backgrounds: Wilson over them
    assert (per_object.loc["o3", "top1_low[A]"], per_object.loc["o3", "top1_high[A]"]) == pytest.approx(
        wilson_by_hand(k, BACKGROUNDS))
    # ... but its only_fg answer is one image, whatever the number of composites
    assert (per_object.loc["o2", "only_fg_top1_low[A]"], per_object.loc["o2", "only_fg_top1_high[A]"]) == \
        pytest.approx(wilson_by_hand(1, 1))


def test_models_on_other_images_are_refused():
    a, b = _results("A", 1), _results("B", 2)
    b.predictions.loc[0, "image"] = "elsewhere.png"
    with pytest.raises(BitlabError, match="no prediction for 1 of the images"):
        tables.table([a, b], "class")
    with pytest.raises(BitlabError, match="tables are per"):
        tables.table([a], "pixel")
