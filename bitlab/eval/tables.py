"""Tables a researcher reads: every model side by side per class, background or object, with 95%
intervals, the context scores, and each model's paired difference from the baseline (the first).

One row per group (`(all)` first: every out-of-context composite) and, per model `<label>`:
`top1[<label>]` with `top1_low[...]` / `top1_high[...]`; with make-ooc's variants also
`only_fg_top1[...]` (the objects alone, on the group's composites), `background_gap[...]` (only_fg -
composite, paired, with its interval and `gap_mcnemar_p[...]`), `fooled_by_context[...]` and
`context_consistent_of_errors[...]` (shares, with intervals); per other model, against the baseline
`<base>`: `diff_top1[<label> - <base>]`, its interval, `mcnemar_p[...]` and the discordant images
`<label>_only[...]` / `<base>_only[...]` (the exact McNemar test runs on them).

Intervals as everywhere (`bitlab.eval.stats`): clustered by object where a group holds several
images of one object (a class, all composites), Wilson's over images where it does not (a
background holds one image per object; the images of one object are its backgrounds).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from bitlab.errors import BitlabError
from bitlab.eval import robustness, stats
from bitlab.eval.results import Results

ALL = "(all)"
GROUPS = {"class": "class", "background": "background", "object": "fg_uid"}


def joined(results: Sequence[Results]) -> pd.DataFrame:
    """The out-of-context composites every model scored (a head over a subset of the classes scores
    only its classes' images: then only those), one row per image: its class, background, object and, per model label, `correct[label]` and the context columns `alone[label]`,
    `consistent[label]` (NA where the model has no variants)."""
    if not results:
        raise BitlabError("no results to tabulate")
    base = results[0].predictions
    df = base.loc[~base["background"].isin(["", robustness.IN_CONTEXT]),
                  ["image", "class", "background", "fg_uid", "usual_context"]].copy()
    if df.empty:
        raise BitlabError(f"{results[0].path}: no out-of-context composites (no backgrounds recorded)")
    for r in results:
        p = r.predictions.set_index("image")
        missing = ~df["image"].isin(p.index)
        if missing.any() and not r.subset_head:
            raise BitlabError(f"{r.path}: no prediction for {int(missing.sum())} of the images {results[0].path} "
                              f"has (e.g. {df.loc[missing, 'image'].iloc[0]}): evaluate every model on the same data")
        # A head over a subset of the classes scored only its classes' images: the table is of those.
        df = df[~missing]
        if df.empty:
            raise BitlabError(f"{r.path}: no out-of-context image in common with {results[0].path} "
                              f"({r.task['note']}): nothing to tabulate side by side")
        rows = p.loc[df["image"]]
        df[f"correct[{r.label}]"] = rows["top1_correct"].to_numpy(bool)
        for col, name in (("object_alone_correct", "alone"), ("context_consistent_error", "consistent")):
            df[f"{name}[{r.label}]"] = (rows[col].astype("boolean").to_numpy() if col in rows
                                        else pd.array([pd.NA] * len(df), dtype="boolean"))
    return df.reset_index(drop=True)


def table(results: Sequence[Results], by: str) -> pd.DataFrame:
    """The comparison table per `by` ("class", "background" or "object"), `(all)` first."""
    if by not in GROUPS:
        raise BitlabError(f"tables are per {', '.join(GROUPS)}, not {by!r}")
    df = joined(results)
    column = GROUPS[by]
    groups = [(ALL, df)] + list(df.groupby(column, sort=True))
    rows = []
    for name, g in groups:
        # within one object the images are its backgrounds: independent given the object
        one_object = by == "object" and name != ALL
        clusters = None if one_object else robustness.objects_of(g)
        row = {by: name, "n": len(g)}
        if by == "object":
            row["class"] = g["class"].iloc[0] if one_object else ""
        for r in results:
            # one object's composites share its only_fg image (centred): one answer, not n
            row.update(_model_columns(g, r.label, clusters, np.zeros(len(g)) if one_object else clusters))
        for r in results[1:]:
            row.update(_difference(g, r.label, results[0].label, clusters))
        rows.append(row)
    return pd.DataFrame(rows)


def _interval(row: dict, name: str, est: stats.Estimate) -> None:
    row[name] = est.value
    row[name.replace("[", "_low[", 1)], row[name.replace("[", "_high[", 1)] = est.low, est.high


def _model_columns(g: pd.DataFrame, label: str, clusters: np.ndarray | None, alone_clusters: np.ndarray | None) -> dict:
    row: dict = {}
    right = g[f"correct[{label}]"].to_numpy(bool)
    _interval(row, f"top1[{label}]", stats.accuracy(right, clusters))
    alone = g[f"alone[{label}]"]
    if alone.notna().all():
        a = alone.to_numpy(bool)
        _interval(row, f"only_fg_top1[{label}]", stats.accuracy(a, alone_clusters))
        gap = stats.paired_difference(a, right, clusters)
        _interval(row, f"background_gap[{label}]", gap.difference)
        row[f"gap_mcnemar_p[{label}]"] = gap.mcnemar_p
        _interval(row, f"fooled_by_context[{label}]", stats.accuracy(a & ~right, clusters))
    consistent = g[f"consistent[{label}]"]
    if consistent.notna().all():
        wrong = ~right
        c = consistent.to_numpy(bool)[wrong]
        _interval(row, f"context_consistent_of_errors[{label}]",
                  stats.accuracy(c, None if clusters is None else clusters[wrong]))
        row[f"errors[{label}]"] = int(wrong.sum())
    return row


def _difference(g: pd.DataFrame, label: str, base: str, clusters: np.ndarray | None) -> dict:
    d = stats.paired_difference(g[f"correct[{label}]"].to_numpy(bool), g[f"correct[{base}]"].to_numpy(bool), clusters)
    pair = f"{label} - {base}"
    row: dict = {}
    _interval(row, f"diff_top1[{pair}]", d.difference)
    row[f"mcnemar_p[{pair}]"] = d.mcnemar_p
    row[f"{label}_only[{pair}]"], row[f"{base}_only[{pair}]"] = d.a_only, d.b_only
    return row
