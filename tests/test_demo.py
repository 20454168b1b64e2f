"""`bitlab demo`: make-ooc -> evaluate -> report on the embedded sample, offline, figures on disk,
and the out-of-context effect the figures claim, checked against the predictions themselves."""
from __future__ import annotations

import csv
import json

import pandas as pd
import pytest

from bitlab.cli import main
from bitlab.demo import BASELINE, COMPARED, FIG13_IMAGES, LABELS
from bitlab.report import slug
from tests.fixtures.figures import assert_real_figure

REAL = (BASELINE, COMPARED, "efficientnet_lite1.offline_in1k")
FOLDER = {m: slug(LABELS[m]) for m in REAL}  # results folders and figure stems: the friendly labels


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo run: its folders and what it printed. (Its time is measured by benchmarks/demo.py, not
    asserted here: a shared CI machine's load would make a timed test fail by chance.)"""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--out", str(root / "demo_out"), "--figures", str(root / "figures")]) == 0
    return {"out": root / "demo_out", "figures": root / "figures", "printed": printed.getvalue()}


def _predictions(demo, label: str, role: str) -> pd.DataFrame:
    df = pd.read_csv(demo["out"] / "results" / f"{FOLDER.get(label, label)}_{role}" / "predictions.csv",
                     keep_default_na=False)
    assert df["top1_correct"].dtype == bool and df["usual_context"].dtype == bool
    return df


@pytest.mark.slow
def test_demo_runs_the_main_flow_and_leaves_figures(demo):
    printed = demo["printed"]
    assert f"the figures are in {demo['figures']}" in printed
    for stem in ("fig12_left_top5", "fig13_top5", "fig12_right_val_vs_ooc", "backgrounds_BiT-S-R50x1-random-weights",
                 *(f"backgrounds_{FOLDER[m]}" for m in REAL)):
        assert_real_figure(demo["figures"] / f"{stem}.png")
        assert f"{demo['figures'] / stem}.png" in printed
    results = demo["out"] / "results"
    # The baseline knows every object alone (on flat grey, or the lighthouse in its own photo).
    assert json.loads((results / f"{FOLDER[BASELINE]}_val" / "summary.json").read_text())["top1"] == 1.0
    bit = json.loads((results / "BiT-S-R50x1-random-weights_ooc" / "summary.json").read_text())
    # Figures and tables name the models as the notebooks do, never by registry id.
    summary = json.loads((demo["out"] / "summary.json").read_text())
    assert (summary["baseline"], summary["compared"]) == ("EfficientNet-Lite0", "EfficientNet-Lite2")
    assert sorted(summary["models"]) == sorted([*LABELS.values(), "BiT-S-R50x1 (random weights)"])
    assert bit["model"]["pretraining_data"] == "none (random weights)"
    manifest = (demo["out"] / "ooc" / "manifest.csv").read_text().strip().splitlines()
    assert bit["dataset"]["num_images"] == len(manifest) - 1 == 9 * 12  # every make-ooc image evaluated
    # the context, measured: the variants were built and scored, the figure and the tables drawn
    assert_real_figure(demo["figures"] / "context.png")
    for table in ("per_class.csv", "per_background.csv", "per_object.csv"):
        assert f"{demo['figures'] / table}" in printed
    lite0 = json.loads((results / f"{FOLDER[BASELINE]}_ooc" / "summary.json").read_text())
    alone = (demo["out"] / "ooc" / "variants" / "only_fg" / "manifest.csv").read_text().strip().splitlines()
    assert lite0["context"]["variants"]["only_fg"]["n"] == len(alone) - 1
    assert lite0["top1_ci"][0] <= lite0["top1"] <= lite0["top1_ci"][1]
    assert "objects alone (only_fg) top-1" in printed
    s = json.loads((demo["out"] / "summary.json").read_text())
    assert s["models"][s["baseline"]]["context"]["object_alone_correct"] == lite0["context"]["object_alone_correct"]


@pytest.mark.slow
def test_fig13_shows_the_papers_effect_and_no_filler(demo):
    """Every image of Fig. 12 left / 13 meets the paper's rule (baseline wrong, compared model
    right) or, where both are wrong, the baseline's top-1 is among its top 5 on the bare
    background; recomputed here from the predictions, not taken from the summary's flags."""
    s = json.loads((demo["out"] / "summary.json").read_text())
    a = _predictions(demo, BASELINE, "ooc").set_index("image")
    b = _predictions(demo, COMPARED, "ooc").set_index("image")
    bare = s["baseline_background_top5"]
    no_fg = pd.read_csv(demo["out"] / "results" / f"{FOLDER[BASELINE]}_ooc" / "variant_predictions.csv", keep_default_na=False)
    no_fg = no_fg[no_fg["variant"] == "no_fg"]  # the baseline on each bare background, as evaluate wrote it
    assert bare == {r["bg_uid"]: [r[f"top{j}_name"] for j in range(1, 6)] for _, r in no_fg.iterrows()}
    assert len(s["fig13"]) == FIG13_IMAGES and s["fig12_left"] == [s["fig13"][0]["image"]]
    fitting = 0
    for f in s["fig13"]:
        ra, rb = a.loc[f["image"]], b.loc[f["image"]]
        assert (f["baseline_top1"], f["compared_top1"]) == (ra["top1_name"], rb["top1_name"])
        fits = not ra["top1_correct"] and ra["top1_name"] in bare[ra["bg_uid"]]
        assert f["fits_background"] == fits
        assert (not ra["top1_correct"] and rb["top1_correct"]) or (not rb["top1_correct"] and fits), f
        fitting += fits
    assert s["fig13_meet_rule"] == FIG13_IMAGES  # the sample has more than enough such images
    assert fitting >= 2  # the paper's point: a wrong answer that belongs to the background (a whale on the sea)
    for f in s["fig13"]:  # and the printed summary names them
        assert f"{f['class']} on {f['background']}: {s['baseline']} '{f['baseline_top1']}'" in demo["printed"]


@pytest.mark.slow
def test_objects_right_alone_are_wrong_out_of_context(demo):
    s = json.loads((demo["out"] / "summary.json").read_text())
    alone = _predictions(demo, BASELINE, "val").set_index("fg_uid")
    ooc = _predictions(demo, BASELINE, "ooc")
    fooled = {o["fg_uid"]: o for o in s["baseline_fooled_out_of_context"]}
    away = ooc[~ooc["usual_context"]]
    expected = {uid for uid, g in away.groupby("fg_uid")
                if alone.loc[uid, "top1_correct"] and not g["top1_correct"].all()}
    assert set(fooled) == expected and len(expected) >= 3
    for uid, o in fooled.items():
        rows = away[(away["fg_uid"] == uid) & ~away["top1_correct"]]
        assert o["wrong_on"] == dict(zip(rows["background"], rows["top1_name"]))
    # ...while some objects stay right everywhere: a class effect beside the background effect.
    always = ooc.groupby("fg_uid")["top1_correct"].all()
    assert always.sum() >= 2


@pytest.mark.slow
def test_heat_map_shows_a_background_effect(demo):
    """Recomputed from the baseline's predictions: most of the class x background table's variance
    is not the class's (a class-only effect would be horizontal stripes)."""
    s = json.loads((demo["out"] / "summary.json").read_text())
    ooc = _predictions(demo, BASELINE, "ooc")
    table = ooc.pivot_table(index="class", columns="background", values="top1_correct", aggfunc="mean").to_numpy(float)
    total = ((table - table.mean()) ** 2).sum()
    cls = table.shape[1] * ((table.mean(axis=1) - table.mean()) ** 2).sum() / total
    bg = table.shape[0] * ((table.mean(axis=0) - table.mean()) ** 2).sum() / total
    effect = s["models"][s["baseline"]]["background_effect"]
    assert effect["class"] == pytest.approx(cls) and effect["background"] == pytest.approx(bg)
    assert effect["background_dependent"] == pytest.approx(1 - cls) and 1 - cls > 0.5
    assert 0 <= effect["p_value"] <= 1  # reported, not asserted: with each model's reference pre-processing
    # the backgrounds' effect is class-specific (the ocean fools sea animals), not shared by all classes
    assert "background-dependent" in demo["printed"]


def test_in_context_set_keeps_every_foreground_of_a_photo(tmp_path):
    # Two objects cut from one photo are two in-context examples, one per class.
    from bitlab.demo import in_context_set

    photo = tmp_path / "sample" / "openimages" / "validation" / "abc.jpg"
    photo.parent.mkdir(parents=True)
    photo.write_bytes(b"jpeg bytes")
    ooc = tmp_path / "ooc"
    ooc.mkdir()
    rows = [{"fg_uid": f"abc_{c}", "fg_image_id": "abc", "fg_split": "validation", "class": c,
             "ilsvrc_wnids": "n0", "ilsvrc_indices": "0"} for c in ("Cat", "Dog")]
    with (ooc / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows + rows[1:])  # Dog's foreground pasted on two backgrounds
    out = in_context_set(ooc, tmp_path / "val", sample_dir=tmp_path / "sample")
    with (out / "manifest.csv").open(newline="") as f:
        got = sorted((r["class"], r["file"]) for r in csv.DictReader(f))
    assert got == [("Cat", "Cat/abc.jpg"), ("Dog", "Dog/abc.jpg")]
    assert (out / "Dog" / "abc.jpg").read_bytes() == b"jpeg bytes"
