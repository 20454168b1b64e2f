"""Context reliance, measured: what a model gets right without the background, what the background
makes it get wrong, and whether a mistake is one the background suggests.

The paper (appendix F) says ILSVRC-2012 models "predict objects absent from the image, but that
could plausibly appear with the background". With make-ooc's variants (`bitlab.ooc.variants`) beside
the composites, every composite (an object on a background) has partners from the same geometry:

- its only_fg image: the same object at the same size and place on grey (same `fg_uid`, `paste_xy`);
- its no_fg image: the same background square without the object (same `bg_uid`);
- its mixed_rand image: the object on a random background of another category (`pair_bg_uid`).

Per composite and model (columns of predictions.csv; empty where a partner is missing):

| column | definition |
|---|---|
| `object_alone_correct` | top-1 right on its only_fg image |
| `fooled_by_context` | right on only_fg, wrong on the composite |
| `context_consistent_error` | wrong on the composite, and that top-1 is among the model's top-5 on the bare background (no_fg) |
| `mixed_rand_correct` | top-1 right on its mixed_rand image |

and `background_gap` = top-1(only_fg) - top-1(composite) over composites, overall, per class and
per background: a paired difference over the same composites (each paired with its object alone),
with a bootstrap interval over objects and McNemar's exact test (`bitlab.eval.stats`). The summary
(`summarize`) gives each share with its interval; README's "Context scores" table says why each.
What the demo and the report call a mistake that "fits the background" (Fig. 13) is
`context_consistent_error`, from `context_consistent_errors`: one definition.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from bitlab import fileio
from bitlab.errors import BitlabError
from bitlab.eval import robustness, stats
from bitlab.eval.robustness import IN_CONTEXT, EvalItem, EvalSet
from bitlab.ooc.record import DATASET
from bitlab.ooc.variants import FOLDER, VARIANTS

COLUMNS = ("object_alone_correct", "fooled_by_context", "context_consistent_error", "mixed_rand_correct")


# ----------------------------------------------------------------------------- finding the variants
def find_variants(ev: EvalSet, variants_dir: str | Path | None = None) -> dict[str, EvalSet]:
    """The variant sets beside a make-ooc build: `<dir>/<variant>/manifest.csv` for each variant,
    `dir` being `variants_dir` or the build's own `variants/` folder. Nothing for other layouts; a
    `variants_dir` with no variant in it, or variants that share no object or background with the
    composites, is an error naming it."""
    if variants_dir is None and (ev.kind != "manifest" or ev.role != "ooc"):
        return {}
    base = Path(variants_dir) if variants_dir is not None else ev.root / FOLDER
    found = {v: robustness.load_eval_set(base / v) for v in VARIANTS if (base / v / robustness.MANIFEST).is_file()}
    if variants_dir is None:
        _check_recorded(ev.root, found)
    if variants_dir is not None and not found:
        raise BitlabError(f"{base}: no variants found (looked for {', '.join(f'{v}/manifest.csv' for v in VARIANTS)}; "
                          "`bitlab make-ooc --variants` writes them)")
    fgs, bgs = {it.fg_uid for it in ev.items}, {it.bg_uid for it in ev.items}
    for v, vs in found.items():
        shared = {it.bg_uid for it in vs.items} & bgs if v == "no_fg" else {it.fg_uid for it in vs.items} & fgs
        if not shared - {""}:
            raise BitlabError(f"{vs.root}: the {v} images share no {'background' if v == 'no_fg' else 'object'} "
                              f"with {ev.root}'s composites (variants of another build?)")
    return found


def _check_recorded(root: Path, found: Mapping[str, EvalSet]) -> None:
    """Variants beside a build must be the ones its dataset.json records (manifest sha256)."""
    record = root / DATASET
    if not record.is_file():  # not a make-ooc build (check_complete has refused an unfinished one)
        return
    recorded = json.loads(record.read_text(encoding="utf-8")).get("variants", {})
    for v, vs in found.items():
        want = recorded.get(v, {}).get("manifest_sha256")
        if want != fileio.sha256_file(vs.root / robustness.MANIFEST):
            raise BitlabError(f"{vs.root / robustness.MANIFEST}: not the {v} manifest that {record} records "
                              "(variants of another build, or edited); rerun the make-ooc command")


def variant_items(ev: EvalSet, sets: Mapping[str, EvalSet]) -> list[EvalItem]:
    """The variant images as items of `ev`: paths relative to its root (absolute when outside it)."""
    items = []
    for v, vs in sets.items():
        for it in vs.items:
            path = (vs.root / it.image).resolve()
            rel = path.relative_to(ev.root.resolve()).as_posix() if path.is_relative_to(ev.root.resolve()) else str(path)
            items.append(EvalItem(rel, it.cls, it.targets, it.background, it.fg_uid, it.bg_uid, it.usual_context,
                                  it.variant or v, it.paste_xy, it.pair_bg_uid))
    return items


def variant_tables(items: Sequence[EvalItem], top_ids: np.ndarray, top_probs: np.ndarray,
                   target_prob: np.ndarray) -> dict[str, pd.DataFrame]:
    """The predictions on variant images, one table per variant (predictions.csv's columns plus
    `variant`, `paste_xy`, `pair_bg_uid`; no_fg images have no targets, so never a right answer)."""
    df = robustness.predictions_table(list(items), top_ids, top_probs, target_prob)
    df.insert(1, "variant", [it.variant for it in items])
    df.insert(6, "paste_xy", [it.paste_xy for it in items])
    df.insert(7, "pair_bg_uid", [it.pair_bg_uid for it in items])
    return {v: g.reset_index(drop=True) for v, g in df.groupby("variant", sort=False)}


# ----------------------------------------------------------------------------- per image
def _lookup(keys: pd.Series, table: pd.DataFrame, table_keys: pd.Series, column: str) -> pd.Series:
    """`table[column]` of the row whose key matches each of `keys` (NA where none does)."""
    by_key = pd.Series(table[column].to_numpy(), index=table_keys.to_numpy())
    by_key = by_key[~by_key.index.duplicated()]
    return pd.Series(by_key.reindex(keys.to_numpy()).to_numpy(), index=keys.index)


def join(df: pd.DataFrame, items: Sequence[EvalItem], variants: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """`df` (the composites' predictions, in `items`' order) with the per-image context columns."""
    out = df.copy()
    k = robustness.topk_of(df)
    wrong = ~out["top1_correct"].astype(bool)
    if (alone := variants.get("only_fg")) is not None:
        key = out["fg_uid"] + "@" + pd.Series([it.paste_xy for it in items], index=out.index)
        akey = alone["fg_uid"] + "@" + alone["paste_xy"]
        out["only_fg_top1_name"] = _lookup(key, alone, akey, "top1_name").fillna("")
        out["object_alone_correct"] = _lookup(key, alone, akey, "top1_correct").astype("boolean")
        out["fooled_by_context"] = (out["object_alone_correct"] & wrong).astype("boolean")
    if (bare := variants.get("no_fg")) is not None:
        top = background_topk(bare)
        out[f"no_fg_top{k}_ids"] = out["bg_uid"].map(lambda u: ";".join(map(str, top[u])) if u in top else "")
        out["no_fg_top1_name"] = _lookup(out["bg_uid"], bare, bare["bg_uid"], "top1_name").fillna("")
        out["context_consistent_error"] = context_consistent_errors(out, top)
    if (mixed := variants.get("mixed_rand")) is not None:
        key = out["fg_uid"] + "|" + out["bg_uid"]
        out["mixed_rand_correct"] = _lookup(key, mixed, mixed["fg_uid"] + "|" + mixed["pair_bg_uid"],
                                            "top1_correct").astype("boolean")
    return out


def background_topk(bare: pd.DataFrame) -> dict[str, list[int]]:
    """A model's top-k ILSVRC-2012 classes on each bare background, from its no_fg predictions:
    bg_uid -> ids, best first."""
    cols = [f"top{j}_id" for j in range(1, robustness.topk_of(bare) + 1)]
    return {uid: [int(i) for i in ids] for uid, ids in zip(bare["bg_uid"], bare[cols].to_numpy())}


def context_consistent_errors(df: pd.DataFrame, topk: Mapping[str, Sequence[int]]) -> pd.Series:
    """The one definition of a mistake that fits the background: per composite of a predictions
    table, the top-1 is wrong and among the model's top-k on the same bare background (`topk`:
    `background_topk`). NA where the background has no no_fg prediction."""
    inside = [int(i) in topk[u] if u in topk else pd.NA for i, u in zip(df["top1_id"], df["bg_uid"])]
    wrong = ~df["top1_correct"].astype(bool).to_numpy()
    return pd.Series(pd.array(inside, dtype="boolean") & wrong, index=df.index, name="context_consistent_error")


# ----------------------------------------------------------------------------- the summary
def _share(mask: pd.Series, df: pd.DataFrame) -> dict:
    """A share of `df`'s images (NA: no partner, left out) with its interval, clustered by object."""
    known = mask.notna().to_numpy()
    est = stats.accuracy(mask[known].to_numpy(bool), robustness.objects_of(df[known]))
    return _estimate(est)


def _estimate(est: stats.Estimate) -> dict:
    return {"value": est.value, "ci": est.interval, "n": est.n, "method": robustness.interval_method(est)}


def _gap(df: pd.DataFrame) -> dict:
    """top-1(only_fg) - top-1(composite) on the same composites, with `fooled` (only the object alone
    right) and `helped` (only the composite right), the paired interval and McNemar's p."""
    d = stats.paired_difference(df["object_alone_correct"].to_numpy(bool), df["top1_correct"].to_numpy(bool),
                                robustness.objects_of(df))
    return {**_estimate(d.difference), "fooled": d.a_only, "helped": d.b_only, "mcnemar_p": d.mcnemar_p}


def summarize(df: pd.DataFrame, variants: Mapping[str, pd.DataFrame]) -> dict:
    """The context section of summary.json for a joined table (`join`): each variant's accuracy, the
    composites' (all, and those in a usual context), and every score with its 95% interval."""
    out: dict = {"variants": {}}
    for v, t in variants.items():
        out["variants"][v] = {"n": int(len(t))} if v == "no_fg" else robustness.accuracies(t)
    comp = df[~df["background"].isin(["", IN_CONTEXT])]
    out["composites"] = robustness.accuracies(comp)
    usual = comp[comp["usual_context"].astype(bool)]
    if len(usual):
        out["usual_context_composites"] = robustness.accuracies(usual)
    if "object_alone_correct" in comp:
        paired = comp[comp["object_alone_correct"].notna()]
        out["object_alone_correct"] = _share(paired["object_alone_correct"], paired)
        out["fooled_by_context"] = _share(paired["fooled_by_context"], paired)
        alone = paired[paired["object_alone_correct"].astype(bool)]
        out["fooled_when_alone_correct"] = _share(alone["fooled_by_context"], alone)
        out["background_gap"] = {
            "overall": _gap(paired),
            "per_class": {c: _gap(g) for c, g in paired.groupby("class", sort=True)},
            "per_background": {b: _gap(g) for b, g in paired.groupby("background", sort=True)}}
    if "context_consistent_error" in comp:
        paired = comp[comp["context_consistent_error"].notna()]
        out["context_consistent_error"] = _share(paired["context_consistent_error"], paired)
        errors = paired[~paired["top1_correct"].astype(bool)]
        out["context_consistent_share_of_errors"] = _share(errors["context_consistent_error"], errors)
    if "mixed_rand_correct" in comp and len(usual):
        # ImageNet-9's BG-Gap (mixed-same - mixed-rand): the usual-context composites against the
        # same objects on random other backgrounds
        paired = usual[usual["mixed_rand_correct"].notna()]
        d = stats.paired_difference(paired["top1_correct"].to_numpy(bool), paired["mixed_rand_correct"].to_numpy(bool),
                                    robustness.objects_of(paired))
        out["usual_context_gain"] = {**_estimate(d.difference), "usual_only": d.a_only, "mixed_only": d.b_only,
                                     "mcnemar_p": d.mcnemar_p}
    return out
