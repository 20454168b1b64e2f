"""`bitlab demo`: make-ooc -> evaluate -> report on the embedded sample, offline, figures on disk."""
from __future__ import annotations

import csv
import json
import time

import pytest

from bitlab.cli import main
from tests.fixtures.figures import assert_real_figure


@pytest.mark.slow
def test_demo_runs_the_main_flow_and_leaves_figures(tmp_path, capsys):
    start = time.perf_counter()
    assert main(["demo", "--out", str(tmp_path / "demo_out"), "--figures", str(tmp_path / "figures")]) == 0
    assert time.perf_counter() - start < 300  # the budget on 2 cores
    printed = capsys.readouterr().out
    assert f"the figures are in {tmp_path / 'figures'}" in printed
    for stem in ("fig12_left_top5", "fig13_top5", "fig12_right_val_vs_ooc",
                 "backgrounds_efficientnet_lite0.offline_in1k", "backgrounds_efficientnet_lite2.offline_in1k",
                 "backgrounds_BiT-S-R50x1-random-weights"):
        assert_real_figure(tmp_path / "figures" / f"{stem}.png")
        assert f"{tmp_path / 'figures' / stem}.png" in printed
    results = tmp_path / "demo_out" / "results"
    for real in ("efficientnet_lite0.offline_in1k", "efficientnet_lite2.offline_in1k"):
        summary = json.loads((results / f"{real}_val" / "summary.json").read_text())
        assert summary["top1"] == 1.0  # the real models know the sample's photos in their own context
    bit = json.loads((results / "BiT-S-R50x1-random-weights_ooc" / "summary.json").read_text())
    assert bit["model"]["pretraining_data"] == "none (random weights)"
    manifest = (tmp_path / "demo_out" / "ooc" / "manifest.csv").read_text().strip().splitlines()
    assert bit["dataset"]["num_images"] == len(manifest) - 1  # every make-ooc image evaluated
    # the context, measured: the variants were built and scored, the figure and the tables drawn
    assert_real_figure(tmp_path / "figures" / "context.png")
    for table in ("per_class.csv", "per_background.csv", "per_object.csv"):
        assert f"{tmp_path / 'figures' / table}" in printed
    lite0 = json.loads((results / "efficientnet_lite0.offline_in1k_ooc" / "summary.json").read_text())
    alone = (tmp_path / "demo_out" / "ooc" / "variants" / "only_fg" / "manifest.csv").read_text().strip().splitlines()
    assert lite0["context"]["variants"]["only_fg"]["n"] == len(alone) - 1
    assert lite0["top1_ci"][0] <= lite0["top1"] <= lite0["top1_ci"][1]
    assert "objects alone (only_fg) top-1" in printed


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
