"""A `bitlab evaluate` results folder: its file names and the reader (`bitlab.eval.evaluate` writes it).

- `predictions.csv`: one row per image (class, background, top-k ILSVRC ids, names, probabilities,
  correctness, probability on the correct classes; with make-ooc's variants beside the composites,
  the context columns of `bitlab.eval.context`);
- `variant_predictions.csv` (with variants): the same for every variant image, with its `variant`;
- `summary.json`: the model, the data set and every accuracy breakdown, with 95% intervals;
- `config.json`: the `EvaluateConfig` that produced them.

Several models evaluated together (`bitlab evaluate --model A --model B`) write `OUT/models.json`
and one such folder per model, `OUT/<label slug>/`; `find_results` expands OUT into them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from bitlab.errors import BitlabError
from bitlab.eval import robustness

PREDICTIONS = "predictions.csv"
VARIANT_PREDICTIONS = "variant_predictions.csv"
SUMMARY = "summary.json"
CONFIG = "config.json"
MODELS_INDEX = "models.json"
# Per-image context columns (bitlab.eval.context): True / False, empty where a partner is missing.
_FLAGS = ("object_alone_correct", "fooled_by_context", "context_consistent_error", "mixed_rand_correct")
_TEXT = ("image", "class", "background", "fg_uid", "bg_uid", "targets", "variant", "paste_xy", "pair_bg_uid",
         "only_fg_top1_name", "no_fg_top1_name")


def slug(text: str) -> str:
    """A label as a file or folder name: 'BiT-S-R50x1 (random weights)' -> 'BiT-S-R50x1-random-weights'."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-")


@dataclass
class Results:
    """One `bitlab evaluate` output folder."""

    path: Path
    summary: dict
    config: dict
    predictions: pd.DataFrame
    variant_predictions: pd.DataFrame | None = None  # with make-ooc's variants: every variant image

    @property
    def label(self) -> str:
        return self.summary["model"]["label"]

    @property
    def role(self) -> str:
        return self.summary["dataset"]["role"]

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

    @property
    def context(self) -> dict | None:
        """The context scores (`bitlab.eval.context.summarize`), when variants were evaluated."""
        return self.summary.get("context")


def _read_table(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, keep_default_na=False, dtype={c: str for c in _TEXT})
    for c in _FLAGS:
        if c in df:
            df[c] = df[c].astype(str).map({"True": True, "False": False, "": pd.NA}).astype("boolean")
    for c in [c for c in df if re.fullmatch(r"no_fg_top\d+_ids", c)]:
        df[c] = df[c].astype(str)
    return df


def load_results(path: str | Path) -> Results:
    path = Path(path)
    if not path.is_dir():
        raise BitlabError(f"{path}: results folder not found")
    if (path / MODELS_INDEX).is_file() and not (path / SUMMARY).is_file():
        folders = ", ".join(str(p) for p in model_folders(path))
        raise BitlabError(f"{path}: holds several models' results ({MODELS_INDEX}): read one of {folders} "
                          "(bitlab report takes the folder itself)")
    for name in (SUMMARY, CONFIG, PREDICTIONS):
        if not (path / name).is_file():
            raise BitlabError(f"{path / name}: missing results file (run `bitlab evaluate --out {path}` first)")
    try:
        summary = json.loads((path / SUMMARY).read_text())
        config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise BitlabError(f"{path}: unreadable results file: {e}") from None
    df = _read_table(path / PREDICTIONS)
    if df.empty:
        raise BitlabError(f"{path / PREDICTIONS}: no predictions")
    variants = _read_table(path / VARIANT_PREDICTIONS) if (path / VARIANT_PREDICTIONS).is_file() else None
    return Results(path, summary, config, df, variants)


def model_folders(path: str | Path) -> list[Path]:
    """The results folders under `path`: itself, or those `path/models.json` lists (several models
    evaluated together), in evaluation order."""
    path = Path(path)
    index = path / MODELS_INDEX
    if not index.is_file() or (path / SUMMARY).is_file():
        return [path]
    try:
        return [path / m["folder"] for m in json.loads(index.read_text())["models"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise BitlabError(f"{index}: unreadable list of models ({e})") from None


def find_results(paths: Sequence[str | Path]) -> list[Results]:
    """`load_results` of every folder given, a multi-model folder expanded into its models."""
    return [load_results(p) for path in paths for p in model_folders(path)]
