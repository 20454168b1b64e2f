"""A `bitlab evaluate` results folder: its file names and the reader (`bitlab.eval.evaluate` writes it).

- `predictions.csv`: one row per image (class, background, top-k ILSVRC ids, names, probabilities,
  correctness, probability on the correct classes);
- `summary.json`: the model, the data set and every accuracy breakdown;
- `config.json`: the `EvaluateConfig` that produced them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bitlab.errors import BitlabError
from bitlab.eval import robustness

PREDICTIONS = "predictions.csv"
SUMMARY = "summary.json"
CONFIG = "config.json"


@dataclass
class Results:
    """One `bitlab evaluate` output folder."""

    path: Path
    summary: dict
    config: dict
    predictions: pd.DataFrame

    @property
    def label(self) -> str:
        return self.summary["model"]["label"]

    @property
    def role(self) -> str:
        return self.summary["dataset"]["role"]

    @property
    def task(self) -> dict:
        """How the model was scored (`evaluate.scored_items`); results from before it: the 1000-way task."""
        return self.summary.get("task") or {"way": robustness.PAPER_WAY, "subset": False, "note": "",
                                            "images_left_out": 0, "classes_left_out": []}

    @property
    def subset_head(self) -> bool:
        """A head over a subset of the ILSVRC-2012 classes: scored over its own classes, an easier task."""
        return bool(self.task["subset"])

    @property
    def data_root(self) -> Path:
        """The evaluated data folder. Results made before paths were stored absolute hold it relative
        to where `bitlab evaluate` ran: then it is looked for beside the results folder's parents."""
        stored = Path(self.summary["dataset"]["path"])
        if stored.is_dir():
            return stored
        if not stored.is_absolute():
            for parent in self.path.resolve().parents:
                if (parent / stored).is_dir():
                    return parent / stored
        raise BitlabError(f"{self.path / SUMMARY}: dataset.path {str(stored)!r} not found (neither from "
                          f"{Path.cwd()} nor beside the parents of {self.path}): move the data back or "
                          "re-run `bitlab evaluate`")

    @property
    def has_backgrounds(self) -> bool:
        """Whether the images record their backgrounds (the official class-folder layout does not)."""
        return bool((self.predictions["background"] != "").any())

    @property
    def k(self) -> int:
        return robustness.topk_of(self.predictions)


def load_results(path: str | Path) -> Results:
    path = Path(path)
    if not path.is_dir():
        raise BitlabError(f"{path}: results folder not found")
    for name in (SUMMARY, CONFIG, PREDICTIONS):
        if not (path / name).is_file():
            raise BitlabError(f"{path / name}: missing results file (run `bitlab evaluate --out {path}` first)")
    try:
        summary = json.loads((path / SUMMARY).read_text())
        config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise BitlabError(f"{path}: unreadable results file: {e}") from None
    df = pd.read_csv(path / PREDICTIONS, keep_default_na=False,
                     dtype={c: str for c in ("image", "class", "background", "fg_uid", "bg_uid", "targets")})
    if df.empty:
        raise BitlabError(f"{path / PREDICTIONS}: no predictions")
    return Results(path, summary, config, df)
