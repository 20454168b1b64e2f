"""Labelled image sets: image folders, CSVs, make-ooc output, few-shot subsets (batches: `loader`).

Sources (`load_splits`): an ImageFolder tree `DIR/train/<class>/*.jpg` with `DIR/val/` (or
`validation/`, then `test/`); a folder of class folders `DIR/<class>/*` (one split); make-ooc output
(`DIR/manifest.csv`: `file`, `class`, ...; one split); a CSV `path,label` (paths relative to it)
with an optional `split` column (train, val or validation, test); `builtin:digits`, scikit-learn's
1,797 real 8x8 handwritten digits (10 classes) written once as an ImageFolder tree (offline).
"""
from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import cv2
import numpy as np

from bitlab.data.transforms import BadImageError
from bitlab.errors import BitlabError, ConfigError
from bitlab.paths import cache_dir

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})
VAL_SPLIT_NAMES = ("val", "validation", "test")
# The `split` values a CSV or JSON-lines file may use, and the split each one means.
SPLIT_VALUES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
MAX_LISTED = 20  # problems listed by name in one error; the rest are counted
BUILTIN = ("digits",)


class Packed:
    """Variable-length items end to end in one numpy array, with each item's end offset: indexed
    like a sequence, without one Python object per item (see `PackedPaths`)."""

    _ends: np.ndarray

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):  # an index -> the item (`_item`); a slice -> the same kind of sequence
        if isinstance(i, slice):
            return type(self)([self[j] for j in range(*i.indices(len(self)))])
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        return self._item(int(self._ends[i - 1]) if i else 0, int(self._ends[i]))

    def _item(self, start: int, end: int):
        raise NotImplementedError


class PackedPaths(Packed, Sequence[Path]):
    """File paths as two numpy arrays (their UTF-8 bytes end to end, and offsets), not a list of
    objects. DataLoader workers are forked: indexing a list of Paths updates each object's
    reference count (and the garbage collector walks them), so a worker copies the parent's list:
    511 MiB per worker for ImageNet-1k's 1.28 M paths, against 7.7 MiB with these arrays, whose
    pages stay shared (benchmarks/loader_memory.py)."""

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        if isinstance(paths, PackedPaths):
            self._bytes, self._ends = paths._bytes, paths._ends
            return
        encoded = [os.fsencode(p) for p in paths]
        self._ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
        self._bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def _item(self, start: int, end: int) -> Path:
        return Path(os.fsdecode(self._bytes[start:end].tobytes()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(
            a == Path(b) for a, b in zip(self, other))

    def __add__(self, other: Sequence) -> list[Path]:  # as a list of paths would
        return [*self, *other]

    def __repr__(self) -> str:
        return f"PackedPaths({len(self)} paths)"


@dataclass
class ImageSet:
    """Image files with integer labels into `classes` (the label of `paths[i]` is `labels[i]`)."""

    paths: Sequence[Path]  # kept as PackedPaths
    labels: np.ndarray
    classes: list[str]
    source: str = ""
    multi_label: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.paths = PackedPaths(self.paths)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise ValueError("paths and labels differ in length")

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageSet":
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet([self.paths[i] for i in idx], self.labels[idx], self.classes, self.source)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classes))

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[Path, str]], source: str,
                   classes: Sequence[str] | None = None) -> "ImageSet":
        classes = list(classes) if classes is not None else sorted({c for _, c in pairs})
        index = {c: i for i, c in enumerate(classes)}
        return cls([p for p, _ in pairs], np.array([index[c] for _, c in pairs], dtype=np.int64), classes, source)


@dataclass
class Splits:
    """Training and validation sets (pre-training's may also be multi-label or shard sets, and
    have no validation set), and notes on how they were chosen."""

    train: ImageSet
    val: ImageSet | None
    notes: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return list(self.train.classes)

    @property
    def multi_label(self) -> bool:
        return self.train.multi_label


# ----------------------------------------------------------------------------- sources
def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def image_folder(root: str | os.PathLike) -> ImageSet:
    """`root/<class>/**/<image>`: classes are the sorted sub-folder names; files sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise BitlabError(f"{root}: no such folder")
    pairs = []
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        found = [(p, class_dir.name) for p in sorted(class_dir.rglob("*")) if _is_image(p)]
        if not found:  # not a class: said, since a class lost in a copy would otherwise vanish unnoticed
            log.warning("%s: no images in class folder %r; left out of the classes", root, class_dir.name)
        pairs += found
    if not pairs:
        raise BitlabError(f"{root}: no images found in class sub-folders (expected {root}/<class>/<image>)")
    return ImageSet.from_pairs(pairs, str(root))


def read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str | None]]]]:
    """The column names and the (line, row) pairs of a UTF-8 CSV with a header: names and keys stripped
    alike (` path , label ` works), an Excel byte-order mark dropped, `line` the row's line in the
    file (blank lines skipped), a cell missing from a short row None."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, {(k or "").strip(): v for k, v in row.items()}) for row in reader]
            return [c.strip() for c in reader.fieldnames or []], rows
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BitlabError(f"{path}: unreadable CSV ({e})") from None


def _pick_column(path: Path, columns: list[str], wanted: Sequence[str], what: str) -> str:
    for name in wanted:
        if name in columns:
            return name
    raise BitlabError(f"{path}: no {what} column (expected one of {', '.join(wanted)}; "
                      f"found {', '.join(columns) or 'none'})")


def parse_split(path: Path, line: int, value: object) -> str:
    """A `split` cell -> 'train', 'val' or 'test' ('validation' is 'val'); blank -> 'all'.
    Any other value is an error: a misspelt split would otherwise drop its rows silently."""
    text = "" if value is None else str(value).strip().lower()
    if not text:
        return "all"
    if text not in SPLIT_VALUES:
        raise BitlabError(f"{path}, line {line}: unknown split {value!r} (expected train, val, validation or test)")
    return SPLIT_VALUES[text]


def check_splits(path: Path, rows: Sequence[tuple[int, str]]) -> None:
    """Rows without a split are the training data ('all') unless other rows say 'train': then they
    would belong to no split and be dropped, so that is an error naming the first of them."""
    blank = next((line for line, split in rows if split == "all"), None)
    if blank is not None and any(split == "train" for _, split in rows):
        raise BitlabError(f"{path}, line {blank}: empty 'split' while other rows say 'train' "
                          "(use train, val or test)")


def check_files_exist(source: Path, files: Sequence[tuple[int, Path]]) -> None:
    """Refuse listed image files that are not there, naming each one's line (the first
    MAX_LISTED, then a count): found at load time rather than at the step that first draws them.
    One stat per file, no open: for a generated CSV of 100k rows the stats took 0.26 s here (local
    disk, warm cache; reading the whole CSV 1.7 s), so ImageNet's 1.3 M take a few seconds (more on
    a cold network file system)."""
    missing = [(line, file) for line, file in files if not os.path.isfile(file)]
    if not missing:
        return
    listed = [f"{source}, line {line}: file {file} not found" for line, file in missing[:MAX_LISTED]]
    more = [f"... and {len(missing) - MAX_LISTED} more"] if len(missing) > MAX_LISTED else []
    raise BitlabError(f"{len(missing)} of the {len(files)} files listed in {source} not found:\n"
                      + "\n".join(listed + more))


def labelled_csv(path: str | os.PathLike, *, path_columns: Sequence[str] = ("path", "file", "filename"),
                 label_columns: Sequence[str] = ("label", "class", "fg_class")) -> dict[str, ImageSet]:
    """A CSV of image paths (relative to it, or absolute; every file must exist) and labels -> {split:
    ImageSet}, split 'all' without a `split` column. Plain CSVs and make-ooc's `manifest.csv`."""
    path = Path(path)
    columns, rows = read_csv_rows(path)
    pcol = _pick_column(path, columns, path_columns, "image path")
    lcol = _pick_column(path, columns, label_columns, "label")
    entries = []
    for line, row in rows:
        file, label = (row.get(pcol) or "").strip(), (row.get(lcol) or "").strip()
        if not file or not label:
            raise BitlabError(f"{path}, line {line}: empty {pcol if not file else lcol!r}")
        entries.append((line, path.parent / file, label, parse_split(path, line, row.get("split"))))
    if not entries:
        raise BitlabError(f"{path}: no rows")
    check_splits(path, [(line, split) for line, _, _, split in entries])
    check_files_exist(path, [(line, file) for line, file, _, _ in entries])
    by_split: dict[str, list[tuple[Path, str]]] = {}
    for _, file, label, split in entries:
        by_split.setdefault(split, []).append((file, label))
    classes = sorted({label for _, _, label, _ in entries})
    return {s: ImageSet.from_pairs(p, f"{path} [{s}]", classes) for s, p in by_split.items()}


def builtin_root() -> Path:
    """Where built-in datasets are written: $BITLAB_DATA, else `datasets/` in bitlab's cache (`paths.cache_dir`)."""
    return Path(os.environ.get("BITLAB_DATA") or cache_dir() / "datasets")


def write_digits(root: str | os.PathLike, val_per_class: int = 36) -> Path:
    """scikit-learn's handwritten digits (UCI, 1,797 real 8x8 scans, 10 classes) as an ImageFolder
    tree `root/digits/{train,val}/<digit>/<n>.png`: 8x8 greyscale PNGs scaled from 0-16 to 0-255,
    `val_per_class` of each digit held out (fixed seed, so the split never changes)."""
    dest = Path(root) / "digits"
    if (dest / ".complete").exists():
        return dest
    from sklearn.datasets import load_digits  # here: 2 s to import, for a tree written once

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(0)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits.", dir=dest.parent))
    try:
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(digits.target == c))
            for split, part in (("val", idx[:val_per_class]), ("train", idx[val_per_class:])):
                folder = tmp / split / str(c)
                folder.mkdir(parents=True, exist_ok=True)
                for i in part:
                    cv2.imwrite(str(folder / f"{i:04d}.png"), images[i])
        (tmp / ".complete").write_text("sklearn.datasets.load_digits\n")
        publish_tree(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def publish_tree(tmp: Path, dest: Path) -> None:
    """Move the finished tree `tmp` (holding `.complete`) to `dest`, unless another process finished
    the same tree there first (then `tmp` is dropped: `dest` may be in use by now, e.g. by few-shot
    runs side by side that each resolved `builtin:digits`). A `dest` without `.complete` is a partial
    tree from an interrupted older write, replaced."""
    try:
        os.rename(tmp, dest)  # atomic; refuses a non-empty `dest`
        return
    except OSError:
        if (dest / ".complete").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def _resolve_builtin(spec: str) -> Path:
    name = spec.split(":", 1)[1]
    if name not in BUILTIN:
        raise BitlabError(f"unknown built-in dataset {name!r} (available: {', '.join(BUILTIN)})")
    return write_digits(builtin_root())


def load_source(spec: str | os.PathLike) -> dict[str, ImageSet]:
    """Any supported source -> {split name: ImageSet}; 'all' marks a source without splits."""
    if str(spec).startswith("builtin:"):
        spec = _resolve_builtin(str(spec))
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise BitlabError(f"{path}: a data file must be a CSV (path,label[,split])")
        return labelled_csv(path)
    if not path.is_dir():
        raise BitlabError(f"{path}: no such dataset folder or CSV file")
    if (path / "train").is_dir():
        splits = {"train": image_folder(path / "train")}
        for name in VAL_SPLIT_NAMES:
            if (path / name).is_dir():
                splits[name] = image_folder(path / name)
        return splits
    if (path / "manifest.csv").is_file():  # make-ooc output
        return labelled_csv(path / "manifest.csv")
    return {"all": image_folder(path)}


def stratified_holdout(images: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Hold out `fraction` of every class (at least one image, never all of a class), seeded."""
    if not 0 < fraction < 1:
        raise ConfigError("val_fraction", f"must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in range(len(images.classes)):
        idx = rng.permutation(np.flatnonzero(images.labels == c))
        if len(idx) < 2:
            raise BitlabError(f"{images.source}: class {images.classes[c]!r} has {len(idx)} image(s); "
                              "a validation hold-out needs at least 2 per class")
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        val_idx += idx[:k].tolist()
        train_idx += idx[k:].tolist()
    return images.subset(sorted(train_idx)), images.subset(sorted(val_idx))


def align_classes(train: ImageSet, val: ImageSet) -> ImageSet:
    """`val` relabelled into the training classes; every class must appear on both sides."""
    unknown = sorted(set(val.classes[i] for i in np.unique(val.labels)) - set(train.classes))
    if unknown:
        raise BitlabError(f"{val.source}: class(es) {', '.join(map(repr, unknown[:5]))} are not in the training "
                          f"set {train.source}")
    remap = np.array([train.classes.index(c) if c in train.classes else -1 for c in val.classes], dtype=np.int64)
    aligned = ImageSet(val.paths, remap[val.labels], train.classes, val.source)
    missing = [train.classes[c] for c in np.flatnonzero(aligned.class_counts() == 0)]
    if missing:
        raise BitlabError(f"{val.source}: no validation images for class(es) {', '.join(map(repr, missing[:5]))}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                          + f" of the training set {train.source}")
    empty = [train.classes[c] for c in np.flatnonzero(train.class_counts() == 0)]
    if empty:
        raise BitlabError(f"{train.source}: no training images for class(es) {', '.join(map(repr, empty[:5]))}")
    return aligned


def validation_leak(train: ImageSet, val: ImageSet) -> str | None:
    """A warning when files are in both sets (by absolute path): their validation scores are not
    held out. None when the sets are apart."""
    shared = sorted({os.path.abspath(p) for p in train.paths} & {os.path.abspath(p) for p in val.paths})
    if not shared:
        return None
    shown = ", ".join(shared[:3]) + (f" and {len(shared) - 3} more" if len(shared) > 3 else "")
    return (f"validation leak: {len(shared)} file(s) of {val.source} are also training images ({shown}); "
            "validation scores on them are not held out")


def split_off_validation(splits: dict, data: str | os.PathLike, *, open_source: Callable[[Any], dict] | None = None,
                         val_data: Any = None, val_split: str | None = None, val_fraction: float = 0.0, seed: int = 0,
                         holdout: Callable | None = None) -> tuple[Any, Any | None, list[str]]:
    """(training set, validation set or None, notes) of `splits` ({split: set}). Validation from, in
    order: `val_data` (by `open_source`; its `val_split`, else val, validation, test or all); the
    source's `val_split` (else val, validation, test); a `val_fraction` `holdout` (stratified)."""
    train = splits.get("train") or splits.get("all")
    if train is None:
        raise BitlabError(f"{data}: no training split (found: {', '.join(sorted(splits))}); "
                          "a CSV's split column must use 'train' and 'val'/'test'")
    if val_data is not None:
        other = (open_source or load_source)(val_data)
        pick = val_split or next((n for n in (*VAL_SPLIT_NAMES, "all") if n in other), None)
        if pick not in other:
            raise BitlabError(f"{val_data}: no {'validation' if pick is None else repr(pick)} split "
                              f"(found: {', '.join(sorted(other))})")
        return train, other[pick], []
    if val_split is not None:
        # a CSV's 'validation' rows are its 'val' split
        name = val_split if val_split in splits else SPLIT_VALUES.get(val_split.lower(), val_split)
        if name not in splits:
            raise BitlabError(f"{data}: no {val_split!r} split (found: {', '.join(sorted(splits))})")
        return train, splits[name], []
    if found := next((n for n in VAL_SPLIT_NAMES if n in splits), None):
        return train, splits[found], []
    if val_fraction <= 0:
        return train, None, []
    train, val = (holdout or stratified_holdout)(train, val_fraction, seed)
    return train, val, [f"validation: {len(val)} images held out of {data} ({val_fraction:.0%}, seed {seed})"]


def load_splits(data: str | os.PathLike, *, val_data: str | os.PathLike | None = None,
                val_split: str | None = None, val_fraction: float = 0.0, seed: int = 0) -> Splits:
    """Training and validation sets from `data` (see the module doc), with classes aligned; the
    validation set as `split_off_validation` finds it, which must find one."""
    splits = load_source(data)
    train, val, notes = split_off_validation(splits, data, val_data=val_data, val_split=val_split,
                                             val_fraction=val_fraction, seed=seed)
    if val is None:
        raise BitlabError(f"{data}: no validation split (expected a val/ or test/ folder, or a 'split' column "
                          f"with val/test rows; found: {', '.join(sorted(splits))}). Add one, pass --val-data, "
                          "or hold out part of the training data with --val-fraction 0.1")
    return Splits(train, align_classes(train, val), notes)


def few_shot(images: ImageSet, k: int, seed: int) -> ImageSet:
    """K examples of every class, without replacement, reproducibly from `seed`.

    The official PyTorch `fewshot.py` used the unseeded global RNGs (runs not reproducible); this
    follows the TF/JAX pipeline instead: per class, `choice(k, replace=False)` from a seeded
    generator, over the files in their stable (sorted) order.
    """
    if k <= 0:
        raise ConfigError("examples_per_class", f"must be positive, got {k}")
    rng = np.random.default_rng(seed)
    picked = []
    for c, name in enumerate(images.classes):
        idx = np.flatnonzero(images.labels == c)
        if len(idx) < k:
            raise ConfigError("examples_per_class", f"{images.source}: class {name!r} has {len(idx)} training "
                              f"image(s), fewer than {{setting}} {k}")
        picked += sorted(rng.choice(idx, size=k, replace=False).tolist())
    return images.subset(picked)


def typical_image_size(images: ImageSet, sample: int = 256, seed: int = 0) -> tuple[int, int]:
    """Median (H, W) over up to `sample` files (headers only): what BiT-HyperRule's resolution
    choice looks at. Unreadable files are left out (the training pass reports them)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    idx = rng.choice(len(images), size=min(sample, len(images)), replace=False)
    sizes = []
    for i in idx:
        try:
            with Image.open(images.paths[i]) as im:
                sizes.append(im.size[::-1])
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    if not sizes:
        raise BadImageError(f"{images.source}: none of {len(idx)} sampled images could be read")
    h, w = np.median(np.array(sizes), axis=0)
    return int(h), int(w)
