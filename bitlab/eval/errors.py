"""Error analysis (paper Fig. 7 and 11): every top-1 mistake of a model, grouped, and rated by people.

- `mistakes`: the top-1 errors of a `bitlab evaluate` predictions table, each with the word the
  model predicted and the word of its label (the paper draws prediction over label);
- `by_topk`, `by_confusion`: Fig. 7 right's groups (top-1 wrong but top-5 right / top-5 wrong)
  and the commonest (label, prediction) pairs;
- ratings: per mistake and rater, whether the rater agrees with the `prediction`, the `label` or
  `neither` (unsure, or neither fits). Stored as a CSV (`image, rater, verdict, label, prediction`),
  one verdict per (image, prediction, rater): a verdict on a prediction says nothing about another
  model's (or a re-evaluation's) prediction for the same image, so only ratings of the mistakes as
  they are now count (`current_ratings`). `consensus` turns those into Fig. 7 left's colours
  (green: raters side with the prediction, red: with the label, yellow: unsure or neither).
  `RatingTool` is the ipywidgets form that writes them.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Callable, Mapping

import cv2
import pandas as pd

from bitlab import fileio
from bitlab.data import imagenet
from bitlab.data.transforms import decode_image, resize
from bitlab.errors import BitlabError
from bitlab.eval import robustness

VERDICTS = {"prediction": "agree with the prediction", "label": "agree with the label",
            "neither": "unsure / neither fits"}
RATING_COLUMNS = ("image", "rater", "verdict", "label", "prediction")
REQUIRED_COLUMNS = ("image", "rater", "verdict", "prediction")
# Consensus of an image's raters: one of VERDICTS' first two, or this one (Fig. 7 left's yellow).
UNSURE = "unsure"
VERDICTS_BY_CODE = list(VERDICTS)
_WNID = re.compile(r"n\d{8}")


def _label_word(cls: str) -> str:
    """A class as a word: an ILSVRC wnid folder becomes its name, anything else stays."""
    if _WNID.fullmatch(cls) and (i := imagenet.index_of().get(cls)) is not None:
        return imagenet.names()[i]
    return cls


def _accepted(targets: str) -> str:
    """The ILSVRC-2012 names a label accepts ('281;282' -> 'tabby, tiger cat')."""
    names = [imagenet.names()[int(t)] for t in targets.split(";") if t.strip()]
    return ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")


def mistakes(predictions: pd.DataFrame) -> pd.DataFrame:
    """The top-1 mistakes of a predictions table (`bitlab evaluate`'s predictions.csv), in its
    order, with `label` and `prediction` words, the ILSVRC names the label `accepted` as right,
    the prediction's probability and whether the label is in the top-k (`topk_correct`)."""
    k = robustness.topk_of(predictions)
    wrong = predictions[~predictions["top1_correct"].astype(bool)]
    return pd.DataFrame({
        "image": wrong["image"].astype(str),
        "label": wrong["class"].astype(str).map(_label_word),
        "accepted": wrong["targets"].astype(str).map(_accepted),
        "prediction": wrong["top1_name"].astype(str),
        "prediction_prob": wrong["top1_prob"].astype(float),
        "target_prob": wrong["target_prob"].astype(float),
        "background": wrong["background"].astype(str) if "background" in wrong else "",
        "topk_correct": wrong[f"top{k}_correct"].astype(bool),
    }).reset_index(drop=True).assign(k=k)


# Fig. 7 right's top group: mistakes whose raters side with the prediction (their consensus).
MORE_REPRESENTATIVE = "prediction more representative than the label"


def by_topk(mistakes: pd.DataFrame, verdicts: Mapping[str, str] | None = None) -> dict[str, pd.DataFrame]:
    """Fig. 7 right's groups: with `verdicts` (`consensus`), first the mistakes whose raters side
    with the prediction (its top group); then, of the rest, those right by top-k although wrong by
    top-1, and those wrong by top-k too (empty groups are left out)."""
    k = int(mistakes["k"].iloc[0]) if len(mistakes) else 5
    better = mistakes["image"].map(dict(verdicts or {})).eq("prediction")
    rest = mistakes[~better]
    groups = {MORE_REPRESENTATIVE + " (raters)": mistakes[better],
              f"top-1 wrong, top-{k} right": rest[rest["topk_correct"]],
              f"top-{k} wrong too": rest[~rest["topk_correct"]]}
    return {name: g for name, g in groups.items() if len(g)}


def confusion_pairs(mistakes: pd.DataFrame) -> pd.DataFrame:
    """(label, prediction) pairs with how many mistakes each explains, commonest first."""
    if mistakes.empty:
        return pd.DataFrame(columns=["label", "prediction", "count"])
    counts = mistakes.groupby(["label", "prediction"], sort=False).size().rename("count").reset_index()
    return counts.sort_values(["count", "label", "prediction"], ascending=[False, True, True], kind="stable",
                              ignore_index=True)


def by_confusion(mistakes: pd.DataFrame, top: int = 8, min_count: int = 1) -> dict[str, pd.DataFrame]:
    """The `top` commonest confusions (at least `min_count` mistakes each), as groups titled
    'label → prediction'."""
    out = {}
    for row in confusion_pairs(mistakes).head(top).itertuples():
        if row.count >= min_count:
            g = mistakes[(mistakes["label"] == row.label) & (mistakes["prediction"] == row.prediction)]
            out[f"{row.label} → {row.prediction}"] = g
    return out


# ----------------------------------------------------------------------------- ratings
def empty_ratings() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=str) for c in RATING_COLUMNS})


def read_ratings(path: str | Path, missing_ok: bool = True) -> pd.DataFrame:
    """A ratings CSV; a missing file is no ratings yet (unless `missing_ok` is False)."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return empty_ratings()
        raise BitlabError(f"{path}: no such ratings file")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if missing := [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]:
            raise BitlabError(f"{path}: missing column(s) {', '.join(missing)} "
                              f"(expected {', '.join(RATING_COLUMNS)})")
        rows = []
        seen: dict[tuple[str, str, str], int] = {}
        for line, rec in enumerate(reader, start=2):
            row = {c: (rec.get(c) or "").strip() for c in RATING_COLUMNS}
            if not row["image"] or not row["rater"]:
                raise BitlabError(f"{path}, line {line}: empty image or rater")
            if row["verdict"] not in VERDICTS:
                raise BitlabError(f"{path}, line {line}: verdict {row['verdict']!r} is not one of "
                                  f"{', '.join(VERDICTS)}")
            key = (row["image"], row["prediction"], row["rater"])
            if key in seen:
                raise BitlabError(f"{path}, line {line}: {row['rater']!r} rated {row['image']!r} predicted as "
                                  f"{row['prediction']!r} already on line {seen[key]}")
            seen[key] = line
            rows.append(row)
    return pd.DataFrame(rows, columns=list(RATING_COLUMNS)) if rows else empty_ratings()


def write_ratings(path: str | Path, ratings: pd.DataFrame) -> None:
    """Atomically: a crash while saving never loses the ratings already on disk."""
    with fileio.atomic_write(path, "w", newline="", encoding="utf-8") as f:
        ratings.loc[:, list(RATING_COLUMNS)].sort_values(["image", "prediction", "rater"]).to_csv(f, index=False)


def record(ratings: pd.DataFrame, mistake: Mapping, rater: str, verdict: str) -> pd.DataFrame:
    """`ratings` with `rater`'s verdict on `mistake` (a row of `mistakes`), replacing an earlier one
    on the same image and prediction."""
    if verdict not in VERDICTS:
        raise BitlabError(f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
    if not rater.strip():
        raise BitlabError("a rating needs the rater's name")
    keep = ratings[~((ratings["image"] == mistake["image"]) & (ratings["prediction"] == mistake["prediction"])
                     & (ratings["rater"] == rater))]
    row = pd.DataFrame([{"image": mistake["image"], "rater": rater, "verdict": verdict,
                         "label": mistake["label"], "prediction": mistake["prediction"]}])
    return pd.concat([keep, row], ignore_index=True) if len(keep) else row


def current_ratings(ratings: pd.DataFrame, mistakes: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`ratings` split into those of `mistakes` as they are now (same image, same prediction) and the
    stale rest (made for another prediction, or for an image that is no longer a mistake)."""
    now = set(zip(mistakes["image"], mistakes["prediction"]))
    match = pd.Series([(i, p) in now for i, p in zip(ratings["image"], ratings["prediction"])],
                      index=ratings.index, dtype=bool)
    return ratings[match], ratings[~match]


def consensus(ratings: pd.DataFrame, mistakes: pd.DataFrame) -> dict[str, str]:
    """Per rated mistake (image): 'prediction' or 'label' when more than half of its raters chose it,
    else 'unsure' (a split vote, or raters who found neither right: the paper's yellow). Only
    ratings of the mistakes' current predictions count (`current_ratings`)."""
    out = {}
    for image, g in current_ratings(ratings, mistakes)[0].groupby("image", sort=True):
        counts = g["verdict"].value_counts()
        top = counts.index[0]
        out[str(image)] = top if top in ("prediction", "label") and counts.iloc[0] * 2 > len(g) else UNSURE
    return out


def agreement(ratings: pd.DataFrame, mistakes: pd.DataFrame) -> dict | None:
    """Fig. 7 left's raters, how far they agree beyond chance, on the mistakes every one of them
    rated (current ratings only): Fleiss' kappa over all raters and, with exactly two, Cohen's
    (statsmodels). None when fewer than two raters share an image."""
    from statsmodels.stats import inter_rater

    current = current_ratings(ratings, mistakes)[0]
    raters = sorted(current["rater"].unique())
    table = current.pivot_table(index="image", columns="rater", values="verdict", aggfunc="first")
    shared = table.dropna() if len(raters) >= 2 else table.iloc[:0]
    if shared.empty:
        return None
    codes = shared.apply(lambda col: col.map({v: i for i, v in enumerate(VERDICTS)})).to_numpy(int)
    counts, _ = inter_rater.aggregate_raters(codes, n_cat=len(VERDICTS))
    totals = counts.sum(0)
    if (totals > 0).sum() < 2:  # one verdict throughout: chance agreement is 1, and kappa 0 / 0
        return {"images": len(shared), "raters": raters, "fleiss_kappa": None, "only": VERDICTS_BY_CODE[totals.argmax()]}
    out = {"images": len(shared), "raters": raters, "fleiss_kappa": float(inter_rater.fleiss_kappa(counts))}
    if len(raters) == 2:
        square = pd.crosstab(shared.iloc[:, 0], shared.iloc[:, 1]).reindex(
            index=list(VERDICTS), columns=list(VERDICTS), fill_value=0)
        out["cohen_kappa"] = float(inter_rater.cohens_kappa(square.to_numpy(), return_results=False))
    return out


def agreement_text(stats: dict | None) -> str:
    """`agreement` in words (a title line): kappa 1 is full agreement, 0 what chance gives."""
    if stats is None:
        return "raters' agreement: needs two raters on the same images"
    if stats["fleiss_kappa"] is None:
        return (f"raters' agreement: all {len(stats['raters'])} raters chose {stats['only']!r} on the "
                f"{stats['images']} mistake(s) they all rated (kappa needs more than one verdict)")
    cohen = f"Cohen's κ = {stats['cohen_kappa']:.2f}, " if "cohen_kappa" in stats else ""
    return (f"raters' agreement on the {stats['images']} mistake(s) all {len(stats['raters'])} rated: "
            f"{cohen}Fleiss' κ = {stats['fleiss_kappa']:.2f}")


# ----------------------------------------------------------------------------- the rating form
# Keys typed into the form's key box (a kernel sees no raw key presses without an extra package).
KEYS = {"p": "prediction", "1": "prediction", "l": "label", "2": "label", "n": "neither", "3": "neither",
        "b": "back", "s": "skip"}


class RatingTool:
    """An ipywidgets form: one mistake at a time (image, prediction over label), three buttons for
    the verdict; every click is saved to `path` at once and moves to the next unrated mistake.
    Keys typed into its key box do the same (p / 1, l / 2, n / 3; b back, s skip), and `redraw`
    (e.g. `lambda: report.fig_mistakes(...)`), when given, is called after each verdict and what it
    returns is shown below the form (the coloured gallery).

        tool = RatingTool(mistakes(df), data_root, "ratings.csv", rater="ana")
        tool  # display it in JupyterLab
    """

    def __init__(self, mistakes: pd.DataFrame, root: str | Path, path: str | Path, rater: str,
                 thumb: int = 320, redraw: Callable[[], object] | None = None) -> None:
        import ipywidgets as w  # the notebooks extra; the rest of the module works without it

        self.mistakes, self.root, self.path, self.thumb = mistakes.reset_index(drop=True), Path(root), Path(path), thumb
        self.rater, self.redraw = rater, redraw
        self.ratings = read_ratings(self.path)
        self.index = 0
        # A fixed width: JupyterLab would stretch the image to the cell's width (pixelated, and the
        # buttons pushed below the fold), so it sits beside them at its own size.
        self.image = w.Image(format="png", layout=w.Layout(width=f"{thumb}px", height="auto", object_fit="contain",
                                                           flex="0 0 auto"))
        self.caption, self.status = w.HTML(), w.HTML()
        self.buttons = {v: w.Button(description=f"{text} ({key})", button_style=style, layout=w.Layout(width="auto"))
                        for (v, text), style, key in zip(VERDICTS.items(), ("success", "danger", "warning"), "pln")}
        for verdict, button in self.buttons.items():
            button.on_click(lambda _, v=verdict: self.rate(v))
        self.back, self.skip = w.Button(description="◀ back (b)"), w.Button(description="skip ▶ (s)")
        self.back.on_click(lambda _: self.show(self.index - 1))
        self.skip.on_click(lambda _: self.show(self.index + 1))
        self.keys = w.Text(placeholder="click here, then type p, l, n, b or s", continuous_update=True,
                           layout=w.Layout(width="auto"))
        self.keys.observe(self._key, names="value")
        self.gallery = w.Output()
        form = w.VBox([self.caption, *self.buttons.values(), w.HBox([self.back, self.skip]), self.keys, self.status],
                      layout=w.Layout(min_width="260px"))
        self.widget = w.VBox([w.HBox([self.image, form]), self.gallery])
        if self.mistakes.empty:
            self.widget = w.VBox([w.HTML("<b>No mistakes to rate</b>: the model is right on every image.")])
            return
        self.show(self._next_unrated(0))

    def _repr_mimebundle_(self, **kwargs) -> dict:
        """The widget, with a plain-text line for views without a kernel (a saved notebook opened
        later shows this line instead of `VBox(children=...)`)."""
        bundle = self.widget._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        data["text/plain"] = ("[rating form: no mistakes to rate]" if self.mistakes.empty else
                              f"[rating form for {len(self.mistakes)} mistakes: run this cell in JupyterLab with a "
                              f"kernel to rate them; ratings are saved to {self.path}]")
        return bundle

    def _key(self, change: dict) -> None:
        typed = change["new"].strip().lower()
        if not typed:
            return
        self.keys.value = ""  # ready for the next key (this observer sees the "" and returns)
        action = KEYS.get(typed[-1])
        if action == "back":
            self.show(self.index - 1)
        elif action == "skip":
            self.show(self.index + 1)
        elif action is not None:
            self.rate(action)

    def _mine(self) -> pd.DataFrame:
        """This rater's ratings of the mistakes as they are (a stale verdict is asked again)."""
        return current_ratings(self.ratings[self.ratings["rater"] == self.rater], self.mistakes)[0]

    def _next_unrated(self, start: int) -> int:
        done = set(self._mine()["image"])
        n = len(self.mistakes)
        for i in (*range(start, n), *range(start)):
            if self.mistakes.at[i, "image"] not in done:
                return i
        return min(start, n - 1)

    def show(self, i: int) -> None:
        self.index = i % len(self.mistakes)
        m = self.mistakes.loc[self.index]
        img = decode_image(self.root / m["image"])
        scale = self.thumb / max(img.shape[:2])
        img = resize(img, max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
        self.image.value = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))[1].tobytes()
        mine = self._mine()
        before = mine.loc[mine["image"] == m["image"], "verdict"]
        self.caption.value = (f"<b>{self.index + 1} / {len(self.mistakes)}</b> &nbsp; {m['image']}<br>"
                              f"prediction: <b>{m['prediction']}</b> ({m['prediction_prob']:.0%})<br>"
                              f"label: <b>{m['label']}</b>"
                              + (f"<br>your earlier verdict: {VERDICTS[before.iloc[0]]}" if len(before) else ""))
        stale = len(current_ratings(self.ratings[self.ratings["rater"] == self.rater], self.mistakes)[1])
        self.status.value = (f"{self.rater}: {len(mine)} of {len(self.mistakes)} rated, saved in {self.path}"
                             + (f" ({stale} earlier rating(s) of other predictions ignored)" if stale else ""))

    def rate(self, verdict: str) -> None:
        self.ratings = record(self.ratings, self.mistakes.loc[self.index], self.rater, verdict)
        write_ratings(self.path, self.ratings)
        self.show(self._next_unrated(self.index))
        if self.redraw is not None:  # the new picture replaces the old (kept in the widget's state)
            self.gallery.outputs = ()
            self.gallery.append_display_data(self.redraw())
