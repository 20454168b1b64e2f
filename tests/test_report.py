"""`bitlab report`: every figure is drawn from real evaluation results and is a real picture."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_hex, to_rgba

from bitlab import report
from bitlab.cli import main
from bitlab.errors import BitlabError
from bitlab.eval import robustness
from bitlab.eval.evaluate import EvaluateConfig, evaluate
from bitlab.eval.results import Results, load_results
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
                              ("random", "R14x0.5", {"image_size": 64, "label": "R14x0.5 (random)",
                                                     "random_init": True})):
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
    tables = {"per_class.csv", "per_background.csv", "per_object.csv"}  # no variants here: no context.png
    assert names == {f"{s}.{ext}" for s in stems for ext in ("png", "pdf")} | tables
    printed = capsys.readouterr().out
    assert "figures and tables in" in printed and f"table: {tmp_path / 'fig' / 'per_class.csv'}" in printed
    fig13 = assert_real_figure(tmp_path / "fig" / "fig13_top5.png", min_h=600)
    assert _has_colour(fig13, GREEN)  # correct labels highlighted: the real model is right on these
    left = assert_real_figure(tmp_path / "fig" / "fig12_left_top5.png")
    assert left.shape[0] < fig13.shape[0]  # one image row, Fig. 13 has three
    right = assert_real_figure(tmp_path / "fig" / "fig12_right_val_vs_ooc.png")
    # the real model's marker (alpha 0.85 on white); the random one is at chance level on the three
    # validation photos, so it is named below the axes, not drawn (no second colour)
    assert _has_colour(right, 0.85 * np.array((0x15, 0x65, 0xC0)) + 0.15 * 255, tol=10, pixels=30)
    assert not _has_colour(right, 0.85 * np.array((0xEF, 0x6C, 0x00)) + 0.15 * 255, tol=10, pixels=30)
    heat = assert_real_figure(tmp_path / "fig" / "backgrounds_efficientnet_lite0.offline_in1k.png")
    assert _has_colour(heat, np.array([0, 104, 55]))  # RdYlGn at 100%: the in-context column


def _results(rows: list[tuple]) -> Results:
    """A `Results` holding only the predictions `choose_images` reads: (image, class, background,
    top-1 right, probability on the right classes)."""
    df = pd.DataFrame(rows, columns=["image", "class", "background", "top1_correct", "target_prob"])
    return Results(Path("synthetic"), {}, {}, df)


def test_choose_images_takes_every_rule_image_before_fillers():
    """Fig. 13 shows what the paper's rule picks (out of context, baseline wrong, other right), every
    such image before any filler, even when they share a class."""
    a = _results([("cat/1", "cat", "grass", False, 0.1), ("cat/2", "cat", "sky", False, 0.2),
                  ("cat/3", "cat", "road", False, 0.3), ("dog/1", "dog", "grass", True, 0.9),
                  ("fish/1", "fish", "grass", False, 0.1), ("fish/0", "fish", "in-context", True, 0.9)])
    b = _results([("cat/1", "cat", "grass", True, 0.9), ("cat/2", "cat", "sky", True, 0.5),
                  ("cat/3", "cat", "road", True, 0.8), ("dog/1", "dog", "grass", True, 0.95),
                  ("fish/1", "fish", "grass", False, 0.2), ("fish/0", "fish", "in-context", True, 0.9)])
    assert report.telling_images(a, b) == ["cat/1", "cat/2", "cat/3"]
    assert report.choose_images(a, b, 4) == ["cat/1", "cat/3", "cat/2", "fish/1"]  # by gain; then fillers
    assert report.choose_images(a, b, 6)[-1] == "fish/0"  # in context: last


def test_choose_images_puts_mistakes_that_fit_the_background_first():
    """Among the rule's images, those whose baseline top-1 fits the background (a whale on the
    sea) come first; where both models are wrong, such an image still beats a filler."""
    a = _results([("cat/1", "cat", "grass", False, 0.1), ("cat/2", "cat", "sea", False, 0.2),
                  ("dog/1", "dog", "sea", False, 0.1), ("dog/2", "dog", "road", False, 0.1),
                  ("fish/1", "fish", "grass", True, 0.9)])
    b = _results([("cat/1", "cat", "grass", True, 0.95), ("cat/2", "cat", "sea", True, 0.5),
                  ("dog/1", "dog", "sea", False, 0.2), ("dog/2", "dog", "road", False, 0.9),
                  ("fish/1", "fish", "grass", False, 0.1)])
    fits = {"cat/2", "dog/1", "fish/1"}  # fish/1: the baseline is right there, so it is no fitting mistake
    assert report.choose_images(a, b, 3) == ["cat/1", "cat/2", "dog/2"]  # by gain; then fillers by gain
    assert report.choose_images(a, b, 5, fits) == ["cat/2", "cat/1", "dog/1", "dog/2", "fish/1"]
    a.summary["model"] = {"label": "Lite0"}  # how the note names the baseline
    assert report._filler_note(_row(a, "cat/2"), _row(b, "cat/2"), a, fits) == "(Lite0's top-1 fits the background)"
    assert report._filler_note(_row(a, "dog/1"), _row(b, "dog/1"), a, fits) == \
        "(Lite0's top-1 fits the background; both wrong)"
    assert report._filler_note(_row(a, "dog/2"), _row(b, "dog/2"), a, fits) == "(filler: both wrong)"
    assert report._filler_note(_row(a, "cat/1"), _row(b, "cat/1"), a, fits) == ""


def _row(r: Results, image: str) -> pd.Series:
    return r.predictions.set_index("image", drop=False).loc[image]


def test_fig13_marks_images_that_do_not_meet_the_paper_rule(results):
    a, b = load_results(results["random_ooc"]), load_results(results["real_ooc"])
    telling = set(report.telling_images(a, b))
    assert telling and len(telling) < len(a.predictions)
    chosen = report.choose_images(a, b, len(telling) + 2)
    assert set(chosen[:len(telling)]) == telling
    titles = [ax.get_title() for ax in report.fig_top5(a, b, chosen).axes[0::3]]
    assert ["(filler: " in t for t in titles] == [image not in telling for image in chosen]
    pa, pb = a.predictions.set_index("image"), b.predictions.set_index("image")
    for title, image in zip(titles[len(telling):], chosen[len(telling):]):
        assert not pa.loc[image, "top1_correct"] and not pb.loc[image, "top1_correct"]  # the missile, off context
        assert title.endswith("(filler: both wrong)"), title


def test_fig12_right_points_come_from_the_results(results):
    loaded = [load_results(results[k]) for k in ("real_ooc", "real_val", "random_ooc", "random_val")]
    pts = report.val_vs_ooc_points(loaded).set_index("label")
    real = pts.loc[zoo.OFFLINE_IMAGENET_MODEL]
    assert real["val_top1"] == loaded[1].summary["top1"] == 1.0
    assert real["ooc_top1"] == loaded[0].summary["out_of_context"]["top1"]  # in-context controls left out
    assert real["pretraining_data"] == "ILSVRC-2012"
    assert pts.loc["R14x0.5 (random)", "pretraining_data"] == "none (random weights)"
    with pytest.raises(BitlabError, match="two 'ooc' results"):
        report.val_vs_ooc_points(loaded + loaded[:1])


def test_fig12_right_size_legend_is_true():
    """Every model's marker has its own size (4.7, 5.4 and 6.1 M apart, no shared "≤ 5 M" bin) and the
    legend shows the models' own parameter counts, each at the area its model is drawn with."""
    area = report._marker_area(pd.Series([4.7, 5.4, 6.1, 25.0, 936.0]))
    assert (np.diff(area) > 0).all() and area[2] - area[0] > 10  # pt^2: visibly apart
    pts = [Results(Path(role), {"model": {"label": label, "params_m": params, "pretraining_data": "x"},
                                       "dataset": {"role": role, "name": "d", "num_images": 1}, "top1": top1},
                          {}, pd.DataFrame()) for label, params, top1 in (("Lite0", 4.7, 0.6), ("Lite2", 6.1, 0.7))
           for role in ("val", "ooc")]
    ax = report.fig_val_vs_ooc(pts).axes[0]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.texts] == ["4.7 M", "6.1 M"]
    assert np.allclose([h.get_sizes()[0] for h in legend.legend_handles], report._marker_area(pd.Series([4.7, 6.1])))


def test_fig12_right_keeps_a_chance_level_model_off_the_axes():
    """A random-weights model at (0, 0) would stretch both axes and squeeze the trained models into a
    corner: it is named below the axes with its numbers, and the axes span the trained models."""
    def result(label, params, role, top1):
        return Results(Path(role), {"model": {"label": label, "params_m": params, "pretraining_data": "x"},
                                    "dataset": {"role": role, "name": "d", "num_images": 1}, "top1": top1},
                       {}, pd.DataFrame())

    pts = [result(label, params, role, top1) for label, params, val, ooc in
           (("Lite0", 4.7, 0.95, 0.72), ("Lite2", 6.1, 0.97, 0.87), ("random", 25.5, 0.0, 0.0))
           for role, top1 in (("val", val), ("ooc", ooc))]
    fig = report.fig_val_vs_ooc(pts)
    ax = fig.axes[0]
    assert ax.get_xlim()[0] >= 50 and ax.get_ylim()[0] >= 50  # the trained models fill the axes
    from matplotlib.collections import PathCollection

    drawn = np.concatenate([c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)])
    assert np.allclose(sorted(drawn[:, 0]), [95, 97])  # the two trained models' markers, nothing at 0
    assert fig.get_supxlabel() == "at chance level, not drawn: random: validation 0.0%, out of context 0.0%"
    assert [t.get_text() for t in ax.get_legend().texts] == ["4.7 M", "6.1 M", "25.5 M"]  # all models sized
    only = report.fig_val_vs_ooc(pts[4:])  # only chance-level models: drawn, as nothing else is
    assert only.get_supxlabel() == "" and only.axes[0].get_xlim()[0] < 0


def test_folder_names_are_shown_as_words(results):
    """'brick_wall' is drawn 'brick wall' (heat map ticks, bars, Fig. 13 titles); the file name under
    an image is grey, only the right labels are green."""
    r = load_results(results["real_ooc"])
    r.predictions["background"] = r.predictions["background"].replace({"brick": "brick_wall"})
    heat, bars = report.fig_backgrounds(r).axes[:2]
    ticks = [t.get_text() for t in heat.get_xticklabels()] + [t.get_text() for t in bars.get_yticklabels()]
    assert "brick wall" in ticks and not any("_" in t for t in ticks)
    e = robustness.background_effect(r.predictions)  # the heat map says how much the background explains
    assert f"variance: class {e['class']:.0%}, background {e['background']:.0%}" in heat.get_title()
    image = r.predictions.loc[r.predictions["background"] == "brick_wall", "image"].iloc[0]
    ax = report.fig_top5(r, r, [image]).axes[0]
    assert "background: brick wall" in ax.get_title()
    assert to_hex(ax.xaxis.label.get_color()) == report.CORRECT
    name = [t for t in ax.texts if t.get_text() == Path(image).name]
    assert len(name) == 1 and to_hex(name[0].get_color()) == report.FILE_NAME


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


# ----------------------------------------------------------------------------- Fig. 7 / 11
def _mistake_set(tmp_path, photos):
    """Three mistakes on real photos, as `bitlab.eval.errors.mistakes` gives them."""
    import cv2
    import pandas as pd

    rows = []
    for i, (name, pred) in enumerate([("rocket", "solar dish"), ("rocket", "hammer"), ("coffee", "teapot")]):
        rel = f"{name}/{i}.png"
        (tmp_path / name).mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / rel), photos[name][..., ::-1])
        rows.append({"image": rel, "label": name, "accepted": "missile, projectile" if name == "rocket" else name,
                     "prediction": pred, "prediction_prob": 0.4, "target_prob": 0.1, "background": "",
                     "topk_correct": i == 0, "k": 5})
    return pd.DataFrame(rows)


def test_fig_mistakes_prediction_over_label_coloured_by_raters(tmp_path, photos):
    m = _mistake_set(tmp_path, photos)
    verdicts = {"rocket/0.png": "prediction", "rocket/1.png": "label", "coffee/2.png": "unsure"}
    fig = report.fig_mistakes({"all": m}, tmp_path, verdicts=verdicts)
    ax = fig.subfigs[0].axes[0]
    assert ax.get_title() == "solar dish" and ax.get_xlabel().startswith("rocket\n(right: missile")
    assert fig.subfigs[0].axes[2].get_xlabel() == "coffee"  # no "(right: ...)" when the words agree
    # Unsure: a yellow frame, but the predicted word in dark amber (yellow text is unreadable on white).
    unsure = fig.subfigs[0].axes[2]
    assert unsure.spines["top"].get_edgecolor() == to_rgba(report.VERDICT_COLOURS["unsure"])
    assert to_hex(unsure.title.get_color()) == "#9a6700"
    report.save(fig, tmp_path / "fig", "mistakes")
    img = assert_real_figure(tmp_path / "fig" / "mistakes.png")
    for hexa in report.VERDICT_COLOURS.values():
        assert _has_colour(img, np.array([int(hexa[i:i + 2], 16) for i in (1, 3, 5)]))
    unrated = report.fig_mistakes({"a": m.iloc[:1], "b": m.iloc[1:]}, tmp_path)
    assert [s.get_suptitle() for s in unrated.subfigs] == ["a: 1 mistake", "b: 2 mistakes"]
    with pytest.raises(BitlabError, match="no mistakes to draw"):
        report.fig_mistakes({"all": m.iloc[:0]}, tmp_path)


# ----------------------------------------------------------------------------- Fig. 9
def test_gallery_marks_true_and_false_positives(tmp_path, photos):
    import cv2

    for name in ("chelsea", "coffee"):
        cv2.imwrite(str(tmp_path / f"{name}.png"), photos[name][..., ::-1])
    pairs = [(tmp_path / "chelsea.png", tmp_path / "chelsea.png", 0.99),
             (tmp_path / "coffee.png", tmp_path / "chelsea.png", 0.71)]
    summary = {"embedding": "phash", "metric": "hamming", "threshold": 10, "dims": 64, "dups": 2,
               "downstream_images": 5, "upstream_images": 7}
    fig = report.fig_duplicates(pairs, labels=[True, False], summary=summary)
    assert fig.axes[1].get_title().endswith("Hamming distance 19 bits")  # (1 - 0.71) x 64
    assert "phash (Hamming ≤ 10): 2 of 5 test images" in fig.get_suptitle()
    report.save(fig, tmp_path, "g")
    img = assert_real_figure(tmp_path / "g.png", min_h=200)
    assert _has_colour(img, np.array([44, 160, 44]), pixels=500)  # matplotlib tab:green
    assert _has_colour(img, np.array([214, 39, 40]), pixels=500)  # tab:red
    with pytest.raises(BitlabError, match="1 labels for 2 pairs"):
        report.fig_duplicates(pairs, labels=[True])
    # unlabelled make-ooc names: said to be unreviewed, names cut in the middle
    long = tmp_path / "d9ce3f9b1da15b67_m01yrx_bd42f470__grass_skimage.png"
    long.write_bytes((tmp_path / "chelsea.png").read_bytes())
    fig = report.fig_duplicates([(long, long, 1.0)], summary=summary)
    assert "not reviewed" in fig.get_suptitle()
    assert fig.axes[0].get_title().split("\n")[0] == "d9ce3f9b1da15b…ass_skimage.png | d9ce3f9b1da15b…ass_skimage.png"


def test_fig9_has_a_block_per_downstream_set(tmp_path, photos):
    import cv2

    for name in ("chelsea", "coffee"):
        cv2.imwrite(str(tmp_path / f"{name}.png"), photos[name][..., ::-1])
    cat, cup = tmp_path / "chelsea.png", tmp_path / "coffee.png"
    fig = report.fig_duplicates_by_downstream({"CIFAR-10": ([(cat, cat, 0.99), (cup, cup, 0.9)], [True, True]),
                                               "Pets": ([(cup, cat, 0.75)], [False])})
    assert [sub.get_suptitle() for sub in fig.subfigs] == ["CIFAR-10: 2 pairs", "Pets: 1 pair"]
    assert len(fig.subfigs[0].axes) == 2 and len(fig.subfigs[1].axes) == 2  # one row of 2 columns each
    assert "green border: true duplicate" in fig.get_suptitle()
    report.save(fig, tmp_path, "g9")
    img = assert_real_figure(tmp_path / "g9.png", min_h=200)
    assert _has_colour(img, np.array([214, 39, 40]), pixels=500)  # the false positive's red
    with pytest.raises(BitlabError, match="Pets: 2 labels for 1 pairs"):
        report.fig_duplicates_by_downstream({"Pets": ([(cup, cat, 0.75)], [False, True])})


def test_dedup_gallery_is_drawn_from_the_result(tmp_path, photos):
    """`bitlab dedup` draws Fig. 9 from what `run_dedup` returned, into its folder; nothing to show, no file."""
    import cv2

    from bitlab.eval.dedup import DedupResult, ImageFiles

    for name in ("chelsea", "coffee"):
        cv2.imwrite(str(tmp_path / f"{name}.png"), photos[name][..., ::-1])
    names = ["chelsea.png", "coffee.png"]
    files = ImageFiles(str(tmp_path), [tmp_path / n for n in names], names)
    summary = {"embedding": "phash", "metric": "hamming", "threshold": 10, "dims": 64, "dups": 1,
               "downstream_images": 2, "upstream_images": 2}
    found = [{"query": "chelsea.png", "match": "coffee.png", "rank": 1, "similarity": 0.9, "distance": 3.0}]
    result = DedupResult(summary, found, found, tmp_path / "o", upstream=files, downstream=files)
    assert report.save_duplicates_gallery(result, 0) == []
    assert report.save_duplicates_gallery(DedupResult(summary, [], [], tmp_path / "o", files, files), 4) == []
    assert not (tmp_path / "o").exists()
    written = report.save_duplicates_gallery(result, 4)
    assert written == [tmp_path / "o" / "duplicates.png", tmp_path / "o" / "duplicates.pdf"]
    assert_real_figure(written[0], min_h=150)


def test_gallery_pairs_spread_over_similarity():
    pairs = [(f"q{i}", f"m{i}", s) for i, s in enumerate([0.9, 0.75, 1.0, 0.8, 0.95])]
    assert [p[2] for p in report.gallery_pairs(pairs, 3)] == [1.0, 0.9, 0.75]
    assert len(report.gallery_pairs(pairs, 10)) == 5


def test_fig_nearest_counts_what_the_threshold_flags(tmp_path):
    summary = {"embedding": "model:x", "metric": "cosine", "threshold": 0.7, "dims": 8}
    nearest = [{"query": q, "similarity": s, "distance": 1 - s} for q, s in
               [("a", 0.95), ("b", 0.72), ("c", 0.69), ("d", 0.3)]]
    fig = report.fig_nearest(summary, nearest, {"a": "copy", "b": "copy", "c": "copy", "d": "unrelated"})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["copy", "unrelated"]
    assert [t.get_text() for t in ax.texts] == ["2 of 3\nflagged", "0 of 1\nflagged"]
    report.save(fig, tmp_path, "n")
    assert_real_figure(tmp_path / "n.png", min_h=200)


# ----------------------------------------------------------------------------- Fig. 2 / 5
def test_fig_fewshot_draws_medians_and_every_trial(tmp_path):
    import pandas as pd

    runs = pd.DataFrame({"k": [1, 1, 1, 5, 5, 5], "seed": [0, 1, 2] * 2, "top1": [0.2, 0.4, 0.3, 0.7, 0.6, 0.9],
                         "num_classes": 10, "curve": "tiny"})
    fig = report.fig_fewshot(runs, series="curve")
    ax = fig.axes[0]
    line = ax.lines[0]
    assert line.get_xdata().tolist() == [1, 5] and np.allclose(line.get_ydata(), [30, 70])  # medians, in %
    assert len(ax.collections[0].get_offsets()) == 6  # every trial a dot
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["1", "5"]
    assert any(np.allclose(ln.get_ydata(), 10) for ln in ax.lines[1:])  # chance level for 10 classes
    assert "scratch" not in ax.get_title() + ax.get_legend().texts[0].get_text()  # not said to be known
    report.save(fig, tmp_path, "fs")
    assert_real_figure(tmp_path / "fs.png")
    # Trained from scratch is no transfer: the title says so, or the curve's legend entry when mixed.
    scratch = report.fig_fewshot(runs.assign(pretrained=None), series="curve").axes[0]
    assert scratch.get_title() == "Few-shot transfer\n(trained from scratch, no pre-training)"
    mixed = pd.concat([runs.assign(pretrained="bit.npz"), runs.assign(curve="tiny 2", pretrained=None)])
    ax = report.fig_fewshot(mixed, series="curve").axes[0]
    assert ax.get_title() == "Few-shot transfer"
    assert [t.get_text() for t in ax.get_legend().texts] == ["tiny: median of 3 trials",
                                                             "tiny 2: median of 3 trials, trained from scratch"]


def test_fig5_puts_architectures_on_x_and_a_line_per_upstream(tmp_path):
    import pandas as pd

    rows = [{"architecture": arch, "upstream": up, "downstream": "digits", "k": k, "seed": seed,
             "top1": base + 0.1 * i + 0.2 * (k == 5) + 0.01 * seed}
            for up, base in (("none", 0.2), ("ImageNet-21k", 0.5)) for i, arch in enumerate(["R14x0.5", "R26x0.5"])
            for k in (1, 5, 10) for seed in range(5)]
    fig = report.fig_fewshot_architectures(pd.DataFrame(rows))
    axes = fig.axes
    assert len(axes) == 2  # 1 and 5 shots (10 is not Fig. 5's), one downstream set
    assert [t.get_text() for t in axes[1].get_xticklabels()] == ["R14x0.5", "R26x0.5"]
    lines = axes[0].lines
    assert len(lines) == 2 and np.allclose(lines[0].get_ydata(), [22, 32])  # medians (seed 2), in %
    assert np.allclose(axes[1].lines[1].get_ydata(), [72, 82])
    assert sum(len(c.get_offsets()) for c in axes[0].collections) == 20  # every trial a dot
    assert [t.get_text() for t in axes[0].get_legend().texts] == ["none (median of 5)", "ImageNet-21k (median of 5)"]
    assert axes[0].get_title() == "digits, 1 example per class"
    report.save(fig, tmp_path, "fig5")
    assert_real_figure(tmp_path / "fig5.png", min_w=300)
    with pytest.raises(BitlabError, match="no few-shot runs with 1 or 5"):
        report.fig_fewshot_architectures(pd.DataFrame(rows).query("k == 10"))


# ----------------------------------------------------------------------------- OOC tour
def test_fig_ooc_grid_rows_objects_columns_backgrounds(tmp_path, photos):
    from bitlab.eval import robustness

    ev = robustness.load_eval_set(build_tiny_ooc(tmp_path / "ooc", photos))
    fig = report.fig_ooc_grid(ev, max_backgrounds=3)
    axes = np.array(fig.axes).reshape(3, 3)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["cat", "espresso", "missile"]
    assert [ax.get_title() for ax in axes[0]] == ["brick", "grass", "gravel"]
    assert all(ax.images for ax in axes.ravel())
    assert "4 backgrounds (1 more not shown)" in fig.get_suptitle()
    report.save(fig, tmp_path, "grid")
    assert_real_figure(tmp_path / "grid.png")
    only = report.fig_ooc_grid(ev, classes=["cat"])
    assert len(only.axes) == 4
    with pytest.raises(BitlabError, match="no images of the classes zebra"):
        report.fig_ooc_grid(ev, classes=["zebra"])
    (ev.root / "manifest.csv").unlink()  # now the official release's layout: class folders, no backgrounds
    folders = report.fig_ooc_grid(robustness.load_eval_set(ev.root), max_backgrounds=2)
    assert np.array(folders.axes).size == 3 * 2 and all(ax.images for ax in folders.axes)
    assert "no backgrounds recorded" in folders.get_suptitle()


# ----------------------------------------------------------------------------- intervals and context
def test_fig12_right_draws_both_intervals(results):
    loaded = [load_results(results[k]) for k in ("real_ooc", "real_val", "random_ooc", "random_val")]
    pts = report.val_vs_ooc_points(loaded).set_index("label")
    real = pts.loc[zoo.OFFLINE_IMAGENET_MODEL]
    assert [real["ooc_low"], real["ooc_high"]] == loaded[0].summary["out_of_context"]["top1_ci"]
    assert [real["val_low"], real["val_high"]] == loaded[1].summary["top1_ci"]
    ax = report.fig_val_vs_ooc(loaded).axes[0]
    segments = [seg for c in ax.collections if hasattr(c, "get_segments") for seg in c.get_segments()]
    spans = sorted(round(abs(seg[1] - seg[0]).max(), 6) for seg in segments)
    for low, high in ((real["val_low"], real["val_high"]), (real["ooc_low"], real["ooc_high"])):
        assert round(100 * (high - low), 6) in spans  # each bar spans its interval, in percent


def test_heat_map_shows_n_in_every_cell(results):
    heat = report.fig_backgrounds(load_results(results["real_ooc"])).axes[0]
    cells = [t.get_text() for t in heat.texts if "n=" in t.get_text()]
    assert len(cells) == 12 and all(t.endswith("n=1") for t in cells)  # 3 classes x 4 backgrounds, 1 image each


@pytest.fixture(scope="module")
def with_variants(tmp_path_factory) -> Path:
    """The embedded sample built with its variants, two models evaluated together on it."""
    from bitlab.eval.evaluate import evaluate_models
    from bitlab.ooc.build import build_demo

    root = tmp_path_factory.mktemp("context_report")
    ooc = build_demo(root / "ooc")
    evaluate_models(EvaluateConfig(model=zoo.OFFLINE_IMAGENET_MODEL, data=str(ooc), out=str(root / "res"),
                                   progress=False),
                    [{"model": zoo.OFFLINE_IMAGENET_MODEL}, {"model": "R14x0.5", "random_init": True, "image_size": 64,
                                                             "label": "R14x0.5 (random)"}])
    return root / "res"


def test_report_of_a_multi_model_folder_draws_context_and_writes_tables(with_variants, tmp_path, capsys):
    assert main(["report", str(with_variants), "--out", str(tmp_path / "fig")]) == 0
    for f in ("context.png", "per_class.csv", "per_background.csv", "per_object.csv", "fig13_top5.png"):
        assert (tmp_path / "fig" / f).is_file(), f
    assert_real_figure(tmp_path / "fig" / "context.png")
    lite0, rand = (load_results(with_variants / d) for d in (zoo.OFFLINE_IMAGENET_MODEL, "R14x0.5-random"))
    pts = report.context_points([lite0, rand]).set_index("label")
    c = lite0.context
    assert pts.loc[lite0.label, "only_fg"] == c["variants"]["only_fg"]["top1"]
    assert [pts.loc[lite0.label, "composites_low"], pts.loc[lite0.label, "composites_high"]] == \
        c["composites"]["top1_ci"]
    assert pts.loc[lite0.label, "consistent"] == c["context_consistent_share_of_errors"]["value"]
    per_class = pd.read_csv(tmp_path / "fig" / "per_class.csv").set_index("class")
    pair = f"R14x0.5 (random) - {lite0.label}"
    assert per_class.loc["(all)", f"top1[{lite0.label}]"] == pytest.approx(c["composites"]["top1"], rel=1e-5)
    assert per_class.loc["(all)", f"diff_top1[{pair}]"] == pytest.approx(
        rand.context["composites"]["top1"] - c["composites"]["top1"], abs=1e-5)
    bars = report.fig_context([lite0, rand]).axes[0]
    heights = sorted(round(p.get_height(), 6) for p in bars.patches)
    assert round(100 * c["variants"]["only_fg"]["top1"], 6) in heights


def test_save_lays_out_once_and_show_hands_over_the_saved_png(tmp_path):
    """The PDF reuses the PNG's layout (same page, in inches), the figure keeps its layout engine
    (a second save gives the same pixels), and `show` is the saved file at the figure's screen size."""
    import re

    from matplotlib.figure import Figure
    from matplotlib.layout_engine import ConstrainedLayoutEngine
    from PIL import Image

    fig = Figure(figsize=(6, 4), layout="constrained")
    for i, ax in enumerate(fig.subplots(2, 3).ravel()):
        ax.plot(np.arange(10) ** (i % 3))
        ax.set_title(f"a long title for panel {i}", fontsize=9)
        ax.set_ylabel("values on a long axis")
    png, pdf = report.save(fig, tmp_path / "a", "f")
    assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)
    with Image.open(png) as img:
        width, height = img.size
        first = np.asarray(img.convert("RGB"))
    box = [float(v) for v in re.search(rb"/MediaBox \[\s*([\d.]+) ([\d.]+) ([\d.]+) ([\d.]+)", pdf.read_bytes()).groups()]
    assert abs((box[2] - box[0]) / 72 - width / report.SAVE_DPI) < 2 / report.SAVE_DPI
    assert abs((box[3] - box[1]) / 72 - height / report.SAVE_DPI) < 2 / report.SAVE_DPI
    shown = report.show(fig, tmp_path / "b", "f")
    with Image.open(tmp_path / "b" / "f.png") as again:
        assert np.array_equal(np.asarray(again.convert("RGB")), first)
    assert shown.data == (tmp_path / "b" / "f.png").read_bytes() and shown.format == "png"
    assert shown.width == round(width * fig.dpi / report.SAVE_DPI)
