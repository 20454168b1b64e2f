"""`bitlab report`: every figure is drawn from real evaluation results and is a real picture."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bitlab import report
from bitlab.cli import main
from bitlab.errors import BitlabError
from bitlab.eval.evaluate import EvaluateConfig, evaluate
from bitlab.models import zoo
from tests.fixtures.figures import assert_real_figure
from tests.fixtures.ooc_sets import build_tiny_ooc

GREEN = np.array([46, 125, 50])  # report.CORRECT


@pytest.fixture(scope="module")
def results(tmp_path_factory, photos) -> dict[str, Path]:
    """Two models (the real offline one, a random tiny ResNetV2) on a tiny OOC set and on a
    validation folder of its in-context photos."""
    root = tmp_path_factory.mktemp("report")
    ooc = build_tiny_ooc(root / "ooc", photos)
    val = root / "val"
    for wnid, image in (("n02123045", "cat/chelsea__in-context.png"), ("n07920052", "espresso/coffee__in-context.png"),
                        ("n03773504", "missile/rocket__in-context.png")):
        (val / wnid).mkdir(parents=True)
        shutil.copy(ooc / image, val / wnid)
    out = {}
    torch.manual_seed(0)
    for key, model, extra in (("real", zoo.OFFLINE_IMAGENET_MODEL, {}),
                              ("random", "R14x0.5", {"image_size": 64, "label": "R14x0.5 (random)"})):
        for role, data in (("ooc", ooc), ("val", val)):
            out[f"{key}_{role}"] = root / f"{key}_{role}"
            evaluate(EvaluateConfig(model=model, data=str(data), out=str(out[f"{key}_{role}"]), **extra))
    return out


def _has_colour(img: np.ndarray, rgb: np.ndarray, tol: int = 12, pixels: int = 100) -> bool:
    return bool((np.abs(img.astype(int) - rgb).max(-1) <= tol).sum() > pixels)


def test_make_report_draws_every_figure(results, tmp_path, capsys):
    dirs = [results[k] for k in ("random_ooc", "real_ooc", "random_val", "real_val")]
    assert main(["report", *map(str, dirs), "--out", str(tmp_path / "fig"), "--num-images", "3"]) == 0
    names = {p.name for p in (tmp_path / "fig").iterdir()}
    stems = {"fig12_left_top5", "fig13_top5", "fig12_right_val_vs_ooc", "backgrounds_R14x0.5-random",
             "backgrounds_efficientnet_lite0.offline_in1k"}
    assert names == {f"{s}.{ext}" for s in stems for ext in ("png", "pdf")}
    assert "figures in" in capsys.readouterr().out
    fig13 = assert_real_figure(tmp_path / "fig" / "fig13_top5.png", min_h=600)
    assert _has_colour(fig13, GREEN)  # correct labels highlighted: the real model is right on these
    left = assert_real_figure(tmp_path / "fig" / "fig12_left_top5.png")
    assert left.shape[0] < fig13.shape[0]  # one image row, Fig. 13 has three
    right = assert_real_figure(tmp_path / "fig" / "fig12_right_val_vs_ooc.png")
    for rgb in ((0x15, 0x65, 0xC0), (0xEF, 0x6C, 0x00)):  # one marker per pre-training colour (alpha 0.85 on white)
        assert _has_colour(right, 0.85 * np.array(rgb) + 0.15 * 255, tol=10, pixels=30), rgb
    heat = assert_real_figure(tmp_path / "fig" / "backgrounds_efficientnet_lite0.offline_in1k.png")
    assert _has_colour(heat, np.array([0, 104, 55]))  # RdYlGn at 100%: the in-context column


def test_fig13_shows_images_where_the_first_model_errs_and_the_second_does_not(results):
    a, b = report.load_results(results["random_ooc"]), report.load_results(results["real_ooc"])
    pa, pb = a.predictions.set_index("image"), b.predictions.set_index("image")
    is_telling = ~pa["top1_correct"] & pb["top1_correct"] & (pb["background"] != "in-context")
    telling_classes = set(pb.loc[is_telling, "class"])
    assert 0 < len(telling_classes) < 3  # the real model misses some objects off context, not all
    chosen = report.choose_images(a, b, 3)
    # First one telling image per class that has one, then the other classes, still off context.
    assert is_telling.loc[chosen].tolist() == [True] * len(telling_classes) + [False] * (3 - len(telling_classes))
    assert len(set(pb.loc[chosen, "class"])) == 3
    assert (pb.loc[chosen, "background"] != "in-context").all()  # the controls are not out of context


def test_fig12_right_points_come_from_the_results(results):
    loaded = [report.load_results(results[k]) for k in ("real_ooc", "real_val", "random_ooc", "random_val")]
    pts = report.val_vs_ooc_points(loaded).set_index("label")
    real = pts.loc[zoo.OFFLINE_IMAGENET_MODEL]
    assert real["val_top1"] == loaded[1].summary["top1"] == 1.0
    assert real["ooc_top1"] == loaded[0].summary["out_of_context"]["top1"]  # in-context controls left out
    assert real["pretraining_data"] == "ILSVRC-2012"
    assert pts.loc["R14x0.5 (random)", "pretraining_data"] == "none (random weights)"
    with pytest.raises(BitlabError, match="two 'ooc' results"):
        report.val_vs_ooc_points(loaded + loaded[:1])


def test_missing_or_unusable_results_are_named(results, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(results["real_ooc"], broken)
    (broken / "predictions.csv").unlink()
    assert main(["report", str(broken), "--out", str(tmp_path / "fig")]) == 2
    assert f"{broken / 'predictions.csv'}: missing results file" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "fig")]) == 2
    assert "nowhere: results folder not found" in capsys.readouterr().err
    with pytest.raises(BitlabError, match="nothing to draw"):
        report.make_report([results["real_val"]], tmp_path / "fig")
    assert not (tmp_path / "fig").exists()
