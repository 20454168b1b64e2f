"""A `bitlab evaluate` results folder: its file names and the reader (`bitlab.eval.evaluate` writes it).

- `predictions.csv`: one row per image (class, background, top-k ILSVRC ids, names, probabilities,
  correctness, probability on the correct classes; with make-ooc's variants beside the composites,
  the context columns of `bitlab.eval.context`);
- `variant_predictions.csv` (with variants): the same for every variant image, with its `variant`;
- `summary.json`: the model, the data set and every accuracy breakdown, with 95% intervals;
- `config.json`: the `EvaluateConfig` that produced them.

Several models evaluated together (`bitlab evaluate --model A --model B`) write `OUT/models.json`
and one such folder per model, `OUT/<label slug>/`; `find_results` expands OUT into them.

`evaluate` holds the folder's lock while it writes (`bitlab.fileio.lock_folder`) and `invalidate`s the
old summary and predictions before its config.json replaces the old one; `load_results` refuses a
folder in use, or whose files disagree.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from bitlab import fileio
from bitlab.errors import BitlabError
from bitlab.eval import robustness

PREDICTIONS = "predictions.csv"
VARIANT_PREDICTIONS = "variant_predictions.csv"
SUMMARY = "summary.json"
CONFIG = "config.json"
MODELS_INDEX = "models.json"
# Per-image context columns (bitlab.eval.context): True / False, empty where a partner is missing.
_CONTEXT_FLAGS = ("object_alone_correct", "fooled_by_context", "context_consistent_error", "mixed_rand_correct")


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

    @property
    def context(self) -> dict | None:
        """The context scores (`bitlab.eval.context.summarize`), when variants were evaluated."""
        return self.summary.get("context")


def invalidate(path: str | Path) -> None:
    """Before a results folder is rewritten: its summary goes first, then its predictions, so that an
    interrupted rerun leaves no folder whose files describe two runs (`load_results` refuses it)."""
    for name in (SUMMARY, PREDICTIONS, VARIANT_PREDICTIONS):
        (Path(path) / name).unlink(missing_ok=True)


# What figures and notebooks read from summary.json (dotted paths), and the types they need.
_SUMMARY_FIELDS = {"model.label": str, "model.name": str, "model.params_m": (int, float),
                   "model.pretraining_data": str, "dataset.path": str, "dataset.name": str, "dataset.role": str,
                   "dataset.num_images": int, "n": int, "top1": (int, float)}
# config.json (the EvaluateConfig) against summary.json: the same run wrote both. `--model RUN_DIR`
# is recorded as `model.run` (its registry name as `model.name`), and a run's weights file as
# `model.pretrained` with no --pretrained given, so a config's None there is filled in by the run.
_SAME_RUN = (("model", ("model.name", "model.run"), True), ("pretrained", ("model.pretrained",), True),
             ("label_map", ("model.label_map",), False))
_TEXT_COLUMNS = ("image", "class", "background", "targets")


def load_results(path: str | Path) -> Results:
    """Read a results folder, refusing one whose files disagree or are damaged (a `BitlabError`
    naming the file and field): a writer still at work, a missing or unreadable file, a summary
    without a field the figures need, a config from another run than the summary, predictions
    with missing columns, cells that are not numbers or booleans, or another row count than `n`."""
    path = Path(path)
    if not path.is_dir():
        raise BitlabError(f"{path}: results folder not found")
    if (path / MODELS_INDEX).is_file() and not (path / SUMMARY).is_file():
        folders = ", ".join(str(p) for p in model_folders(path))
        raise BitlabError(f"{path}: holds several models' results ({MODELS_INDEX}): read one of {folders} "
                          "(bitlab report takes the folder itself)")
    fileio.check_not_in_use(path)
    for name in (SUMMARY, CONFIG, PREDICTIONS):
        if not (path / name).is_file():
            raise BitlabError(f"{path / name}: missing results file (run `bitlab evaluate --out {path}` first)")
    summary, config = _read_json(path / SUMMARY), _read_json(path / CONFIG)
    _check_summary(path / SUMMARY, summary)
    for key, fields, filled in _SAME_RUN:
        if key not in config or (filled and config[key] is None):
            continue
        if not any(_same(config[key], _field(summary, field)) for field in fields):
            raise BitlabError(f"{path / CONFIG}: field {key!r} is {config[key]!r}, but {path / SUMMARY} field "
                              f"{fields[0]!r} is {_field(summary, fields[0])!r}: the files come from two runs (an "
                              "interrupted evaluate?); run `bitlab evaluate` again")
    df = _read_predictions(path / PREDICTIONS)
    if len(df) != summary["n"]:
        raise BitlabError(f"{path / PREDICTIONS}: {len(df)} rows, but {path / SUMMARY} field 'n' is {summary['n']} "
                          "(the file is cut short, or from another run); run `bitlab evaluate` again")
    return Results(path, summary, config, df, _read_variants(path, summary))


def _read_variants(path: Path, summary: dict) -> pd.DataFrame | None:
    """variant_predictions.csv, which a summary with context scores needs, with as many rows as the
    summary's variants."""
    if summary.get("context") is None:
        return None
    file = path / VARIANT_PREDICTIONS
    if not file.is_file():
        raise BitlabError(f"{file}: missing results file ({path / SUMMARY} has context scores); "
                          "run `bitlab evaluate` again")
    df = _read_predictions(file)
    n = sum(v.get("n", 0) for v in _field(summary, "context.variants").values()) \
        if isinstance(_field(summary, "context.variants"), dict) else len(df)
    if len(df) != n:
        raise BitlabError(f"{file}: {len(df)} rows, but {path / SUMMARY} counts {n} variant images "
                          "(the file is cut short, or from another run); run `bitlab evaluate` again")
    return df


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


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BitlabError(f"{path}: unreadable results file: {e}") from None
    if not isinstance(value, dict):
        raise BitlabError(f"{path}: unreadable results file: a JSON object was expected, got {type(value).__name__}")
    return value


_MISSING = object()


def _same(given, recorded) -> bool:
    """A config value against the summary's record of it (paths compare as paths: `runs/ft/` is `runs/ft`)."""
    return given == recorded or (isinstance(given, str) and isinstance(recorded, str) and Path(given) == Path(recorded))


def _field(obj: dict, dotted: str):
    for key in dotted.split("."):
        obj = obj.get(key, _MISSING) if isinstance(obj, dict) else _MISSING
    return obj


def _check_summary(path: Path, summary: dict) -> None:
    for field, kind in _SUMMARY_FIELDS.items():
        value = _field(summary, field)
        if value is _MISSING:
            raise BitlabError(f"{path}: field {field!r} is missing (not a complete `bitlab evaluate` summary)")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BitlabError(f"{path}: field {field!r} is {value!r}, not a {getattr(kind, '__name__', 'number')}")
    if summary["dataset"]["role"] not in ("ooc", "val"):
        raise BitlabError(f"{path}: field 'dataset.role' is {summary['dataset']['role']!r}, not 'ooc' or 'val'")


def _read_predictions(path: Path) -> pd.DataFrame:
    """predictions.csv with its columns checked and typed: ids int, probabilities float, flags bool."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise BitlabError(f"{path}: no predictions (the file is empty)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BitlabError(f"{path}: not a readable predictions table ({detail})") from None
    if df.empty:
        raise BitlabError(f"{path}: no predictions")
    ks = sorted(int(c[3:-3]) for c in df.columns if re.fullmatch(r"top\d+_id", c))
    k = ks[-1] if ks else 1
    ranks = [f"top{j}_{x}" for j in range(1, k + 1) for x in ("id", "prob")]
    flags = ["top1_correct", f"top{k}_correct", *(["usual_context"] if "usual_context" in df else [])]
    if missing := [c for c in (*_TEXT_COLUMNS, *flags, "target_prob", *ranks) if c not in df]:
        raise BitlabError(f"{path}: missing column(s) {', '.join(missing)} (columns: {', '.join(df.columns)})")
    for col in ("target_prob", *ranks):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() | ((values != values.round()) if col.endswith("_id") else False)
        if bad.any():
            _bad_cell(path, df, col, bad, "an integer" if col.endswith("_id") else "a number")
        df[col] = values.astype("int64") if col.endswith("_id") else values.astype("float64")
    for col in flags:
        bad = ~df[col].isin(("True", "False"))
        if bad.any():
            _bad_cell(path, df, col, bad, "True or False")
        df[col] = df[col] == "True"
    for col in [c for c in _CONTEXT_FLAGS if c in df]:
        bad = ~df[col].isin(("True", "False", ""))
        if bad.any():
            _bad_cell(path, df, col, bad, "True, False or empty")
        df[col] = df[col].map({"True": True, "False": False, "": pd.NA}).astype("boolean")
    return df


def _bad_cell(path: Path, df: pd.DataFrame, column: str, bad: pd.Series, wanted: str) -> None:
    i = int(bad.to_numpy().argmax())
    raise BitlabError(f"{path}: line {i + 2}, column {column!r} is {df[column].iloc[i]!r}, not {wanted} "
                      "(the file is cut short or was edited?); run `bitlab evaluate` again")
