"""The OOC dataset's specification files, read and written in one place.

- `classes.csv`: OpenImages class -> output folder -> ILSVRC-2012 wnids and 0-based indices.
- `backgrounds.csv` (in `ooc_dataset/`): background categories and their search terms.
- `<backgrounds root>/backgrounds.csv`: one row per background file, with licence and provenance.
- `selection.csv`: the exact foregrounds and background files a build uses, pinned by sha256.

Every loader validates, and every error names the file, the line and the field. Lines are
counted as an editor shows them (the header is line 1).
"""
from __future__ import annotations

import csv
import io as _io
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Sequence

from bitlab import fileio
from bitlab.errors import BitlabError

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")  # one path component, no surprises
MID = re.compile(r"^/[mg]/[0-9a-z_]+$")
WNID = re.compile(r"^n\d{8}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")


class SpecError(BitlabError):
    """A specification file is missing, malformed or inconsistent."""


# ----------------------------------------------------------------------------- CSV tables
def read_table(path: str | os.PathLike, required: Sequence[str], optional: Sequence[str] = ()
               ) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield `(line, row)` for each data row of a UTF-8 CSV with a header, values stripped.

    `line` is where the row starts. Raises `SpecError` naming the file (missing file, missing
    columns) or the line (a byte that is not UTF-8, a quote that is never closed, a row with more
    values than the header). A BOM is accepted. Columns outside `required + optional` are kept.
    """
    path = Path(path)
    try:
        rows = _csv_rows(path, fileio.text_lines(path))
    except (FileNotFoundError, IsADirectoryError):
        raise SpecError(f"{path}: no such file") from None
    first = next(rows, None)
    header = [h.strip() for h in first[1]] if first else []
    if not any(header):
        raise SpecError(f"{path}: empty file (expected a header with {', '.join(required)})")
    missing = [c for c in required if c not in header]
    if missing:
        raise SpecError(f"{path}: missing column(s) {', '.join(missing)} (header: {', '.join(header)})")
    for line, values in rows:
        if not values:  # a blank line
            continue
        if len(values) > len(header):
            raise SpecError(f"{path} line {line}: {len(values)} values but the header has {len(header)} columns")
        yield line, {k: (values[i] if i < len(values) else "").strip() for i, k in enumerate(header)}


def _csv_rows(path: Path, lines: Iterator[str]) -> Iterator[tuple[int, list[str]]]:
    """(first line, values) of each CSV record; malformed quoting is an error naming the line."""
    reader = csv.reader(lines, strict=True)
    done = 0  # lines consumed by the records so far
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise SpecError(f"{path} line {done + 1}: a quoted field opens on this line and is never closed "
                                "(an unmatched \")") from None
            raise SpecError(f"{path} line {done + 1}: malformed CSV ({e})") from None
        yield done + 1, values
        done = reader.line_num


def table_text(columns: Sequence[str], rows: Iterable[dict]) -> str:
    """CSV text with a header; '\\n' line ends so that files are byte-identical on every OS."""
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _cell(row.get(c, "")) for c in columns})
    return buf.getvalue()


def write_table(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[dict]) -> None:
    fileio.write_text(path, table_text(columns, rows))


def _cell(value) -> str:
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return "" if value is None else str(value)


def _need(path: Path, line: int, row: dict, name: str) -> str:
    value = row.get(name, "")
    if not value:
        raise SpecError(f"{path} line {line}: field '{name}' is empty")
    return value


def _check(ok: bool, path: Path, line: int, message: str) -> None:
    if not ok:
        raise SpecError(f"{path} line {line}: {message}")


def _split_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(";") if v.strip())


def safe_relative(path: Path, line: int, field: str, value: str) -> str:
    """A relative POSIX path that stays inside its root (no '..', not absolute)."""
    p = PurePosixPath(value)
    _check(bool(value) and not p.is_absolute() and ".." not in p.parts and "\\" not in value
           and ":" not in value, path, line,
           f"field '{field}' must be a relative path inside its folder, got {value!r}")
    return str(p)


# ----------------------------------------------------------------------------- classes.csv
CLASS_COLUMNS = ("name", "folder", "mid", "ilsvrc_wnids", "ilsvrc_indices", "n_foregrounds", "ilsvrc_names", "aliases",
                 "notes")


@dataclass(frozen=True)
class OOCClass:
    """One foreground class: an OpenImages class and the ILSVRC-2012 classes that count as right."""

    name: str  # OpenImages display name, e.g. "Zebra"
    folder: str  # output class folder
    mid: str  # OpenImages MID, e.g. "/m/0898b"
    ilsvrc_wnids: tuple[str, ...]
    ilsvrc_indices: tuple[int, ...]  # 0-based, sorted-wnid order (bitlab.data.imagenet.index_of)
    n_foregrounds: int | None = None  # how many foregrounds `make-ooc plan` picks (None: use --per-class)
    line: int = field(default=0, compare=False)  # where it was read, for messages
    aliases: tuple[str, ...] = ()  # other names a class folder may have (the paper's "Sofa" for Couch)

    @property
    def where(self) -> str:
        return f"line {self.line}" if self.line else "(not from a file)"


def load_classes(path: str | os.PathLike) -> list[OOCClass]:
    """Read and validate a class table: unique names, folders and MIDs; every wnid an ILSVRC-2012
    class whose index matches `ilsvrc_indices`."""
    from bitlab.data.imagenet import index_of

    path = Path(path)
    index = index_of()
    classes: list[OOCClass] = []
    seen: dict[str, dict[str, int]] = {"name": {}, "folder": {}, "mid": {}}
    for line, row in read_table(path, ("name", "folder", "mid", "ilsvrc_wnids", "ilsvrc_indices")):
        name, folder, mid = (_need(path, line, row, k) for k in ("name", "folder", "mid"))
        _check(bool(SAFE_NAME.match(folder)), path, line,
               f"field 'folder' must be a plain folder name (letters, digits, _ . -), got {folder!r}")
        _check(bool(MID.match(mid)), path, line, f"field 'mid' must look like /m/0abc12, got {mid!r}")
        wnids = _split_list(_need(path, line, row, "ilsvrc_wnids"))
        raw_idx = _split_list(_need(path, line, row, "ilsvrc_indices"))
        for w in wnids:
            _check(bool(WNID.match(w)) and w in index, path, line,
                   f"field 'ilsvrc_wnids': {w!r} is not an ILSVRC-2012 wnid")
        _check(len(set(wnids)) == len(wnids), path, line, "field 'ilsvrc_wnids' repeats a wnid")
        _check(all(re.fullmatch(r"\d+", i) for i in raw_idx), path, line,
               f"field 'ilsvrc_indices' must be ';'-separated integers, got {row['ilsvrc_indices']!r}")
        indices = tuple(int(i) for i in raw_idx)
        _check(len(indices) == len(wnids), path, line,
               f"{len(wnids)} wnid(s) in 'ilsvrc_wnids' but {len(indices)} index(es) in 'ilsvrc_indices'")
        for w, i in zip(wnids, indices):
            _check(index[w] == i, path, line,
                   f"field 'ilsvrc_indices': {i} disagrees with {w}, whose ILSVRC-2012 index is {index[w]}")
        n = row.get("n_foregrounds", "")
        _check(n == "" or n.isdigit(), path, line, f"field 'n_foregrounds' must be a whole number, got {n!r}")
        for key, value in (("name", name), ("folder", folder), ("mid", mid)):
            _check(value not in seen[key], path, line, f"field '{key}' {value!r} repeats line {seen[key].get(value)}")
            seen[key][value] = line
        classes.append(OOCClass(name, folder, mid, wnids, indices, int(n) if n else None, line,
                                _split_list(row.get("aliases") or "")))
    if not classes:
        raise SpecError(f"{path}: no classes")
    return classes


def class_row(c: OOCClass) -> dict:
    from bitlab.data.imagenet import names

    return {"name": c.name, "folder": c.folder, "mid": c.mid, "ilsvrc_wnids": c.ilsvrc_wnids,
            "ilsvrc_indices": c.ilsvrc_indices, "n_foregrounds": c.n_foregrounds,
            "ilsvrc_names": [names()[i] for i in c.ilsvrc_indices], "aliases": c.aliases}


# ----------------------------------------------------------------------------- background categories
@dataclass(frozen=True)
class BackgroundCategory:
    """A kind of background (a folder name) and the search terms that find examples of it."""

    category: str
    search_terms: str
    description: str = ""
    # Class folders that are usually seen in this context (the paper's own backgrounds include some:
    # underwater for sharks, a street at night for traffic lights): filter these pairs out to keep
    # only truly out-of-context images.
    usual_for: tuple[str, ...] = ()
    line: int = field(default=0, compare=False)


def load_background_categories(path: str | os.PathLike) -> list[BackgroundCategory]:
    path = Path(path)
    out: list[BackgroundCategory] = []
    seen: dict[str, int] = {}
    for line, row in read_table(path, ("category", "search_terms"), ("description", "usual_for")):
        cat = _need(path, line, row, "category")
        _check(bool(SAFE_NAME.match(cat)), path, line,
               f"field 'category' must be a plain folder name (letters, digits, _ . -), got {cat!r}")
        _check(cat not in seen, path, line, f"category {cat!r} repeats line {seen.get(cat)}")
        seen[cat] = line
        usual = tuple(f for f in (row.get("usual_for") or "").split(";") if f)
        _check(all(SAFE_NAME.match(f) for f in usual), path, line,
               f"field 'usual_for' must list class folders separated by ';', got {row.get('usual_for')!r}")
        out.append(BackgroundCategory(cat, _need(path, line, row, "search_terms"), row.get("description", ""), usual,
                                      line))
    if not out:
        raise SpecError(f"{path}: no background categories")
    return out


# ----------------------------------------------------------------------------- background files
BACKGROUND_FILE_COLUMNS = ("category", "file", "uid", "sha256", "width", "height", "title", "author", "author_url",
                           "landing_url", "license", "license_url", "provider", "source_id", "search_terms",
                           "attribution")


@dataclass(frozen=True)
class BackgroundFile:
    """One background image on disk (`file` is relative to the backgrounds root) and its licence."""

    category: str
    file: str
    uid: str
    sha256: str = ""
    width: int = 0
    height: int = 0
    title: str = ""
    author: str = ""
    author_url: str = ""
    landing_url: str = ""
    license: str = ""  # short code as the source gives it, e.g. "cc0", "by 2.0"; "unknown" if nobody said
    license_url: str = ""
    provider: str = ""
    source_id: str = ""
    search_terms: str = ""
    attribution: str = ""
    line: int = field(default=0, compare=False)

    def row(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "line"}


def read_background_files(path: str | os.PathLike) -> list[BackgroundFile]:
    """Rows of a backgrounds root's `backgrounds.csv` (validated; files are not opened)."""
    path = Path(path)
    out: list[BackgroundFile] = []
    uids: dict[str, int] = {}
    for line, row in read_table(path, ("category", "file", "uid")):
        cat = _need(path, line, row, "category")
        _check(bool(SAFE_NAME.match(cat)), path, line, f"field 'category' must be a plain folder name, got {cat!r}")
        file = safe_relative(path, line, "file", _need(path, line, row, "file"))
        uid = _need(path, line, row, "uid")
        _check(bool(SAFE_NAME.match(uid)), path, line,
               f"field 'uid' must be a plain name (letters, digits, _ . -), got {uid!r}")
        _check(uid not in uids, path, line, f"uid {uid!r} repeats line {uids.get(uid)}")
        uids[uid] = line
        sha = row.get("sha256", "").lower()
        _check(not sha or bool(HEX64.match(sha)), path, line, f"field 'sha256' is not a sha256 hex digest: {sha!r}")
        dims = {}
        for k in ("width", "height"):
            v = row.get(k, "")
            _check(v == "" or v.isdigit(), path, line, f"field '{k}' must be a whole number, got {v!r}")
            dims[k] = int(v) if v else 0
        extra = {k: row.get(k, "") for k in BACKGROUND_FILE_COLUMNS if k not in ("category", "file", "uid", "sha256",
                                                                                 "width", "height")}
        out.append(BackgroundFile(cat, file, uid, sha, line=line, **dims, **extra))
    return out


# ----------------------------------------------------------------------------- selection.csv
SELECTION_COLUMNS = ("kind", "group", "uid", "split", "image_id", "mid", "box_id", "mask_path", "file", "sha256",
                     "mask_sha256", "predicted_iou")


@dataclass(frozen=True)
class Foreground:
    """One OpenImages instance mask, pinned by the sha256 of its image and mask files."""

    folder: str  # the class folder (classes.csv)
    uid: str  # MaskPath stem: <ImageID>_<MID without '/'>_<BoxID>
    split: str
    image_id: str
    mid: str
    box_id: str
    mask_path: str
    image_sha256: str
    mask_sha256: str
    predicted_iou: str = ""  # as in the segmentation CSV (may be empty)
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Background:
    """One background file (relative to the backgrounds root), pinned by its sha256."""

    category: str
    uid: str
    file: str
    sha256: str
    line: int = field(default=0, compare=False)


@dataclass
class Selection:
    foregrounds: list[Foreground]
    backgrounds: list[Background]
    path: Path | None = None

    def rows(self) -> list[dict]:
        fg = [{"kind": "foreground", "group": f.folder, "uid": f.uid, "split": f.split, "image_id": f.image_id,
               "mid": f.mid, "box_id": f.box_id, "mask_path": f.mask_path, "sha256": f.image_sha256,
               "mask_sha256": f.mask_sha256, "predicted_iou": f.predicted_iou}
              for f in sorted(self.foregrounds, key=lambda f: (f.folder, f.uid))]
        bg = [{"kind": "background", "group": b.category, "uid": b.uid, "file": b.file, "sha256": b.sha256}
              for b in sorted(self.backgrounds, key=lambda b: (b.category, b.uid))]
        return fg + bg

    def save(self, path: str | os.PathLike) -> Path:
        write_table(path, SELECTION_COLUMNS, self.rows())
        return Path(path)


def mask_stem(image_id: str, mid: str, box_id: str) -> str:
    """OpenImages' MaskPath stem, `<ImageID>_<MID without "/">_<BoxID>` (`/m/04yx4` -> `m04yx4`)."""
    return f"{image_id}_{mid.replace('/', '')}_{box_id}"


def load_selection(path: str | os.PathLike) -> Selection:
    path = Path(path)
    fgs: list[Foreground] = []
    bgs: list[Background] = []
    uids: dict[str, int] = {}
    for line, row in read_table(path, ("kind", "group", "uid", "sha256")):
        kind, group, uid = (_need(path, line, row, k) for k in ("kind", "group", "uid"))
        _check(kind in ("foreground", "background"), path, line,
               f"field 'kind' must be 'foreground' or 'background', got {kind!r}")
        _check(bool(SAFE_NAME.match(group)), path, line, f"field 'group' must be a plain folder name, got {group!r}")
        _check(bool(SAFE_NAME.match(uid)), path, line, f"field 'uid' must be a plain name, got {uid!r}")
        key = f"{kind}:{uid}"
        _check(key not in uids, path, line, f"{kind} uid {uid!r} repeats line {uids.get(key)}")
        uids[key] = line
        sha = _need(path, line, row, "sha256").lower()
        _check(bool(HEX64.match(sha)), path, line, f"field 'sha256' is not a sha256 hex digest: {sha!r}")
        if kind == "background":
            file = safe_relative(path, line, "file", _need(path, line, row, "file"))
            bgs.append(Background(group, uid, file, sha, line))
            continue
        split, image_id, mid, box_id, mask_path = (
            _need(path, line, row, k) for k in ("split", "image_id", "mid", "box_id", "mask_path"))
        _check(bool(SAFE_NAME.match(image_id)), path, line, f"field 'image_id' must be a plain name, got {image_id!r}")
        _check(bool(SAFE_NAME.match(split)), path, line, f"field 'split' must be a plain name, got {split!r}")
        _check(bool(SAFE_NAME.match(mask_path)), path, line,
               f"field 'mask_path' must be a bare file name, got {mask_path!r}")
        msha = _need(path, line, row, "mask_sha256").lower()
        _check(bool(HEX64.match(msha)), path, line, f"field 'mask_sha256' is not a sha256 hex digest: {msha!r}")
        fgs.append(Foreground(group, uid, split, image_id, mid, box_id, mask_path, sha, msha,
                              row.get("predicted_iou", ""), line))
    if not fgs:
        raise SpecError(f"{path}: no foreground rows")
    if not bgs:
        raise SpecError(f"{path}: no background rows")
    return Selection(fgs, bgs, path)


def seeded_order(keys: Iterable[str], seed: int) -> list[str]:
    """`keys` in a pseudo-random order fixed by `seed`: sorted by sha256(seed, key).

    A hash rather than a random generator, so the order depends only on the seed and each key
    itself: it is the same on every platform and library version, and adding or removing a
    candidate never reshuffles the others.
    """
    import hashlib

    return sorted(keys, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest())
