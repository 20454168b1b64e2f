"""Evaluation sets and robustness scoring.

An evaluation set is a list of images, each with the ILSVRC-2012 classes that count as a correct
answer and, for out-of-context (OOC) sets, the background it was pasted on. Three layouts are read:

- a folder with `manifest.csv` (bitlab's make-ooc output, or any manifest with a `file` column);
- the officially released OOC zip: one folder per class, named after the class, no manifest. A
  folder maps to its class through the class table (`classes.csv`: its `folder`, its OpenImages
  `name`, or an ILSVRC-2012 wnid / name of one of its synsets); the background is unknown;
- an ImageFolder validation set whose folders are ILSVRC-2012 wnids (`n01440764/…`).

Scoring follows the robustness literature (ImageNet-9: Xiao et al. 2020, "Noise or Signal: The Role
of Image Backgrounds in Object Recognition"): the 1000-way top-1
(top-5) prediction is correct when it (any of the five) falls in the class's ILSVRC set. No
restriction of the logits to the evaluated classes: that would inflate accuracy.

Every accuracy comes with its 95% interval (`bitlab.eval.stats`): over foreground objects where
the images share objects, Wilson's over images where they are independent; a ranking (the most
fooling backgrounds, the hardest classes) names only what its interval separates from the rest.

A model whose head is not ILSVRC-2012's 1000 classes (a fine-tuned run's, or one with a label map)
is scored through a `HeadMap`: each output stands for the ILSVRC-2012 classes its class name (a
wnid, an ILSVRC-2012 class name, a class-table folder, name or alias) or its label-map line names.
A head over a subset of them is scored over its own classes, on the images of those classes: an
easier task than the 1000-way one, which `HeadMap.note` says wherever such results are shown.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from bitlab import fileio
from bitlab.data import imagenet
from bitlab.errors import BitlabError
from bitlab.eval import stats
from bitlab.ooc.record import check_complete
from bitlab.ooc.spec import OOCClass, load_classes
from bitlab.paths import OOC_DATASET_DIR

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MANIFEST = "manifest.csv"
CLASS_TABLE = "classes.csv"
DEFAULT_CLASS_TABLE = OOC_DATASET_DIR / CLASS_TABLE
_WNID = re.compile(r"n\d{8}")
# Background category of an object shown on its own photo: a control, not out of context. Scores
# on it are reported apart, and the out-of-context scores leave it out.
IN_CONTEXT = "in-context"
NO_OBJECT = "no_fg"  # make-ooc's variant of backgrounds alone (bitlab.ooc.variants): rows without a class


PAPER_WAY = imagenet.NUM_CLASSES  # the paper's models answer among the 1000 ILSVRC-2012 classes


def _parse_targets(row: dict, where: str) -> tuple[int, ...] | None:
    """ILSVRC indices from a row's `ilsvrc_indices` (';'-separated, 0-based) or `ilsvrc_wnids`."""
    raw = (row.get("ilsvrc_indices") or "").strip()
    if raw:
        try:
            idx = tuple(int(v) for v in raw.split(";") if v.strip())
        except ValueError:
            raise BitlabError(f"{where}: ilsvrc_indices {raw!r} is not a ';'-separated list of integers") from None
        if bad := [i for i in idx if not 0 <= i < imagenet.NUM_CLASSES]:
            raise BitlabError(f"{where}: ilsvrc_indices {bad[0]} is outside 0..999")
        return idx
    raw = (row.get("ilsvrc_wnids") or "").strip()
    if raw:
        index_of = imagenet.index_of()
        wnids = [w.strip() for w in raw.split(";") if w.strip()]
        if bad := [w for w in wnids if w not in index_of]:
            raise BitlabError(f"{where}: {bad[0]!r} is not an ILSVRC-2012 wnid")
        return tuple(index_of[w] for w in wnids)
    return None


# ----------------------------------------------------------------------------- class folders
def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def folder_lookup(classes: list[OOCClass]) -> dict[str, OOCClass]:
    """Normalised folder names -> class: the table's folder, name and aliases, then the class's
    ILSVRC wnids and lemmas (the official zip names folders after the class)."""
    wnids, descriptions = imagenet.wnids(), imagenet.descriptions()
    primary: dict[str, OOCClass] = {}
    for c in classes:
        for key in (c.folder, c.name, *c.aliases):
            primary.setdefault(_norm(key), c)
    secondary: dict[str, list[OOCClass]] = {}
    for c in classes:
        for i in c.ilsvrc_indices:
            for key in [wnids[i], *descriptions[i].split(",")]:
                secondary.setdefault(_norm(key), []).append(c)
    # An ILSVRC name shared by two table classes identifies neither.
    return {**{k: v[0] for k, v in secondary.items() if len(set(v)) == 1}, **primary}


# ----------------------------------------------------------------------------- evaluation sets
@dataclass(frozen=True)
class EvalItem:
    """One image: its path relative to the set's root, its class and what counts as correct."""

    image: str
    cls: str
    targets: tuple[int, ...]
    background: str = ""
    fg_uid: str = ""
    bg_uid: str = ""
    usual_context: bool = False  # the background is a usual context for the class (make-ooc's `usual_for`)
    variant: str = ""  # make-ooc's `variant` column (bitlab.ooc.variants): "composite", "only_fg", ...
    paste_xy: str = ""  # where the object was pasted ("x,y"): a variant image pairs with its composites by it
    pair_bg_uid: str = ""  # the composite background a variant image stands in for (mixed_rand)


@dataclass
class EvalSet:
    root: Path
    kind: str  # "manifest" | "ooc-folders" | "imagefolder"
    role: str  # "ooc" (out-of-context) | "val" (in-distribution validation)
    items: list[EvalItem] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.root.name

    def paths(self) -> list[Path]:
        return [self.root / it.image for it in self.items]

    def describe(self) -> dict:
        return {"path": str(self.root.resolve()), "name": self.name, "kind": self.kind, "role": self.role,
                "num_images": len(self.items), "num_classes": len({it.cls for it in self.items}),
                "num_backgrounds": len({it.background for it in self.items if it.background}),
                "num_foregrounds": len({it.fg_uid for it in self.items if it.fg_uid})}


def load_eval_set(root: str | Path, classes: str | Path | None = None, role: str | None = None) -> EvalSet:
    """Read an evaluation set from `root` (manifest, official class folders or wnid ImageFolder)."""
    root = Path(root)
    if not root.is_dir():
        raise BitlabError(f"{root}: data folder not found")
    check_complete(root)  # a make-ooc folder being written, unfinished, or whose record disagrees: refused
    if (root / MANIFEST).is_file():
        ev = _from_manifest(root, classes)
    else:
        ev = _from_folders(root, classes)
    if not ev.items:
        raise BitlabError(f"{root}: empty dataset (no images found)")
    if role is not None:
        if role not in ("ooc", "val"):
            raise BitlabError(f"role must be 'ooc' or 'val', not {role!r}")
        ev.role = role
    return ev


def class_table_for(root: Path, classes: str | Path | None) -> list[OOCClass]:
    """The class table of the set at `root`: `classes` when given, else `root/classes.csv`, else bitlab's."""
    if classes is not None:
        return load_classes(classes)
    for candidate in (root / CLASS_TABLE, DEFAULT_CLASS_TABLE):
        if candidate.is_file():
            return load_classes(candidate)
    raise BitlabError(f"{root}: no class table to map class names to ILSVRC-2012 classes "
                      f"(looked for {root / CLASS_TABLE} and {DEFAULT_CLASS_TABLE}); pass --classes PATH")


def _manifest_rows(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """(header, [(line, row)]) of a manifest: UTF-8 with or without a BOM; an undecodable byte or
    broken quoting is an error naming the line."""
    reader = csv.DictReader(fileio.text_lines(path), strict=True)
    rows, done = [], 1
    try:
        for row in reader:
            rows.append((done + 1, row))
            done = reader.line_num
        header = reader.fieldnames or []
    except csv.Error as e:
        raise BitlabError(f"{path}: row {done + 1}: malformed CSV ({e})") from None
    return header, rows


def _from_manifest(root: Path, classes: str | Path | None) -> EvalSet:
    """Items of `root/manifest.csv`. A file listed twice is an error naming both rows: counting it
    twice would weigh it double in every score, and two rows may disagree about its class."""
    path = root / MANIFEST
    header, rows = _manifest_rows(path)
    if "file" not in header:
        raise BitlabError(f"{path}: missing column 'file' (columns: {', '.join(header) or 'none'})")
    by_name: dict[str, OOCClass] | None = None
    items = []
    seen: dict[Path, int] = {}
    for n, row in rows:
        where = f"{path}: row {n}"
        rel = (row.get("file") or "").strip()
        if not rel:
            raise BitlabError(f"{where}: empty 'file'")
        file = (root / rel).resolve()
        if not file.is_relative_to(root.resolve()):
            raise BitlabError(f"{where}: file {rel!r} points outside {root}")
        if not file.is_file():
            raise BitlabError(f"{where}: image {rel!r} not found under {root}")
        if file in seen:
            raise BitlabError(f"{where}: image {rel!r} is listed again (first on row {seen[file]}); "
                              "each image may appear once")
        seen[file] = n
        variant = (row.get("variant") or "").strip()
        if variant == NO_OBJECT:  # a background alone: nothing to be right about, only predictions
            cls, targets = "", ()
        else:
            cls = (row.get("class") or row.get("fg_class") or "").strip() or Path(rel).parent.name
            targets = _parse_targets(row, where)
        if targets is None:
            if by_name is None:
                by_name = folder_lookup(class_table_for(root, classes))
            if (c := by_name.get(_norm(cls))) is None:
                raise BitlabError(f"{where}: class {cls!r} has no ILSVRC targets in the row "
                                  "and is not in the class table")
            targets = c.ilsvrc_indices
        items.append(EvalItem(rel, cls, targets, (row.get("bg_category") or row.get("background") or "").strip(),
                              (row.get("fg_uid") or "").strip(), (row.get("bg_uid") or "").strip(),
                              _flag(row.get("usual_context"), "usual_context", where), variant,
                              (row.get("paste_xy") or "").strip(), (row.get("pair_bg_uid") or "").strip()))
    # make-ooc output is out of context, the variants too (only_fg has no background but is a control)
    role = "ooc" if any(it.background or it.variant for it in items) else "val"
    return EvalSet(root, "manifest", role, items)


def _flag(value: str | None, field_name: str, where: str) -> bool:
    value = (value or "").strip().lower()
    if value not in ("", "true", "false"):
        raise BitlabError(f"{where}: field '{field_name}' must be true or false, got {value!r}")
    return value == "true"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _from_folders(root: Path, classes: str | Path | None) -> EvalSet:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise BitlabError(f"{root}: empty dataset: no {MANIFEST} and no class folders")
    if all(_WNID.fullmatch(f.name) for f in folders):
        index_of = imagenet.index_of()
        if unknown := [f.name for f in folders if f.name not in index_of]:
            raise BitlabError(f"{root / unknown[0]}: folder {unknown[0]!r} is not an ILSVRC-2012 wnid")
        items = [EvalItem(p.relative_to(root).as_posix(), f.name, (index_of[f.name],))
                 for f in folders for p in _images_in(f)]
        return EvalSet(root, "imagefolder", "val", items)
    lookup = folder_lookup(class_table_for(root, classes))
    items = []
    for f in folders:
        c = lookup.get(_norm(f.name))
        if c is None:
            known = sorted({c.folder for c in lookup.values()})
            inner = [d.name for d in f.iterdir() if d.is_dir()]
            hint = f"; did you mean --data {f}?" if len(folders) == 1 and inner else ""
            raise BitlabError(f"{f}: class folder {f.name!r} is not in the class table "
                              f"(known: {', '.join(known)}){hint}")
        items += [EvalItem(p.relative_to(root).as_posix(), c.folder, c.ilsvrc_indices) for p in _images_in(f)]
    return EvalSet(root, "ooc-folders", "ooc", items)


# ----------------------------------------------------------------------------- heads
@dataclass(frozen=True)
class HeadMap:
    """What each output of a head that is not ILSVRC-2012's 1000 classes stands for: output j counts
    as right for an image when `ilsvrc[j]` shares a class with the image's targets."""

    names: tuple[str, ...]  # per output: its class name (or label-map line)
    ilsvrc: tuple[tuple[int, ...], ...]  # per output: the ILSVRC-2012 indices it stands for (empty: none)
    source: str  # where the mapping comes from, for messages

    @property
    def covered(self) -> frozenset[int]:
        return frozenset(i for s in self.ilsvrc for i in s)

    @property
    def way(self) -> int:
        """The classes the head answers among: its outputs that stand for some ILSVRC-2012 class."""
        return sum(1 for s in self.ilsvrc if s)

    @property
    def subset(self) -> bool:
        """Whether the head covers fewer than the 1000 classes: then only images of the classes it
        covers are scored, an easier task than the paper's."""
        return len(self.covered) < PAPER_WAY

    @property
    def note(self) -> str:
        return head_note(self.way) if self.subset else ""

    def scores(self, targets: Sequence[int]) -> bool:
        """Whether an image with these targets can be answered right (some output stands for them)."""
        return not self.covered.isdisjoint(targets)

    def right_outputs(self, targets: Sequence[int]) -> np.ndarray:
        """The outputs that are a right answer for an image with these targets."""
        t = set(targets)
        return np.asarray([j for j, s in enumerate(self.ilsvrc) if not t.isdisjoint(s)], dtype=np.int64)

    def ilsvrc_ids(self, outputs: np.ndarray, targets: Sequence[Sequence[int]]) -> np.ndarray:
        """Output ids (N, k) -> the ILSVRC-2012 index each stands for on its image (row): one of the
        image's targets when the output covers one (so `id in targets` is the verdict), else its
        first class; -1 for an output with none."""
        out = np.full(outputs.shape, -1, dtype=np.int64)
        for r, (row, t) in enumerate(zip(outputs, targets)):
            for c, j in enumerate(row):
                s = self.ilsvrc[int(j)]
                out[r, c] = next((i for i in s if i in t), s[0] if s else -1)
        return out

    def describe(self) -> dict:
        """For summary.json: `classes` lists each output's name with the wnids it stands for, in head order."""
        return {"outputs": len(self.names), "way": self.way, "subset": self.subset, "source": self.source,
                "classes": [[n, [imagenet.wnids()[i] for i in s]] for n, s in zip(self.names, self.ilsvrc)]}


def head_note(way: int) -> str:
    """How results of a head over `way` of the classes are marked (summary.json, report, figures)."""
    return f"{way}-way head: an easier task than the paper's {PAPER_WAY}-way models"


def head_from_classes(names: Sequence[str], table: list[OOCClass], source: str) -> HeadMap | None:
    """The `HeadMap` of a head whose outputs are the classes `names` (a run's, in head order): each an
    ILSVRC-2012 wnid, a class of `table` by folder, name or alias (its ILSVRC set), or an ILSVRC-2012
    class name (the short name first, then any other lemma, when it names one class). None for
    ILSVRC-2012's own 1000 wnids in their order. Names that map to nothing, or to several classes,
    are one error naming each, with the `--label-map` way out."""
    wnids = imagenet.wnids()
    if tuple(names) == wnids:
        return None
    index_of = imagenet.index_of()
    table_of = {_norm(k): c for c in table for k in (c.folder, c.name, *c.aliases)}
    short, lemma = _ilsvrc_names()
    mapped, unknown, ambiguous = [], [], []
    for name in names:
        key = _norm(name)
        found = ((index_of[name],) if name in index_of else tuple(table_of[key].ilsvrc_indices) if key in table_of
                 else short.get(key) or lemma.get(key) or ())
        if len(found) > 1 and key not in table_of:
            ambiguous.append(f"{name!r} names {len(found)} ILSVRC-2012 classes "
                             f"({', '.join(f'{wnids[i]} {imagenet.names()[i]}' for i in found)}): use its wnid")
        elif not found:
            unknown.append(repr(name))
        mapped.append(found)
    if unknown or ambiguous:
        problems = ([f"{', '.join(unknown)} map{'s' if len(unknown) == 1 else ''} to no ILSVRC-2012 class"]
                    if unknown else []) + ambiguous
        raise BitlabError(f"{source}: {'; '.join(problems)}. A class maps when it is named by an ILSVRC-2012 "
                          "wnid (n02123045), an ILSVRC-2012 class name (tabby) or a class of the class table by "
                          "folder, name or alias; else pass --label-map FILE (one ILSVRC-2012 wnid or '-' per "
                          f"output, {len(names)} lines in head order)")
    return HeadMap(tuple(names), tuple(mapped), source)


def _ilsvrc_names() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Normalised ILSVRC-2012 short names and all lemmas -> the indices they name."""
    short: dict[str, tuple[int, ...]] = {}
    lemma: dict[str, tuple[int, ...]] = {}
    for i, description in enumerate(imagenet.descriptions()):
        short[_norm(imagenet.names()[i])] = short.get(_norm(imagenet.names()[i]), ()) + (i,)
        for word in {_norm(w) for w in description.split(",") if w.strip()}:
            lemma[word] = lemma.get(word, ()) + (i,)
    return short, lemma


def head_from_label_map(path: str | Path) -> HeadMap:
    """The `HeadMap` of a `--label-map` file (`read_label_map`)."""
    ids = read_label_map(path)
    names = imagenet.wnids()
    return HeadMap(tuple(names[i] if i >= 0 else "-" for i in ids), tuple((int(i),) if i >= 0 else () for i in ids),
                   f"--label-map {path}")


# ----------------------------------------------------------------------------- scoring
def read_label_map(path: str | Path) -> np.ndarray:
    """Model output j -> ILSVRC-2012 index (-1: none), from a text file with one line per output:
    a wnid, a 0-based index, or '-' / empty for an output with no ILSVRC counterpart."""
    path = Path(path)
    if not path.is_file():
        raise BitlabError(f"{path}: label map not found")
    index_of = imagenet.index_of()
    out = []
    for n, line in enumerate(fileio.text_lines(path), start=1):
        v = line.split("#")[0].strip()
        if v in ("", "-"):
            out.append(-1)
        elif v in index_of:
            out.append(index_of[v])
        elif v.isdigit() and int(v) < imagenet.NUM_CLASSES:
            out.append(int(v))
        else:
            raise BitlabError(f"{path}: line {n}: {v!r} is neither an ILSVRC-2012 wnid nor an index 0..999")
    if not out:
        raise BitlabError(f"{path}: label map is empty")
    return np.asarray(out, dtype=np.int64)


def predictions_table(items: list[EvalItem], top_ids: np.ndarray, top_probs: np.ndarray,
                      target_prob: np.ndarray) -> pd.DataFrame:
    """One row per image: class, background, targets, top-k ILSVRC ids/names/probabilities
    (id -1: a model output with no ILSVRC class), correctness and the probability on the targets."""
    names = imagenet.names()
    k = top_ids.shape[1]
    df = pd.DataFrame({
        "image": [it.image for it in items],
        "class": [it.cls for it in items],
        "background": [it.background for it in items],
        "fg_uid": [it.fg_uid for it in items],
        "bg_uid": [it.bg_uid for it in items],
        "usual_context": [it.usual_context for it in items],
        "targets": [";".join(map(str, it.targets)) for it in items],
    })
    targets = [set(it.targets) for it in items]
    df["top1_correct"] = [int(ids[0]) in t for ids, t in zip(top_ids, targets)]
    df[f"top{k}_correct"] = [any(int(i) in t for i in ids) for ids, t in zip(top_ids, targets)]
    df["target_prob"] = target_prob.astype(np.float32)
    for j in range(k):
        df[f"top{j + 1}_id"] = top_ids[:, j]
        df[f"top{j + 1}_name"] = [names[i] if i >= 0 else "(no ILSVRC class)" for i in top_ids[:, j]]
        df[f"top{j + 1}_prob"] = top_probs[:, j]
    return df


def objects_of(df: pd.DataFrame) -> np.ndarray | None:
    """The foreground object of each row, the unit of resampling; None when the rows name none."""
    if "fg_uid" not in df or not (df["fg_uid"] != "").any():
        return None
    # a row without an object (an ImageNet photo beside composites) is a cluster of its own
    return np.where(df["fg_uid"] != "", df["fg_uid"], "row:" + df.index.astype(str)).astype(str)


def accuracy(df: pd.DataFrame, column: str = "top1_correct") -> stats.Estimate:
    """The share of `column` over `df`'s rows with its interval (clustered by foreground object)."""
    return stats.accuracy(df[column].to_numpy(bool), objects_of(df))


def accuracies(df: pd.DataFrame, k: int | None = None) -> dict:
    """n, top-1 and top-k (default: the table's) with their 95% intervals (`ci`: how each was made)."""
    k = k or topk_of(df)
    top1, topk = accuracy(df), accuracy(df, f"top{k}_correct")
    return {"n": int(len(df)), "top1": top1.value, f"top{k}": topk.value, "top1_ci": top1.interval,
            f"top{k}_ci": topk.interval, "ci": interval_method(top1)}


def interval_method(e: stats.Estimate) -> str:
    """How an interval was made, with the objects it resampled."""
    return e.method + (f", {e.clusters} objects" if e.clusters and "objects)" not in e.method else "")


def topk_of(df: pd.DataFrame) -> int:
    return max(int(c[3:-3]) for c in df.columns if re.fullmatch(r"top\d+_id", c))


def summarize(df: pd.DataFrame) -> dict:
    """Overall, per-class, per-background and per-foreground accuracies of a predictions table,
    with intervals, and the rankings that the intervals support."""
    k = topk_of(df)
    out = {**accuracies(df, k), "mean_target_prob": float(df["target_prob"].mean()),
           "per_class": {c: accuracies(g, k) for c, g in df.groupby("class", sort=True)}}
    out.update(ranking(df, "class", "hardest_classes", "no class"))
    if (df["background"] == IN_CONTEXT).any():
        out["in_context"] = accuracies(df[df["background"] == IN_CONTEXT], k)
        out["out_of_context"] = accuracies(df[~df["background"].isin(["", IN_CONTEXT])], k)
    ooc = df[df["background"] != ""]
    if "usual_context" in df and df["usual_context"].any():
        # Pairs like underwater/shark are not out of context: report the rest alone as well.
        away = ooc[(ooc["background"] != IN_CONTEXT) & ~ooc["usual_context"].astype(bool)]
        out["excluding_usual_context"] = accuracies(away, k)
    if len(ooc):
        out["per_background"] = {b: accuracies(g, k) for b, g in ooc.groupby("background", sort=True)}
        cells = ooc.pivot_table(index="class", columns="background", values="top1_correct", aggfunc=["mean", "size"])
        out["class_background_top1"] = {c: {b: float(v) for b, v in row.items() if not np.isnan(v)}
                                        for c, row in cells["mean"].iterrows()}
        out["class_background_n"] = {c: {b: int(v) for b, v in row.items() if not np.isnan(v)}
                                     for c, row in cells["size"].iterrows()}
        out.update(ranking(ooc[ooc["background"] != IN_CONTEXT], "background", "most_fooling_backgrounds",
                           "no background"))
        if (effect := background_effect(ooc)) is not None:
            out["background_effect"] = effect
    fg = df[df["fg_uid"] != ""]
    if len(fg):
        out["per_foreground"] = foreground_breakdown(fg)
    return out


def ranking(df: pd.DataFrame, by: str, key: str, nothing: str) -> dict:
    """`key`: the groups (classes, backgrounds) whose top-1 interval lies wholly below that of all
    other images pooled, lowest first, with the commonest wrong labels there; `key`_note says so
    when none is (`stats.separated`: a ranking claims only what the intervals support)."""
    if df.empty or df[by].nunique() < 2:
        return {key: [], f"{key}_note": f"fewer than two groups to rank by {by}"}
    own, rest = stats.by_group(df["top1_correct"].to_numpy(bool), df[by].to_numpy(), objects_of(df))
    rows = []
    for g in stats.separated(own, rest, "low"):
        wrong = df[(df[by] == g) & ~df["top1_correct"].astype(bool)]
        rows.append({by: g, "n": own[g].n, "top1": own[g].value, "top1_ci": own[g].interval,
                     "top1_error": 1 - own[g].value, "rest_top1": rest[g].value, "rest_top1_ci": rest[g].interval,
                     "wrong_predictions": [[name, int(n)] for name, n in wrong["top1_name"].value_counts().head(3).items()]})
    note = (f"{len(rows)} of {len(own)} separated from the rest by their 95% intervals" if rows else
            f"{nothing} is separated from the rest by its 95% interval (of {len(own)}; the intervals overlap)")
    return {key: rows, f"{key}_note": note}


def most_fooling_backgrounds(df: pd.DataFrame) -> list[dict]:
    """Backgrounds by top-1 error, worst first, with the wrong labels they pull predictions to
    (the paper's observation: ILSVRC models predict what fits the background) and each one's
    interval; `ranking` keeps only those the intervals separate."""
    rows = []
    for bg, g in df[df["background"] != IN_CONTEXT].groupby("background", sort=True):
        wrong = g[~g["top1_correct"]]
        est = accuracy(g)
        rows.append({"background": bg, "n": int(len(g)), "top1_error": float(1 - est.value),
                     "top1_error_ci": [None if v is None else 1 - v for v in est.interval[::-1]],
                     "wrong_predictions": [[name, int(n)] for name, n in
                                           wrong["top1_name"].value_counts().head(3).items()]})
    return sorted(rows, key=lambda r: (-r["top1_error"], r["background"]))


BACKGROUND_EFFECT_PERMUTATIONS = 2000  # p-values to about +-0.005 where it matters (near 0.05)


def background_effect(df: pd.DataFrame, permutations: int = BACKGROUND_EFFECT_PERMUTATIONS,
                      seed: int = 0) -> dict | None:
    """How much of the class x background top-1 table (the heat map) depends on the background.

    The table's variance splits into three shares (eta squared, sums of squares over the total):
    `class` (rows: what a class-only model would explain, the heat map as horizontal stripes),
    `background` (columns: backgrounds that fool every class alike) and `class_x_background`
    (the rest: a background that fools some classes only, e.g. a whale for sea animals on the
    ocean). Every object is the same on every background, so all that is not `class` is the
    background's doing: `background_dependent` = 1 - `class`. `p_value` tests the shared
    `background` share: each class's cells shuffled over the backgrounds `permutations` times
    (seeded), how often chance gives as much. None when a cell is empty or nothing varies."""
    ooc = df[~df["background"].isin(["", IN_CONTEXT])]
    if ooc.empty:
        return None
    table = ooc.pivot_table(index="class", columns="background", values="top1_correct", aggfunc="mean")
    a = table.to_numpy(float)
    if np.isnan(a).any() or min(a.shape) < 2 or a.var() == 0:
        return None
    total = ((a - a.mean()) ** 2).sum()
    background = a.shape[0] * ((a.mean(0) - a.mean()) ** 2).sum() / total
    cls = a.shape[1] * ((a.mean(1) - a.mean()) ** 2).sum() / total
    # Shuffling within rows keeps each class's mean (and the total): only the column means move.
    shuffled = np.random.default_rng(seed).permuted(np.broadcast_to(a, (permutations, *a.shape)), axis=2)
    null = a.shape[0] * ((shuffled.mean(axis=1) - a.mean()) ** 2).sum(axis=1) / total
    return {"class": float(cls), "background": float(background), "class_x_background": float(1 - cls - background),
            "background_dependent": float(1 - cls),
            "p_value": float((1 + (null >= background - 1e-12).sum()) / (1 + permutations)),
            "permutations": permutations, "classes": int(a.shape[0]), "backgrounds": int(a.shape[1])}


def foreground_breakdown(df: pd.DataFrame) -> dict:
    """Per foreground object: on how many of its backgrounds the top-1 is wrong (with the Wilson
    interval of that share: given the object, its backgrounds are independent draws)."""
    per = {}
    for uid, g in df.groupby("fg_uid", sort=True):
        wrong = g[~g["top1_correct"]]
        share = stats.wilson(len(wrong), len(g))
        per[uid] = {"class": str(g["class"].iloc[0]), "n": int(len(g)), "fooled": int(len(wrong)),
                    "fooled_ci": share.interval, "fooling_backgrounds": sorted(wrong["background"].unique().tolist())}
    mean = stats.mean_over_objects(np.array([v["fooled"] / v["n"] for v in per.values()]))
    return {"count": len(per), "fooled_by_any": int(sum(v["fooled"] > 0 for v in per.values())),
            "fooled_by_all": int(sum(v["fooled"] == v["n"] for v in per.values())),
            "mean_fooled_fraction": mean.value, "mean_fooled_fraction_ci": mean.interval, "objects": per}
