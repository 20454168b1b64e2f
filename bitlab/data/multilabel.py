"""Multi-label image sets (ImageNet-21k / JFT style: any number of labels per image).

Two file forms, paths relative to the file's folder (absolute paths are kept), every listed file
checked to exist when it is read (each missing one named with its line):
- CSV with a header: an image path column (`path`, `file` or `filename`), a `labels` (or `tags`)
  column (labels separated by whitespace, or `label_sep`), an optional `split` column (train, val
  or validation, test). An empty labels cell (`a.jpg,,train`) is an image with no positive label;
  a row without the cell (`a.jpg`) is an error.
- JSON lines: `{"path": "a.jpg", "labels": ["cat", "dog"], "split": "train"}` (`[]`: no label).

Classes are the sorted union of the labels unless a class list fixes them (`read_classes`: one
name per line, e.g. ImageNet-21k's 21,843), when an unknown label is an error naming its line.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from bitlab.data.datasets import (ImageSet, Packed, PackedPaths, check_files_exist, check_splits, load_source,
                                  parse_split, read_csv_rows)
from bitlab.errors import BitlabError, ConfigError

PATH_COLUMNS = ("path", "file", "filename")
LABEL_COLUMNS = ("labels", "tags")
MULTILABEL_SUFFIXES = (".jsonl", ".ndjson")


class PackedLabels(Packed, Sequence[np.ndarray]):
    """Each image's class indices as one flat int64 array and offsets (CSR), not one small array
    object per image: shared by forked DataLoader workers as `PackedPaths` is (14 M objects for
    ImageNet-21k would be copied into every worker)."""

    def __init__(self, labels: Sequence[Sequence[int]]) -> None:
        if isinstance(labels, PackedLabels):
            self.flat, self._ends = labels.flat, labels._ends
            return
        arrays = [np.asarray(x, dtype=np.int64).reshape(-1) for x in labels]
        self._ends = np.cumsum([len(a) for a in arrays], dtype=np.int64)
        self.flat = np.concatenate(arrays) if arrays else np.empty(0, np.int64)

    def _item(self, start: int, end: int) -> np.ndarray:  # a read-only view into the shared array
        view = self.flat[start:end]
        view.flags.writeable = False
        return view


@dataclass
class MultiLabelSet:
    """Image files with sets of labels: `labels[i]` are the class indices (into `classes`) of `paths[i]`."""

    paths: Sequence[Path]  # kept as PackedPaths
    labels: Sequence[np.ndarray]  # kept as PackedLabels
    classes: list[str]
    source: str = ""
    multi_label: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError("paths and labels differ in length")
        self.paths, self.labels = PackedPaths(self.paths), PackedLabels(self.labels)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "MultiLabelSet":
        return MultiLabelSet([self.paths[i] for i in indices], [self.labels[i] for i in indices], self.classes,
                             self.source)

    def label_counts(self) -> np.ndarray:
        """Images per class."""
        return np.bincount(self.labels.flat, minlength=len(self.classes))

    def multi_hot(self, i: int) -> np.ndarray:
        """uint8 vector of length `len(classes)`, 1 at the labels of image `i`."""
        out = np.zeros(len(self.classes), dtype=np.uint8)
        out[self.labels[i]] = 1
        return out


def read_classes(path: str | os.PathLike) -> list[str]:
    """A class list: one name per line (blank lines ignored); names must be unique."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise BitlabError(f"{path}: unreadable class list ({e})") from None
    if not names:
        raise BitlabError(f"{path}: empty class list")
    seen: set[str] = set()
    for n, name in enumerate(names, start=1):
        if name in seen:
            raise BitlabError(f"{path}: class {name!r} listed twice (second time at entry {n})")
        seen.add(name)
    return names


def is_multilabel_file(path: str | os.PathLike) -> bool:
    """A JSON-lines file, or a CSV whose header has a `labels`/`tags` column."""
    path = Path(path)
    if path.suffix.lower() in MULTILABEL_SUFFIXES:
        return True
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return any(c.strip() in LABEL_COLUMNS for c in header)


def read_multilabel(path: str | os.PathLike, *, label_sep: str | None = None,
                    classes: Sequence[str] | None = None) -> dict[str, MultiLabelSet]:
    """A multi-label CSV or JSON-lines file -> {split: MultiLabelSet} ('all' without a split field)."""
    path = Path(path)
    if not path.is_file():
        raise BitlabError(f"{path}: no such file")
    rows = _jsonl_rows(path) if path.suffix.lower() in MULTILABEL_SUFFIXES else _csv_rows(path, label_sep)
    if not rows:
        raise BitlabError(f"{path}: no rows")
    if classes is None:
        classes = sorted({name for _, _, names, _ in rows for name in names})
    index = {c: i for i, c in enumerate(classes)}
    for line, _, names, _ in rows:
        unknown = [n for n in names if n not in index]
        if unknown:
            raise BitlabError(f"{path}, line {line}: label {unknown[0]!r} is not in the class list")
    check_splits(path, [(line, split) for line, _, _, split in rows])
    files = [(line, path.parent / file) for line, file, _, _ in rows]  # an absolute `file` stays as it is
    check_files_exist(path, files)
    by_split: dict[str, tuple[list[Path], list[np.ndarray]]] = {}
    for (line, file), (_, _, names, split) in zip(files, rows):
        paths, labels = by_split.setdefault(split, ([], []))
        paths.append(file)
        labels.append(np.array(sorted({index[n] for n in names}), dtype=np.int64))
    return {s: MultiLabelSet(p, lab, list(classes), f"{path} [{s}]") for s, (p, lab) in by_split.items()}


def _csv_rows(path: Path, label_sep: str | None) -> list[tuple[int, str, list[str], str]]:
    columns, raw = read_csv_rows(path)
    pcol = next((c for c in PATH_COLUMNS if c in columns), None)
    lcol = next((c for c in LABEL_COLUMNS if c in columns), None)
    if pcol is None or lcol is None:
        missing = "image path" if pcol is None else "labels"
        wanted = PATH_COLUMNS if pcol is None else LABEL_COLUMNS
        raise BitlabError(f"{path}: no {missing} column (expected one of {', '.join(wanted)}; "
                          f"found {', '.join(columns) or 'none'})")
    rows = []
    for line, row in raw:
        file = (row.get(pcol) or "").strip()
        if not file:
            raise BitlabError(f"{path}, line {line}: empty {pcol!r}")
        cell = row.get(lcol)
        if cell is None:  # a short row: a truncated export, not a deliberate "no labels" (that is an empty cell)
            raise BitlabError(f"{path}, line {line}: no {lcol!r} cell (the row is shorter than the header; "
                              "an image without labels needs an empty cell)")
        names = [n.strip() for n in (cell.split(label_sep) if label_sep else cell.split()) if n.strip()]
        rows.append((line, file, names, parse_split(path, line, row.get("split"))))
    return rows


def _jsonl_rows(path: Path) -> list[tuple[int, str, list[str], str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BitlabError(f"{path}: unreadable file ({e})") from None
    rows = []
    for line, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise BitlabError(f"{path}, line {line}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise BitlabError(f"{path}, line {line}: expected an object with 'path' and 'labels'")
        file = next((obj[k] for k in PATH_COLUMNS if k in obj), None)
        if not isinstance(file, str) or not file.strip():
            raise BitlabError(f"{path}, line {line}: missing or empty 'path'")
        names = obj.get("labels", obj.get("tags"))
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
            raise BitlabError(f"{path}, line {line}: 'labels' must be a list of class names")
        rows.append((line, file.strip(), [str(n) for n in names], parse_split(path, line, obj.get("split"))))
    return rows


def random_holdout(images: MultiLabelSet, fraction: float, seed: int) -> tuple[MultiLabelSet, MultiLabelSet]:
    """Hold out `fraction` of the images at random (seeded; at least one on each side)."""
    if not 0 < fraction < 1:
        raise ConfigError("val_fraction", f"must be in (0, 1), got {fraction}")
    if len(images) < 2:
        raise BitlabError(f"{images.source}: a validation hold-out needs at least 2 images")
    perm = np.random.default_rng(seed).permutation(len(images))
    k = min(len(images) - 1, max(1, round(fraction * len(images))))
    return images.subset(sorted(perm[k:])), images.subset(sorted(perm[:k]))


def load_labelled(spec: str | os.PathLike, *, label_sep: str | None = None,
                  classes: Sequence[str] | None = None) -> dict[str, ImageSet | MultiLabelSet]:
    """Any labelled image source -> {split: set}: a multi-label CSV / JSON-lines file gives
    `MultiLabelSet`s, everything `datasets.load_source` reads gives single-label `ImageSet`s.

    All splits share one class list: `classes` when given, else the training split's (`train`,
    else `all`); a label outside it is an error naming the split.
    """
    if Path(str(spec)).is_file() and is_multilabel_file(spec):
        return read_multilabel(spec, label_sep=label_sep, classes=classes)
    splits = load_source(spec)
    reference = list(classes) if classes is not None else (splits.get("train") or splits.get("all")
                                                           or next(iter(splits.values()))).classes
    return {name: relabel(s, reference) for name, s in splits.items()}


def relabel(images: ImageSet, classes: Sequence[str]) -> ImageSet:
    """`images` with its labels re-indexed into `classes` (every class of `images` must be there)."""
    if list(images.classes) == list(classes):
        return images
    index = {c: i for i, c in enumerate(classes)}
    used = {images.classes[i] for i in np.unique(images.labels)}
    unknown = sorted(used - set(index))
    if unknown:
        raise BitlabError(f"{images.source}: class(es) {', '.join(map(repr, unknown[:5]))} are not among the "
                          f"{len(classes)} training classes")
    remap = np.array([index.get(c, -1) for c in images.classes], dtype=np.int64)
    return ImageSet(images.paths, remap[images.labels], list(classes), images.source)
