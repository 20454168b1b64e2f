"""The robustness figures, one function per figure (the CLI and the notebooks call the same ones).

- `fig_top5`: paper Fig. 12 left (one image) and Fig. 13 (several): each image beside the top-5
  predictions of two models, bar length = probability on a log scale, correct labels in green;
- `fig_val_vs_ooc`: paper Fig. 12 right: validation top-1 against out-of-context top-1, one point
  per model with 95% intervals on both axes, marker area by parameter count, colour by pre-training data;
- `fig_backgrounds`: per-background top-1 as a classes x backgrounds heat map (n in every cell),
  beside the backgrounds whose interval separates them from the rest and what the model predicts there;
- `fig_context`: per model, top-1 on the objects alone (only_fg), on the composites and on those in a
  usual context, and the share of mistakes that the bare background suggests, with intervals;
- `fig_mistakes`: paper Fig. 7 and 11: mistakes as a gallery, prediction over label, in groups
  (`bitlab.eval.errors`), coloured by what raters said (Fig. 7 left);
- `fig_duplicates`, `fig_duplicates_by_downstream`: paper Fig. 9: test images beside their
  near-duplicates upstream (`bitlab dedup`), in a block per downstream data set;
- `fig_fewshot`: paper Fig. 2 / 5: top-1 against examples per class, every trial a light dot,
  the median over seeds a line (`bitlab fewshot`);
- `fig_fewshot_architectures`: paper Fig. 5: few-shot top-1 against architecture, a line per
  upstream data set, a panel per downstream set and K;
- `fig_ooc_grid`: the out-of-context set at a glance, foreground objects x backgrounds (make-ooc);
- `results_table`: one row per results folder, what the figures compare (head, weights, scores);
- `save` writes a figure as PNG and PDF, `show` saves it and hands a notebook the saved PNG.

Results of a head over a subset of the ILSVRC-2012 classes (a fine-tuned run's) are drawn beside
1000-way ones, never silently: their panels say "N-way head", Fig. 12 right draws them as squares
with a legend entry saying the task is easier, and `results_table` has a `head` column.

The robustness numbers come from `bitlab evaluate` results folders (`bitlab.eval.results` reads
them); figures import the evaluation modules, never the reverse. The paper publishes no
per-model numbers for its out-of-context set, so no reference points are drawn.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Collection, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from bitlab import fileio
from bitlab.data import imagenet
from bitlab.data.transforms import decode_image, resize
from bitlab.errors import BitlabError, ConfigError
from bitlab.eval import robustness, tables
from bitlab.eval.dedup import DedupResult
from bitlab.eval.errors import UNSURE
from bitlab.eval.results import PREDICTIONS, Results, find_results, load_results, slug

if TYPE_CHECKING:
    from IPython.display import Image

log = logging.getLogger(__name__)

CORRECT = "#2e7d32"  # green: a label in the image's ILSVRC target set
WRONG = "#9e9e9e"
FILE_NAME = "#757575"  # grey, darker than WRONG's bars so small text stays readable
PROB_FLOOR = 1e-4  # left end of the log axis; smaller probabilities are drawn as this
SAVE_DPI = 150  # figure files' resolution; a notebook shows them at the figure's own dpi (`show`)


def save(fig: Figure, out_dir: str | Path, stem: str) -> list[Path]:
    """Write `fig` as PNG and PDF (atomically); returns both paths.

    The layout (constrained layout, a third of the drawing time of a figure of many panels) is
    computed once, for the PNG, and the PDF reuses it; the figure gets its layout engine back."""
    paths = []
    engine = fig.get_layout_engine()
    try:
        for fmt in ("png", "pdf"):
            path = Path(out_dir) / f"{stem}.{fmt}"
            with fileio.atomic_write(path, "wb") as f:
                fig.savefig(f, format=fmt, dpi=SAVE_DPI, bbox_inches="tight")
            paths.append(path)
            fig.set_layout_engine("none")  # keeps the positions the last drawing gave the axes
    finally:
        fig.set_layout_engine(engine)
    return paths


def show(fig: Figure, out_dir: str | Path, stem: str) -> Image:
    """`save`, then the saved PNG as a notebook shows it (`IPython.display.Image`): the file's own
    pixels, at the size the figure would have on screen (its dpi), without drawing it a third time."""
    from IPython.display import Image
    from PIL import Image as PILImage

    png = save(fig, out_dir, stem)[0]
    with PILImage.open(png) as img:
        width = img.width
    return Image(filename=str(png), width=round(width * fig.dpi / SAVE_DPI))


def spaced(name: str) -> str:
    """A class or background folder name as figure text: 'coffee_cup' -> 'coffee cup'."""
    return name.replace("_", " ")


def shown_label(r: Results) -> str:
    """A model's label as figures show it: with its head when it answers among a subset of the classes."""
    return f"{r.label} ({r.task['way']}-way head)" if r.subset_head else r.label


def results_table(results: Sequence[Results]) -> pd.DataFrame:
    """One row per results folder: model, set, images, head (1000-way, or N-way: easier), weights'
    pre-training data (random weights say so), top-1 and top-k."""
    rows = []
    for r in results:
        s = r.summary
        rows.append({"model": r.label, "set": r.role, "images": s["n"],
                     "head": f"{r.task['way']}-way (easier task)" if r.subset_head else f"{r.task['way']}-way",
                     "pre-training": s["model"]["pretraining_data"], "top-1": s["top1"],
                     "top-1 95% interval": "[{:.3f}, {:.3f}]".format(*s["top1_ci"]) if s.get("top1_ci") else "",
                     f"top-{r.k}": s[f"top{r.k}"]})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- Fig. 12 left / Fig. 13
def _paired(a: Results, b: Results) -> pd.DataFrame:
    """Both models' predictions side by side, with `telling`: the paper's rule for Fig. 13 (out of
    context, `a` wrong, `b` right) and `gain` (how much more `b` puts on the right classes)."""
    m = a.predictions.merge(b.predictions, on="image", suffixes=("_a", "_b"))
    if m.empty:
        raise BitlabError(f"{a.path} and {b.path} share no images: evaluate both models on the same data")
    m["gain"] = m["target_prob_b"] - m["target_prob_a"]
    m["in_context"] = m["background_a"] == robustness.IN_CONTEXT
    m["telling"] = ~m["top1_correct_a"] & m["top1_correct_b"] & ~m["in_context"]
    return m


def telling_images(a: Results, b: Results) -> list[str]:
    """The images that meet the paper's rule for Fig. 13: out of context, `a` wrong and `b` right."""
    m = _paired(a, b)
    return m.loc[m["telling"], "image"].tolist()


def fitting_mistakes(r: Results) -> set[str]:
    """The images whose wrong top-1 fits the background: `r`'s context-consistent errors
    (`bitlab.eval.context`), none when its variants were not evaluated."""
    df = r.predictions
    if "context_consistent_error" not in df:
        return set()
    return set(df.loc[df["context_consistent_error"].fillna(False).astype(bool), "image"])


def choose_images(a: Results, b: Results, n: int, fits: Collection[str] = ()) -> list[str]:
    """Fig. 13's images: those that meet the paper's rule (`telling_images`) first, those where
    `a`'s wrong top-1 fits the background (`fits`: `fitting_mistakes`) before
    the others; then images where both models are wrong and `a`'s top-1 fits the background; then,
    when still fewer than `n`, other out-of-context images as filler (`fig_top5` marks them),
    in-context ones last. Within each, one per class before a class repeats (so the figure shows
    several objects), the largest gain in probability on the right classes first."""
    m = _paired(a, b).sort_values("gain", ascending=False)
    fit = m["image"].isin(set(fits)) & ~m["top1_correct_a"] & ~m["in_context"]
    m["tier"] = np.select([m["telling"] & fit, m["telling"], fit & ~m["top1_correct_b"]], [0, 1, 2], 3)
    m["repeat"] = m.groupby(["tier", "class_a"]).cumcount()
    order = ["tier", "in_context", "repeat", "gain"]
    return m.sort_values(order, ascending=[True, True, True, False], kind="stable")["image"].head(n).tolist()


def _filler_note(ra: pd.Series, rb: pd.Series, a: Results, fits: Collection[str] = ()) -> str:
    """Why an image of `fig_top5` is there: '' when it meets the paper's rule, what its top-1 has to
    do with the background when `a`'s mistake fits it (`fits`), else '(filler: ...)'."""
    if ra["background"] == robustness.IN_CONTEXT:
        return "(filler: in context)"
    if ra["image"] in fits and not ra["top1_correct"]:
        return f"({a.label}'s top-1 fits the background" + (")" if rb["top1_correct"] else "; both wrong)")
    if ra["top1_correct"] == rb["top1_correct"]:
        return "(filler: both right)" if ra["top1_correct"] else "(filler: both wrong)"
    return "" if rb["top1_correct"] else f"(filler: only {a.label} right)"


def _row(r: Results, image: str) -> pd.Series:
    rows = r.predictions[r.predictions["image"] == image]
    if rows.empty:
        raise BitlabError(f"{r.path / PREDICTIONS}: no prediction for image {image!r}")
    return rows.iloc[0]


def _draw_top5(ax, row: pd.Series, k: int, title: str) -> None:
    targets = {int(t) for t in str(row["targets"]).split(";") if t}
    ids = [int(row[f"top{j}_id"]) for j in range(1, k + 1)]
    names = [str(row[f"top{j}_name"]) for j in range(1, k + 1)]
    probs = np.maximum([float(row[f"top{j}_prob"]) for j in range(1, k + 1)], PROB_FLOOR)
    ok = [i in targets for i in ids]
    y = np.arange(k)[::-1]  # most probable at the top
    ax.barh(y, probs - PROB_FLOOR, left=PROB_FLOOR, color=[CORRECT if c else WRONG for c in ok], height=0.7)
    ax.set_xscale("log")
    ax.set_xlim(PROB_FLOOR, 1.0)
    ax.set_yticks(y, names)
    for tick, c in zip(ax.get_yticklabels(), ok):
        tick.set_color(CORRECT if c else "black")
        tick.set_fontweight("bold" if c else "normal")
    for yy, p in zip(y, probs):
        ax.text(min(p * 1.15, 0.5) if p < 0.5 else p / 1.15, yy, f"{p:.2g}" if p < 0.995 else "1.0",
                va="center", ha="left" if p < 0.5 else "right", fontsize=8,
                color="black" if p < 0.5 else "white")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="y", labelsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.spines[["top", "right"]].set_visible(False)


def fig_top5(a: Results, b: Results, images: Sequence[str], fits: Collection[str] = ()) -> Figure:
    """Fig. 12 left (one image) / Fig. 13 (several): image | top-5 of `a` | top-5 of `b`; `fits`:
    the images where `a`'s wrong top-1 fits the background, said so under the image's title."""
    if not images:
        raise BitlabError("no images to draw")
    fig = Figure(figsize=(10.5, 2.3 * len(images) + 0.6), layout="constrained")
    axes = fig.subplots(len(images), 3, squeeze=False, width_ratios=[1, 1.6, 1.6])
    for row_axes, image in zip(axes, images):
        ra, rb = _row(a, image), _row(b, image)
        ax = row_axes[0]
        ax.imshow(decode_image(a.data_root / image))
        ax.set_xticks([])
        ax.set_yticks([])
        where = f"\nbackground: {spaced(ra['background'])}" if ra["background"] else ""
        note = _filler_note(ra, rb, a, fits)
        ax.set_title(f"class: {spaced(ra['class'])}{where}" + (f"\n{note}" if note else ""), fontsize=9)
        names = [imagenet.names()[int(t)] for t in str(ra["targets"]).split(";") if t]
        right = ", ".join(names[:3]) + (f" +{len(names) - 3} more" if len(names) > 3 else "")
        ax.set_xlabel(f"correct: {right}", fontsize=7, color=CORRECT)
        # The file name below it in grey: green is for right answers only.
        ax.annotate(Path(image).name, (0.5, 0), xycoords=ax.xaxis.label, xytext=(0, -1), textcoords="offset points",
                    ha="center", va="top", fontsize=7, color=FILE_NAME)
        for ax, r, row in ((row_axes[1], a, ra), (row_axes[2], b, rb)):
            verdict = "right" if row["top1_correct"] else "wrong"
            _draw_top5(ax, row, r.k, f"{shown_label(r)}: top-1 {verdict}")
    for ax in axes[-1, 1:]:
        ax.set_xlabel("probability (log scale)", fontsize=8)
    notes = sorted({r.task["note"] for r in (a, b) if r.subset_head})
    fig.suptitle(f"Top-{max(a.k, b.k)} predictions on objects out of context: {shown_label(a)} vs. {shown_label(b)}"
                 + "".join(f"\n({n})" for n in notes), fontsize=10)
    fig.legend(handles=[Line2D([], [], color=CORRECT, lw=6, label="correct label (in the class's ILSVRC set)"),
                        Line2D([], [], color=WRONG, lw=6, label="other label")],
               loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


# ----------------------------------------------------------------------------- Fig. 12 right
def _ci(entry: Mapping) -> tuple[float, float]:
    """An accuracy entry's 95% interval (NaN for results written before intervals)."""
    low, high = entry.get("top1_ci") or (None, None)
    return (np.nan if low is None else low), (np.nan if high is None else high)


def val_vs_ooc_points(results: Sequence[Results]) -> pd.DataFrame:
    """One row per model label that has both a validation and an out-of-context result, with each
    top-1's 95% interval (`val_low` ... `ooc_high`)."""
    by_model: dict[str, dict[str, Results]] = {}
    for r in results:
        slot = by_model.setdefault(r.label, {})
        if r.role in slot:
            raise BitlabError(f"{r.path} and {slot[r.role].path}: two '{r.role}' results for {r.label!r}; "
                              "give each model one validation and one out-of-context result")
        slot[r.role] = r
    rows = []
    for label, slot in by_model.items():
        if {"val", "ooc"} <= slot.keys():
            m = slot["ooc"].summary["model"]
            ooc = slot["ooc"].summary
            val, away = slot["val"].summary, ooc.get("out_of_context", ooc)
            (vl, vh), (ol, oh) = _ci(val), _ci(away)
            rows.append({"label": label, "val_top1": val["top1"], "ooc_top1": away["top1"], "val_low": vl,
                         "val_high": vh, "ooc_low": ol, "ooc_high": oh, "params_m": m["params_m"],
                         "pretraining_data": m["pretraining_data"],
                         "way": max(slot["val"].task["way"], slot["ooc"].task["way"]),
                         "subset_head": slot["val"].subset_head or slot["ooc"].subset_head,
                         "val_data": slot["val"].summary["dataset"], "ooc_data": slot["ooc"].summary["dataset"]})
    return pd.DataFrame(rows)


def _data_label(sets: Sequence[dict]) -> str:
    names = sorted({f"{d['name']} ({d['num_images']} images)" for d in sets})
    return names[0] if len(names) == 1 else "several sets"


def _marker_area(params_m: pd.Series) -> np.ndarray:
    # Like the paper's Fig. 4, bigger architectures get bigger markers. The area grows with the log of
    # the parameter count (40 pt^2 at 4 M, +80 per doubling: 4.7 / 5.4 / 6.1 M at 59 / 75 / 89, visibly
    # apart; R50x1's 25 M at 250, R152x4's 936 M at 670), so small models of one family differ too.
    return 40 + 80 * np.log2(np.clip(params_m.to_numpy(float), 1.0, None) / 4).clip(min=-0.4)


def _size_legend(params_m: pd.Series) -> list[float]:
    """The parameter counts the size legend shows: every model's when there are few, else the
    smallest, the median and the largest (each drawn at its own area: no shared '≤' bin)."""
    sizes = sorted({round(float(p), 1) for p in params_m})
    return sizes if len(sizes) <= 4 else [sizes[0], sizes[len(sizes) // 2], sizes[-1]]


def _label_points(ax, x: np.ndarray, y: np.ndarray, labels: list[str], span: float) -> None:
    """Name each point; labels that would overprint an earlier one move up, with a leader line."""
    placed: list[tuple[float, float]] = []
    for i in np.argsort(y):
        right = x[i] > ax.get_xlim()[0] + 0.6 * span  # label on the side with room
        tx, ty = x[i] + (-1 if right else 1) * 0.03 * span, y[i] + 0.02 * span
        while any(abs(tx - px) < 0.25 * span and abs(ty - py) < 0.045 * span for px, py in placed):
            ty += 0.045 * span
        placed.append((tx, ty))
        moved = ty - y[i] > 0.03 * span
        ax.annotate(labels[i], (x[i], y[i]), xytext=(tx, ty), fontsize=7, ha="right" if right else "left",
                    va="center", arrowprops=dict(arrowstyle="-", color="#888888", lw=0.5) if moved else None)


# A model at chance level (random weights, a broken checkpoint) has no place on the same axes as
# trained ones: drawn at (0, 0) it would stretch both axes and squeeze the others into a corner.
# Below this validation top-1 (10x a 1000-way chance) a model is named below the axes instead.
CHANCE_TOP1 = 0.01


def fig_val_vs_ooc(results: Sequence[Results]) -> Figure:
    """Fig. 12 right: validation top-1 (x) against out-of-context top-1 (y), one point per model;
    marker size grows with the parameter count, colour = pre-training data. Models at chance level
    (validation top-1 below CHANCE_TOP1) are named below the axes with their numbers, not drawn on them."""
    pts = val_vs_ooc_points(results)
    if pts.empty:
        raise BitlabError("Fig. 12 right needs, for at least one model, a validation result and an "
                          "out-of-context result (same --label)")
    chance = pts["val_top1"] < CHANCE_TOP1
    shown = pts[~chance] if (~chance).any() else pts
    fig = Figure(figsize=(6.4, 5.0 + 0.35 * int(chance.any() and (~chance).any())), layout="constrained")
    ax = fig.subplots()
    palette = dict(zip(sorted(shown["pretraining_data"].unique()),
                       ["#1565c0", "#ef6c00", "#2e7d32", "#6a1b9a", "#c62828", "#00838f", "#5d4037"] * 3))
    x, y = shown["val_top1"].to_numpy() * 100, shown["ooc_top1"].to_numpy() * 100
    # 95% intervals on both axes (Wilson for the validation images, a bootstrap over objects for
    # the out-of-context ones): two models are told apart only where their crosses do not overlap
    ci = "val_low" in shown  # results written before intervals have none
    xerr = np.abs(np.stack([shown["val_low"], shown["val_high"]]).astype(float) * 100 - x) if ci else np.zeros((2, len(x)))
    yerr = np.abs(np.stack([shown["ooc_low"], shown["ooc_high"]]).astype(float) * 100 - y) if ci else np.zeros((2, len(y)))
    ax.errorbar(x, y, xerr=np.nan_to_num(xerr), yerr=np.nan_to_num(yerr), fmt="none", ecolor="#555555",
                elinewidth=1, capsize=3, zorder=2)
    subset = shown["subset_head"].to_numpy(bool)
    for marker, rows in (("o", ~subset), ("s", subset)):  # squares: heads over a subset of the classes
        if rows.any():
            ax.scatter(x[rows], y[rows], s=_marker_area(shown["params_m"][rows]), marker=marker,
                       c=shown["pretraining_data"][rows].map(palette), alpha=0.85, edgecolors="black",
                       linewidths=0.6, zorder=3)
    # Axes span the data in steps of 10 points, so close models stay apart.
    xerr, yerr = np.nan_to_num(xerr), np.nan_to_num(yerr)
    lo = max(0.0, 10 * np.floor(min((x - xerr[0]).min(), (y - yerr[0]).min()) / 10 - 0.5))
    hi = min(100.0, 10 * np.ceil(max((x + xerr[1]).max(), (y + yerr[1]).max()) / 10 + 0.5))
    ax.set_xlim(lo - 3, hi + 3)
    ax.set_ylim(lo - 3, hi + 3)
    ax.plot([lo, hi], [lo, hi], ls=":", color="#bbbbbb", zorder=1)
    _label_points(ax, x, y, shown["label"].tolist(), span=hi - lo)
    ax.set_xlabel(f"validation top-1 (%) — {_data_label(pts['val_data'])}")
    ax.set_ylabel(f"out-of-context top-1 (%) — {_data_label(pts['ooc_data'])}")
    ax.grid(alpha=0.3)
    heads = [Line2D([], [], marker="o", ls="", color="#dddddd", markeredgecolor="black", markersize=8,
                    label="1000-way head (the paper's task)")] if (~subset).any() else []
    heads += [Line2D([], [], marker="s", ls="", color="#dddddd", markeredgecolor="black", markersize=8,
                     label=robustness.head_note(int(w))) for w in sorted(shown.loc[subset, "way"].unique())]
    colours = ax.legend(handles=[Line2D([], [], marker="o", ls="", color=c, markeredgecolor="black", markersize=8,
                                        label=d) for d, c in palette.items()] + (heads if subset.any() else []),
                        title="pre-training data" + (" / head" if subset.any() else ""), fontsize=8,
                        title_fontsize=8, loc="upper left")
    ax.add_artist(colours)
    refs = _size_legend(pts["params_m"])
    ax.legend(handles=[ax.scatter([], [], s=_marker_area(pd.Series([p])), color="#dddddd", edgecolors="black",
                                  linewidths=0.6, label=f"{p:g} M") for p in refs],
              title="parameters", fontsize=8, title_fontsize=8, loc="lower right", labelspacing=1.2, borderpad=0.9)
    if chance.any() and (~chance).any():
        at_chance = "; ".join(f"{r.label}: validation {100 * r.val_top1:.1f}%, out of context {100 * r.ooc_top1:.1f}%"
                              for r in pts[chance].itertuples())
        fig.supxlabel(f"at chance level, not drawn: {at_chance}", fontsize=7.5, color="#555555")
    ax.set_title("In-distribution accuracy vs. objects out of context\n(bars: 95% intervals; dotted: y = x)",
                 fontsize=10)
    return fig


# ----------------------------------------------------------------------------- backgrounds
def fig_backgrounds(r: Results, most_fooling: int = 10) -> Figure:
    """Top-1 per class x background (heat map, n in every cell) beside the backgrounds whose 95%
    interval lies below that of all other images (`robustness.ranking`), or a line saying none does."""
    df = r.predictions[r.predictions["background"] != ""]
    if df.empty:
        raise BitlabError(f"{r.path}: no background information (the official class-folder layout has none)")
    ncol, nrow = df["background"].nunique(), df["class"].nunique()
    fig = Figure(figsize=(max(7.0, 0.48 * ncol + 2.5) + 5.0, max(3.6, 0.42 * nrow + 2.2)), layout="constrained")
    ax, bx = fig.subplots(1, 2, width_ratios=[max(4.0, 0.48 * ncol + 1.5), 5.0])
    _heatmap(ax, df, shown_label(r), r.task["note"] if r.subset_head else "")
    _fooling_bars(bx, df[df["background"] != robustness.IN_CONTEXT], most_fooling)
    return fig


def _heatmap(ax, df: pd.DataFrame, label: str, note: str = "") -> None:
    import seaborn as sns

    grid = df.pivot_table(index="class", columns="background", values="top1_correct", aggfunc="mean") * 100
    counts = df.pivot_table(index="class", columns="background", values="top1_correct", aggfunc="size")
    grid, counts = (t.rename(index=spaced, columns=spaced) for t in (grid, counts))
    # Columns from most to least fooling, so the heat map reads left to right like the bar chart.
    order = grid.mean(axis=0).sort_values().index
    grid, counts = grid[order], counts[order]
    nrow, ncol = grid.shape
    # every cell says its accuracy and how many images it rests on (one image: 0 or 100)
    text = grid.round().astype("Int64").astype(str) + "\nn=" + counts.astype("Int64").astype(str)
    annot = text.where(grid.notna(), "").to_numpy() if ncol * nrow <= 41 * 21 else False
    sns.heatmap(grid, ax=ax, vmin=0, vmax=100, cmap="RdYlGn", annot=annot, fmt="", linewidths=0.5,
                linecolor="white", annot_kws={"fontsize": 6}, cbar_kws={"label": "top-1 accuracy (%)", "shrink": 0.8})
    ax.set_xlabel("background (lowest mean top-1 first)")
    ax.set_ylabel("class")
    ax.tick_params(axis="x", labelrotation=60, labelsize=8)
    ax.tick_params(axis="y", labelrotation=0, labelsize=8)
    est = robustness.accuracy(df)
    effect = robustness.background_effect(df)
    ax.set_title(f"{label}: top-1 per class and background\nall: {est.value:.0%} "
                 f"[{est.low:.0%}, {est.high:.0%}] (95%, {robustness.interval_method(est)})"
                 + (f"\nvariance: class {effect['class']:.0%}, background {effect['background']:.0%} "
                    f"(p = {effect['p_value']:.2g}), class x background {effect['class_x_background']:.0%}"
                    if effect else "")
                 + (f"\n{note}" if note else ""), fontsize=10)


def _fooling_bars(bx, df: pd.DataFrame, most_fooling: int) -> None:
    ranked = robustness.ranking(df, "background", "most_fooling_backgrounds", "no background")
    worst = ranked["most_fooling_backgrounds"][:most_fooling][::-1]
    errors = np.array([1 - w["top1"] for w in worst]) * 100
    # the interval of the error is that of the accuracy, turned round
    spans = np.array([[e - (1 - w["top1_ci"][1]) * 100, (1 - w["top1_ci"][0]) * 100 - e]
                      for e, w in zip(errors, worst)]).T if worst else None
    bars = bx.barh([spaced(w["background"]) for w in worst], errors, xerr=spans, color="#c62828",
                   error_kw={"ecolor": "#333333", "capsize": 3, "elinewidth": 1})
    for bar, w in zip(bars, worst):
        wrong = ", ".join(f"{n} ({c}x)" for n, c in w["wrong_predictions"][:2])
        bx.text(min(bar.get_width() + 1.5, 60), bar.get_y() + bar.get_height() / 2, wrong, va="center", fontsize=7)
    if not worst:
        bx.text(0.5, 0.5, "\n".join(textwrap.wrap(ranked["most_fooling_backgrounds_note"], 40)), ha="center",
                va="center", transform=bx.transAxes, fontsize=9)
        bx.set_yticks([])
    bx.set_xlim(0, 100)
    bx.set_xlabel("top-1 error (%), 95% interval")
    bx.set_title("backgrounds that fool it beyond the rest (interval below all other\nimages'), with the "
                 "commonest wrong top-1 labels there (label, images)", fontsize=9)
    bx.tick_params(axis="y", labelsize=8)
    bx.spines[["top", "right"]].set_visible(False)


# ----------------------------------------------------------------------------- context
# (summary key, legend) of the left panel: top-1 of the same objects alone, on every background, at home
CONTEXT_BARS = (("only_fg", "object alone (only_fg, grey)"), ("composites", "composites (all backgrounds)"),
                ("usual_context_composites", "composites in a usual context"))
CONTEXT_COLOURS = ("#1565c0", "#c62828", "#2e7d32")


def context_points(results: Sequence[Results]) -> pd.DataFrame:
    """One row per out-of-context result with context scores (`bitlab.eval.context`): each bar's value
    and 95% interval (`<key>`, `<key>_low`, `<key>_high`), NaN where the set has none."""
    rows = []
    for r in results:
        c = r.context
        if r.role != "ooc" or not c:
            continue
        row: dict = {"label": r.label}
        entries = {"only_fg": c["variants"].get("only_fg"), "composites": c.get("composites"),
                   "usual_context_composites": c.get("usual_context_composites"),
                   "consistent": c.get("context_consistent_share_of_errors"), "fooled": c.get("fooled_by_context")}
        for key, e in entries.items():
            value = np.nan if not e else e.get("top1", e.get("value"))
            low, high = (e.get("top1_ci") or e.get("ci") or (None, None)) if e else (None, None)
            row.update({key: value, f"{key}_low": np.nan if low is None else low,
                        f"{key}_high": np.nan if high is None else high})
        rows.append(row)
    return pd.DataFrame(rows)


def _bars(ax, x: np.ndarray, pts: pd.DataFrame, key: str, width: float, colour: str, label: str) -> None:
    v = pts[key].to_numpy(float) * 100
    err = np.abs(np.stack([pts[f"{key}_low"], pts[f"{key}_high"]]).astype(float) * 100 - v)
    ax.bar(x, np.nan_to_num(v), width, yerr=np.nan_to_num(err), color=colour, label=label, capsize=3,
           error_kw={"elinewidth": 1, "ecolor": "#333333"})


def fig_context(results: Sequence[Results]) -> Figure:
    """Per model: top-1 on the objects alone, on the composites and on the composites in a usual
    context (left), and the share of its mistakes that the bare background suggests and of the
    composites it gets wrong although it knows the object alone (right), with 95% intervals."""
    pts = context_points(results)
    if pts.empty:
        raise BitlabError("the context figure needs results with context scores: evaluate make-ooc output "
                          "built with --variants")
    fig = Figure(figsize=(max(7.5, 2.6 * len(pts) + 3.5), 4.6), layout="constrained")
    ax, bx = fig.subplots(1, 2, width_ratios=[3, 2])
    x = np.arange(len(pts))
    bars = [(k, t, c) for (k, t), c in zip(CONTEXT_BARS, CONTEXT_COLOURS) if pts[k].notna().any()]
    width = 0.8 / len(bars)
    for i, (key, text, colour) in enumerate(bars):
        _bars(ax, x + (i - (len(bars) - 1) / 2) * width, pts, key, width, colour, text)
    right = [("consistent", "mistakes the bare background suggests\n(top-1 in its top-5 there), of all mistakes",
              "#6a1b9a"), ("fooled", "composites wrong although the object\nalone is right, of all composites",
                           "#ef6c00")]
    right = [b for b in right if pts[b[0]].notna().any()]
    for i, (key, text, colour) in enumerate(right):
        _bars(bx, x + (i - (len(right) - 1) / 2) * 0.8 / max(len(right), 1), pts, key, 0.8 / max(len(right), 1),
              colour, text)
    for a, title in ((ax, "top-1 of the same objects (%)"), (bx, "share (%)")):
        a.set_xticks(x, [_words(label, 22) for label in pts["label"]], fontsize=8)
        a.set_ylim(0, 105)
        a.set_ylabel(title)
        a.grid(axis="y", alpha=0.3)
        a.legend(fontsize=7, loc="upper right", framealpha=0.9)
        a.spines[["top", "right"]].set_visible(False)
    ax.set_title("Without the background, on any, on its own (bars: 95% intervals)", fontsize=10)
    bx.set_title("Mistakes the background explains", fontsize=10)
    return fig


# ----------------------------------------------------------------------------- shared drawing helpers
def _thumbnail(path: str | Path, side: int) -> np.ndarray:
    """The image with its longer side at `side` px: figures stay light however big the photos."""
    img = decode_image(path)
    scale = side / max(img.shape[:2])
    return resize(img, max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))


def _bare(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _frame(ax, colour: str, width: float) -> None:
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color(colour)
        spine.set_linewidth(width)


def _words(text: str, width: int = 18) -> str:
    return "\n".join(textwrap.wrap(text, width, max_lines=2, placeholder="…")) or text


# ----------------------------------------------------------------------------- Fig. 7 / 11
# Fig. 7 left's colours: raters side with the prediction (green), with the label (red), or are
# unsure / find neither right (yellow). Mistakes nobody rated yet are grey.
VERDICT_COLOURS = {"prediction": "#2e7d32", "label": "#c62828", UNSURE: "#f9a825"}
# The predicted word in the verdict's colour, but yellow text is hard to read on white: dark amber.
VERDICT_TEXT = {**VERDICT_COLOURS, UNSURE: "#9a6700"}
UNRATED = "#9e9e9e"
VERDICT_LEGEND = {"prediction": "raters agree with the prediction", "label": "raters agree with the label",
                  UNSURE: "raters unsure, or neither fits"}


def fig_mistakes(groups: Mapping[str, pd.DataFrame], root: str | Path, *, verdicts: Mapping[str, str] | None = None,
                 ncols: int = 6, max_per_group: int | None = None, title: str | None = None,
                 thumb: int = 160) -> Figure:
    """Fig. 7 / 11: each mistake as its image with the prediction above and the label below, one
    block per group (`bitlab.eval.errors.by_topk` / `by_confusion`, or {"all": mistakes}).

    `verdicts` (image -> 'prediction' | 'label' | 'unsure', from `errors.consensus`) colour the
    frames and the predicted word as in Fig. 7 left; without it every frame is grey."""
    groups = {name: g for name, g in groups.items() if len(g)}
    if not groups:
        raise BitlabError("no mistakes to draw: the model is right on every image")
    verdicts = verdicts or {}
    shown = {name: (g if max_per_group is None else g.head(max_per_group)) for name, g in groups.items()}
    # At least three columns, so that a group of one image is a row of a table, not a poster.
    ncols = max(1, min(ncols, max(3, *(len(g) for g in shown.values()))))
    rows = {name: math.ceil(len(g) / ncols) for name, g in shown.items()}

    def below(m) -> str:  # the label, and the ILSVRC names it accepts when they are other words
        accepts = getattr(m, "accepted", "")
        return _words(m.label) + (f"\n(right: {_words(accepts, 28)})" if accepts and accepts != m.label else "")

    lines = max(below(m).count("\n") + 1 for g in shown.values() for m in g.itertuples())
    # Inches: a 1.5 in thumbnail, the predicted word above it, the label's lines below it.
    width, height = 1.75, 1.5 + 0.3 + 0.16 * lines
    heights = [height * r + 0.4 for r in rows.values()]  # + the group's heading
    fig = Figure(figsize=(width * ncols, sum(heights) + 1.1), layout="constrained")
    subfigs = fig.subfigures(len(shown), 1, height_ratios=heights, squeeze=False)
    for sub, (name, g) in zip(subfigs[:, 0], shown.items()):
        more = len(groups[name]) - len(g)
        sub.suptitle(f"{name}: {len(groups[name])} mistake{'s' if len(groups[name]) != 1 else ''}"
                     + (f" ({more} more not drawn)" if more else ""), fontsize=10, x=0.01, ha="left")
        axes = sub.subplots(rows[name], ncols, squeeze=False)
        for ax in axes.ravel():
            _bare(ax)
        for ax, m in zip(axes.ravel(), g.itertuples()):
            ax.imshow(_thumbnail(Path(root) / m.image, thumb))
            verdict = verdicts.get(m.image)
            colour = VERDICT_COLOURS.get(verdict, UNRATED)
            _frame(ax, colour, 4 if verdict else 1)
            ax.set_title(_words(m.prediction), fontsize=8, color=VERDICT_TEXT.get(verdict, "black"), fontweight="bold")
            ax.set_xlabel(below(m), fontsize=7.5)
    counts = pd.Series([verdicts.get(img) for g in groups.values() for img in g["image"]]).value_counts()
    handles = [Line2D([], [], color=VERDICT_COLOURS[v], lw=6, label=f"{text} ({int(counts.get(v, 0))})")
               for v, text in VERDICT_LEGEND.items()]
    unrated = sum(len(g) for g in groups.values()) - int(counts.sum())
    handles.append(Line2D([], [], color=UNRATED, lw=2, label=f"not rated ({unrated})"))
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle((title + "\n" if title else "") + "above each image: the model's top-1 prediction; "
                 "below: the label", fontsize=10)
    return fig


# ----------------------------------------------------------------------------- Fig. 9
def gallery_pairs(pairs: Sequence[tuple], n: int) -> list[tuple]:
    """Up to `n` pairs spread evenly over similarity, so both the surest matches and the
    borderline ones near the threshold (where false positives hide) are shown."""
    ranked = sorted(pairs, key=lambda p: -p[2])
    if len(ranked) <= n:
        return ranked
    return [ranked[round(i)] for i in np.linspace(0, len(ranked) - 1, n)]


def duplicates_title(summary: Mapping) -> str:
    """What a `bitlab dedup` summary found, in words, for the gallery's title."""
    t = summary["threshold"]
    rule = f"cosine ≥ {t:g}" if summary["metric"] == "cosine" else f"Hamming ≤ {t:g}"
    return (f"{summary['embedding']} ({rule}): {summary['dups']} of {summary['downstream_images']} test images "
            f"have a near-duplicate among {summary['upstream_images']} training images")


def fig_duplicates(pairs: Sequence[tuple], labels: Sequence[bool] | None = None, *, summary: Mapping | None = None,
                   ncols: int = 4, height: int = 128) -> Figure:
    """Fig. 9: each downstream query beside its upstream match, captioned with how close they are.

    `pairs` are `(query_path, match_path, similarity)` (`DedupResult.pairs`, `gallery_pairs`);
    `labels` (True = a real duplicate, False = a false positive, as judged by a person or known
    from planted copies) colour the borders green / red as in the paper; `summary` (a `bitlab
    dedup` summary) titles the figure and, for hashes, captions Hamming distances."""
    return fig_duplicates_by_downstream({"": (pairs, labels)}, summary=summary, ncols=ncols, height=height)


def fig_duplicates_by_downstream(groups: Mapping[str, tuple[Sequence[tuple], Sequence[bool] | None]], *,
                                 summary: Mapping | None = None, ncols: int = 4, height: int = 128) -> Figure:
    """Fig. 9 as the paper lays it out: a block of pairs per downstream data set (`groups`: its
    name -> (pairs, labels), as for `fig_duplicates`; a name "" draws no block heading)."""
    for name, (pairs, labels) in groups.items():
        if labels is not None and len(labels) != len(pairs):
            raise BitlabError(f"{name or 'pairs'}: {len(labels)} labels for {len(pairs)} pairs")
    images = {name: [_side_by_side(decode_image(q), decode_image(m), height) for q, m, _ in pairs]
              for name, (pairs, _) in groups.items()}
    every = [im for ims in images.values() for im in ims]
    ncols = min(ncols, max([len(p) for p, _ in groups.values()] + [1]))
    rows = {name: max(1, math.ceil(len(p) / ncols)) for name, (p, _) in groups.items()}
    # Rows as tall as the pictures are (the pairs are wide), plus two caption lines.
    aspect = float(np.mean([im.shape[1] / im.shape[0] for im in every])) if every else 2.0
    width = 3.2
    heading = {name: 0.35 if name else 0.0 for name in groups}
    heights = [(width / aspect + 0.6) * rows[name] + heading[name] for name in groups]
    fig = Figure(figsize=(max(width * ncols, 6.4), sum(heights) + 0.7), layout="constrained")
    # Pairs narrower than the mean fill their panel's height, and their captions would touch the row above.
    fig.get_layout_engine().set(h_pad=0.12)
    subfigs = fig.subfigures(len(groups), 1, height_ratios=heights, squeeze=False)[:, 0]
    for sub, (name, (pairs, labels)) in zip(subfigs, groups.items()):
        if name:
            sub.suptitle(f"{name}: {len(pairs)} pair{'s' if len(pairs) != 1 else ''}", fontsize=10, x=0.01,
                         ha="left")
        _duplicate_panels(sub, pairs, labels, images[name], rows[name], ncols, summary)
    labelled = any(labels is not None for _, labels in groups.values())
    note = "left: test image, right: its nearest training image"
    note += ("; green border: true duplicate, red: false positive" if labelled
             else "; not reviewed: a person judges each pair, as in the paper")
    fig.suptitle(f"{duplicates_title(summary)}\n({note})" if summary else note, fontsize=9)
    return fig


def _duplicate_panels(sub, pairs: Sequence[tuple], labels: Sequence[bool] | None, images: Sequence[np.ndarray],
                      nrows: int, ncols: int, summary: Mapping | None) -> None:
    hamming = summary is not None and summary["metric"] == "hamming"
    axes = sub.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel():
        _bare(ax)
    for i, ((q, m, s), img) in enumerate(zip(pairs, images)):
        ax = axes.ravel()[i]
        ax.imshow(img)
        how = (f"Hamming distance {round((1 - s) * summary['dims'])} bits" if hamming else f"similarity {s:.3f}")
        ax.set_title(f"{_short(Path(q).name)} | {_short(Path(m).name)}\n{how}", fontsize=7)
        if labels is not None:
            _frame(ax, "tab:green" if labels[i] else "tab:red", 4)


def save_duplicates_gallery(result: DedupResult, n: int) -> list[Path]:
    """`bitlab dedup`'s Fig. 9: up to `n` of `result`'s pairs as `duplicates.png` / `.pdf` in its
    output folder (nothing when `n` is 0 or nothing was found)."""
    if not n or not result.duplicates:
        return []
    return save(fig_duplicates(gallery_pairs(result.pairs(), n), summary=result.summary), result.out, "duplicates")


def _short(name: str, keep: int = 30) -> str:
    """A long file name cut in the middle: pairs of make-ooc names would crowd the panel."""
    return name if len(name) <= keep else f"{name[:keep // 2 - 1]}…{name[-(keep // 2):]}"


def _side_by_side(a: np.ndarray, b: np.ndarray, height: int, gap: int = 6) -> np.ndarray:
    def fit(img: np.ndarray) -> np.ndarray:
        return resize(img, max(1, round(img.shape[1] * height / img.shape[0])), height)

    a, b = fit(a), fit(b)
    return np.concatenate([a, np.full((height, gap, 3), 255, np.uint8), b], axis=1)


def fig_nearest(summary: Mapping, nearest: Sequence[Mapping], groups: Mapping[str, str] | None = None) -> Figure:
    """Where the threshold cuts: every test image's distance to its nearest training image
    (`bitlab dedup`'s nearest.csv), one dot each, in rows by `groups` (test image name -> group,
    e.g. `PlantedSets.kinds()` when the truth is known), and the threshold line."""
    if not nearest:
        raise BitlabError("no test images to draw")
    cosine = summary["metric"] == "cosine"
    key = "similarity" if cosine else "distance"
    values = pd.DataFrame({"query": [r["query"] for r in nearest], "value": [float(r[key]) for r in nearest]})
    values["group"] = values["query"].map(groups or {}).fillna("test images")
    names = [g for g in dict.fromkeys([*(groups or {}).values(), "test images"]) if (values["group"] == g).any()]
    fig = Figure(figsize=(6.4, 1.2 + 0.7 * len(names)), layout="constrained")
    ax = fig.subplots()
    palette = ["#1565c0", "#ef6c00", "#2e7d32", "#6a1b9a"]
    rng = np.random.default_rng(0)  # vertical jitter only, so dots at one value stay apart
    threshold = float(summary["threshold"])
    for i, name in enumerate(names):
        v = values.loc[values["group"] == name, "value"].to_numpy()
        flagged = int((v >= threshold).sum() if cosine else (v <= threshold).sum())
        ax.scatter(v, i + rng.uniform(-0.18, 0.18, len(v)), s=22, alpha=0.7, color=palette[i % len(palette)],
                   linewidths=0)
        ax.text(1.01, i, f"{flagged} of {len(v)}\nflagged", transform=ax.get_yaxis_transform(), va="center",
                fontsize=8)
    ax.axvline(threshold, color="#c62828", lw=1.5, ls="--")
    lo, hi = (-0.05, 1.02) if cosine else (-1, max(values["value"].max(), threshold) + 2)
    ax.axvspan(*((threshold, hi) if cosine else (lo, threshold)), color="#c62828", alpha=0.06)
    ax.set_xlim(lo, hi)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_xlabel("cosine similarity to the nearest training image" if cosine else
                  f"Hamming distance to the nearest training image (of {summary['dims']} bits)")
    rule = f"≥ {threshold:g}" if cosine else f"≤ {threshold:g}"
    ax.set_title(f"{summary['embedding']}: nearest neighbour of every test image\n"
                 f"(dashed: threshold, shaded: counted as a near-duplicate, {rule})", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


# ----------------------------------------------------------------------------- Fig. 2 / 5
def fig_fewshot(runs: pd.DataFrame, *, series: str | None = None, title: str | None = None) -> Figure:
    """Fig. 2 / 5: top-1 (%) against examples per class (log axis at the K values run); every
    trial (seed) a light dot, the median over trials a line. `runs` has `k`, `seed`, `top1`
    (`bitlab.train.finetune.read_fewshot`), optionally `num_classes` (draws chance level),
    `pretrained` (the weights the runs started from; empty: trained from scratch, which the title
    or the curve's legend entry then says, as it is no transfer) and a `series` column that
    splits it into curves (models, data sets, pre-training)."""
    if runs.empty:
        raise BitlabError("no few-shot runs to draw")

    def from_scratch(g: pd.DataFrame) -> bool:
        return "pretrained" in g and bool(g["pretrained"].isna().all())

    all_scratch = from_scratch(runs)
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    groups = list(runs.groupby(series, sort=False)) if series else [(None, runs)]
    colours = ["#1565c0", "#ef6c00", "#2e7d32", "#6a1b9a", "#c62828", "#00838f"]
    for i, (name, g) in enumerate(groups):
        colour = colours[i % len(colours)]
        # Trials at one K spread a little sideways (x 0.94 ... 1.06), so equal results stay visible.
        order = g.groupby("k").cumcount().to_numpy()
        spread = g.groupby("k")["seed"].transform("size").to_numpy()
        jitter = np.where(spread > 1, 0.94 + 0.12 * order / np.maximum(spread - 1, 1), 1.0)
        ax.scatter(g["k"] * jitter, g["top1"] * 100, s=18, color=colour, alpha=0.35, linewidths=0, zorder=2)
        med = g.groupby("k")["top1"].median() * 100
        n = g.groupby("k").size()
        what = f"median of {n.min()}" + (f"-{n.max()}" if n.max() != n.min() else "") + " trials"
        if from_scratch(g) and not all_scratch:
            what += ", trained from scratch"
        ax.plot(med.index, med.to_numpy(), "-o", color=colour, ms=5, lw=2, zorder=3,
                label=f"{name}: {what}" if name is not None else what)
    if "num_classes" in runs and runs["num_classes"].notna().all() and runs["num_classes"].nunique() == 1:
        chance = 100 / float(runs["num_classes"].iloc[0])
        ax.axhline(chance, ls=":", color="#888888", lw=1, zorder=1)
        ax.text(runs["k"].min(), chance, f" chance ({chance:.0f}%)", va="bottom", fontsize=7, color="#666666")
    ks = sorted(runs["k"].unique())
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlim(ks[0] / 1.4, ks[-1] * 1.4)
    ax.set_ylim(0, 100)
    ax.set_xlabel("examples per class (log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", title="light dots: every trial (seed)", title_fontsize=8)
    ax.set_title((title or "Few-shot transfer") + ("\n(trained from scratch, no pre-training)" if all_scratch else ""),
                 fontsize=10)
    return fig


def fig_fewshot_architectures(runs: pd.DataFrame, *, shots: Sequence[int] = (1, 5),
                              title: str | None = None) -> Figure:
    """Fig. 5: few-shot top-1 (%) against architecture, a panel per downstream data set (columns)
    and K examples per class (rows), a line per upstream data set through the medians over trials,
    every trial a light dot. `runs` has `architecture`, `upstream`, `k`, `seed`, `top1` and
    optionally `downstream` (`read_fewshot` rows of several sweeps, labelled); architectures keep
    their order of appearance (order them small to large)."""
    runs = runs[runs["k"].isin(shots)]
    if runs.empty:
        raise BitlabError(f"no few-shot runs with {' or '.join(map(str, shots))} example(s) per class to draw")
    runs = runs.assign(downstream=runs["downstream"] if "downstream" in runs else "")
    archs = list(dict.fromkeys(runs["architecture"]))
    downs = list(dict.fromkeys(runs["downstream"]))
    ks = [k for k in shots if (runs["k"] == k).any()]
    fig = Figure(figsize=(max(3.2, 1.1 * len(archs) + 1.4) * len(downs), 2.6 * len(ks) + 0.9), layout="constrained")
    axes = fig.subplots(len(ks), len(downs), squeeze=False, sharex=True)
    colours = ["#1565c0", "#ef6c00", "#2e7d32", "#6a1b9a", "#c62828", "#00838f"]
    x_of = {a: i for i, a in enumerate(archs)}
    for r, k in enumerate(ks):
        for c, down in enumerate(downs):
            ax = axes[r, c]
            cell = runs[(runs["k"] == k) & (runs["downstream"] == down)]
            for i, (up, g) in enumerate(cell.groupby("upstream", sort=False)):
                colour = colours[i % len(colours)]
                x = g["architecture"].map(x_of).to_numpy(float)
                order = g.groupby("architecture").cumcount().to_numpy()  # trials side by side, not on top
                ax.scatter(x + 0.04 * (order - order.mean()), g["top1"] * 100, s=16, color=colour, alpha=0.35,
                           linewidths=0, zorder=2)
                med = g.groupby("architecture", sort=False)["top1"].median() * 100
                n = g.groupby("architecture").size()
                ax.plot(med.index.map(x_of), med.to_numpy(), "-o", color=colour, ms=5, lw=2, zorder=3,
                        label=f"{up} (median of {n.min()}" + (f"-{n.max()}" if n.max() != n.min() else "") + ")")
            ax.set_xticks(range(len(archs)), archs, fontsize=8)
            ax.set_xlim(-0.5, len(archs) - 0.5)
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            ax.set_title((f"{down}, " if down else "") + f"{k} example{'s' if k != 1 else ''} per class", fontsize=9)
            if c == 0:
                ax.set_ylabel("top-1 accuracy (%)")
            if r == len(ks) - 1:
                ax.set_xlabel("architecture")
    axes[0, 0].legend(fontsize=7, title="upstream (pre-training) data", title_fontsize=7, loc="best")
    fig.suptitle(title or "Few-shot transfer by architecture (paper Fig. 5): light dots are single trials",
                 fontsize=10)
    return fig


# ----------------------------------------------------------------------------- OOC tour
def fig_ooc_grid(ev: robustness.EvalSet, *, classes: Sequence[str] | None = None, per_class: int = 1,
                 max_backgrounds: int | None = 12, thumb: int = 200) -> Figure:
    """The out-of-context set as a grid: a row per foreground object (`per_class` per class), a
    column per background; an empty cell is a pair the set does not have. A layout without
    backgrounds (the official class folders) gets a row per class and its first images."""
    items = [it for it in ev.items if classes is None or it.cls in classes]
    if not items:
        raise BitlabError(f"{ev.root}: no images" + (f" of the classes {', '.join(classes)}" if classes else ""))
    limit = max_backgrounds if max_backgrounds is not None else len(items)
    if any(it.background for it in items):
        cells = {((it.cls, it.fg_uid or it.image), it.background): it.image for it in items}
        all_columns = sorted({it.background for it in items})
        what = f"{len({key for key, _ in cells})} objects, {len(all_columns)} backgrounds"
        heading = "rows: foreground objects; columns: backgrounds"
    else:
        order: dict[str, int] = {}
        cells = {}
        for it in sorted(items, key=lambda it: (it.cls, it.image)):
            order[it.cls] = order.get(it.cls, -1) + 1
            cells[((it.cls, ""), order[it.cls])] = it.image
        all_columns = sorted({col for _, col in cells})
        what, heading = "no backgrounds recorded", "rows: classes; columns: their first images"
    columns = all_columns[:limit]
    by_class: dict[str, list[tuple[str, str]]] = {}
    for key in sorted({key for key, _ in cells}):
        by_class.setdefault(key[0], []).append(key)
    rows = [key for keys in by_class.values() for key in keys[:per_class]]
    fig = Figure(figsize=(1.15 * len(columns) + 1.6, 1.15 * len(rows) + 1.2), layout="constrained")
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, key in enumerate(rows):
        for c, col in enumerate(columns):
            ax = axes[r, c]
            _bare(ax)
            if (image := cells.get((key, col))) is not None:
                ax.imshow(_thumbnail(ev.root / image, thumb))
            if r == 0 and isinstance(col, str):
                ax.set_title(_words(spaced(col), 14), fontsize=8)
            if c == 0:
                ax.set_ylabel(spaced(key[0]), fontsize=9, rotation=0, ha="right", va="center")
    hidden = len(all_columns) - len(columns)
    fig.suptitle(f"{ev.name}: {len(items)} images, {len(by_class)} classes, {what}"
                 + (f" ({hidden} more not shown)" if hidden else "") + f"\n{heading}", fontsize=10)
    return fig


# ----------------------------------------------------------------------------- all of it
def make_report(result_dirs: Sequence[str | Path], out: str | Path, *, images: Sequence[str] | None = None,
                num_images: int = 4, fits: Collection[str] | None = None) -> list[Path]:
    """Every figure and table the results allow; returns the files written (PNG and PDF of each
    figure, the CSV tables). A folder of several models (`bitlab evaluate --model A --model B`)
    stands for all of them, in their order. `fits`: images where the first model's wrong top-1 fits
    the background (`choose_images`); by default its `context_consistent_error`s, when evaluated."""
    if num_images < 1:
        raise ConfigError("num_images", f"must be at least 1, got {num_images}")
    results = find_results(result_dirs)
    out = Path(out)
    existed = out.exists()
    files: list[Path] = []
    try:
        with fileio.lock_folder(out, "report"):  # one report fills a figures folder at a time
            _draw_all(results, out, images, num_images, files, fits)
            _write_tables(results, out, files)
    except BaseException:
        if not existed:  # a failed report leaves no half-filled (or empty) folder of its own behind
            for f in files:
                f.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    return files


def _draw_all(results: list[Results], out: Path, images: Sequence[str] | None, num_images: int,
              files: list[Path], fits: Collection[str] | None = None) -> None:
    """make_report's drawing; appends each file to `files` as soon as it is written."""
    ooc = [r for r in results if r.role == "ooc"]
    if fits is None:
        fits = fitting_mistakes(ooc[0]) if ooc else set()
    for r in ooc:
        if r.has_backgrounds:
            files.extend(save(fig_backgrounds(r), out, f"backgrounds_{slug(r.label)}"))
        else:
            log.warning("%s: no backgrounds recorded, no heat map", r.path)
    if len(ooc) >= 2:
        a, b = ooc[:2]
        log.info("%d images meet the paper's rule for Fig. 13 (out of context, %s wrong, %s right)",
                 len(telling_images(a, b)), a.label, b.label)
        chosen = list(images) if images else choose_images(a, b, num_images, fits)
        files.extend(save(fig_top5(a, b, chosen[:1], fits), out, "fig12_left_top5"))
        files.extend(save(fig_top5(a, b, chosen, fits), out, "fig13_top5"))
    else:
        log.warning("Fig. 12 left / 13 need two models' out-of-context results; got %d", len(ooc))
    if not val_vs_ooc_points(results).empty:
        files.extend(save(fig_val_vs_ooc(results), out, "fig12_right_val_vs_ooc"))
    else:
        log.warning("Fig. 12 right needs a validation and an out-of-context result of the same model")
    if not context_points(results).empty:
        files.extend(save(fig_context(results), out, "context"))
    if not files:
        raise BitlabError("nothing to draw: give out-of-context results (and validation results for Fig. 12 right)")


def _write_tables(results: list[Results], out: Path, files: list[Path]) -> None:
    """per_class.csv, per_background.csv, per_object.csv: the out-of-context results that share the
    first one's images, side by side (`bitlab.eval.tables`)."""
    ooc = [r for r in results if r.role == "ooc" and r.has_backgrounds]
    if not ooc:
        return
    first = set(ooc[0].predictions["image"])
    same = [r for r in ooc if first <= set(r.predictions["image"])]
    for r in ooc:
        if r not in same:
            log.warning("%s: not on the images of %s, left out of the tables", r.path, ooc[0].path)
    for by in ("class", "background", "object"):
        path = out / f"per_{by}.csv"
        with fileio.atomic_write(path, "w", newline="", encoding="utf-8") as f:
            tables.table(same, by).to_csv(f, index=False, float_format="%.6g")
        files.append(path)
