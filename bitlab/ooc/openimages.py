"""OpenImages V5+ segmentation data: the on-disk tree, its CSVs, annotation filters, and the fetcher.

The tree mirrors the upstream file names (bitlab's design contract), so a tree the user already
has works as it is:

    ROOT/class-descriptions-boxable.csv
    ROOT/{split}-annotations-object-segmentation.csv
    ROOT/{split}-annotations-bbox.csv
    ROOT/{split}-images-with-rotation.csv
    ROOT/{split}-masks/<MaskPath>            (extracted zip members)
    ROOT/{split}/<ImageID>.jpg

`fetch` downloads the CSVs (md5-pinned where `UPSTREAM_MD5` lists a digest), then only the mask
zips that hold the masks it needs, extracts only those members, and downloads only the needed
JPEGs. Everything resumes; nothing is written outside ROOT.
"""
from __future__ import annotations

import csv
import logging
import os
import zipfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from tqdm.auto import tqdm

from bitlab import fileio
from bitlab.errors import BitlabError, ConfigError
from bitlab.ooc.spec import SAFE_NAME, OOCClass, Selection, SpecError, load_classes, load_selection, seeded_order

log = logging.getLogger(__name__)

BASE_URL = "https://storage.googleapis.com/openimages"
# Plain HTTPS to the CVDF bucket that the official downloader (openimages/dataset downloader.py) reads.
IMAGES_URL = "https://open-images-dataset.s3.amazonaws.com"
SPLITS = ("train", "validation", "test")

# Upstream path (under BASE_URL) of each file of the tree, per split.
_REMOTE = {
    "class-descriptions-boxable.csv": "v5/class-descriptions-boxable.csv",
    "{split}-annotations-object-segmentation.csv": "v5/{split}-annotations-object-segmentation.csv",
    "{split}-annotations-bbox.csv": {"train": "v6/oidv6-train-annotations-bbox.csv",
                                     "validation": "v5/validation-annotations-bbox.csv",
                                     "test": "v5/test-annotations-bbox.csv"},
    "{split}-images-with-rotation.csv": {"train": "2018_04/train/train-images-boxable-with-rotation.csv",
                                         "validation": "2018_04/validation/validation-images-with-rotation.csv",
                                         "test": "2018_04/test/test-images-with-rotation.csv"},
}
# MD5s observed 2020-07-15 by a third party (the `md5sums` of datasets-mila/datasets--open_images),
# keyed by upstream path. They are expectations, not signatures: a mismatch stops the fetch with a
# message (`--no-pins` skips them; the server's own x-goog-hash MD5 is still checked).
UPSTREAM_MD5 = {
    "v5/class-descriptions-boxable.csv": "9846fd22fd2e68b45e3f3810a4c2a32a",
    "v5/train-annotations-object-segmentation.csv": "fa69369843fcf6e294d9195aeed1f2c6",
    "v5/validation-annotations-object-segmentation.csv": "dbfa09320082b635e8b96989c971128d",
    "v5/test-annotations-object-segmentation.csv": "707198de1a855cefde26d3fe35f7a6ce",
    "v5/train-masks/train-masks-0.zip": "a11ef5a650a3eedaffbfebf6b0513922",
    "v5/validation-masks/validation-masks-0.zip": "7ec6295df5d984b49e7003034325cd49",
    "v5/test-masks/test-masks-0.zip": "2a979e678c8cd3c36f212195604010ef",
    "2018_04/validation/validation-images-with-rotation.csv": "643a54e43b0bab8acce8817b4a569780",
    "2018_04/train/train-images-boxable-with-rotation.csv": "a4ac0bcedb5c2df4d1b1230dc6b41b8f",
    "v5/validation-annotations-bbox.csv": "c5e8200df129ea6867e913e8b21fcab9",
    "v6/oidv6-train-annotations-bbox.csv": "3c3e70cfaba5757ea5c2604b19cac3b2",
}

SEG_COLUMNS = ("MaskPath", "ImageID", "LabelName", "BoxID", "BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax",
               "PredictedIoU", "Clicks")
BOX_COLUMNS = ("ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax", "IsOccluded",
               "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside")
IMAGE_COLUMNS = ("ImageID", "Subset", "OriginalURL", "OriginalLandingURL", "License", "AuthorProfileURL", "Author",
                 "Title", "OriginalSize", "OriginalMD5", "Thumbnail300KURL", "Rotation")
ANNOTATIONS_LICENSE = "CC BY 4.0 (Google, Open Images)"
# Not an upstream column: a tree whose masks are not Open Images' own (bitlab's embedded sample,
# masks from a photo's alpha channel) names their licence per image here; make-ooc records it.
ANNOTATIONS_LICENSE_COLUMN = "AnnotationsLicense"


# ----------------------------------------------------------------------------- the tree
@dataclass(frozen=True)
class Tree:
    """An OpenImages tree on disk, seen through one split."""

    root: Path
    split: str

    def __post_init__(self) -> None:
        if not SAFE_NAME.match(self.split):
            raise BitlabError(f"split must be a plain name such as {', '.join(SPLITS)}, got {self.split!r}")
        object.__setattr__(self, "root", Path(self.root))

    @property
    def class_descriptions(self) -> Path:
        return self.root / "class-descriptions-boxable.csv"

    @property
    def segmentations(self) -> Path:
        return self.root / f"{self.split}-annotations-object-segmentation.csv"

    @property
    def boxes(self) -> Path:
        return self.root / f"{self.split}-annotations-bbox.csv"

    @property
    def images_csv(self) -> Path:
        return self.root / f"{self.split}-images-with-rotation.csv"

    @property
    def masks_dir(self) -> Path:
        return self.root / f"{self.split}-masks"

    def mask(self, mask_path: str) -> Path:
        return self.masks_dir / mask_path

    def image(self, image_id: str) -> Path:
        return self.root / self.split / f"{image_id}.jpg"

    def csv_files(self) -> dict[str, Path]:
        """The tree's metadata files, keyed by their name pattern in `_REMOTE`."""
        return {"class-descriptions-boxable.csv": self.class_descriptions,
                "{split}-annotations-object-segmentation.csv": self.segmentations,
                "{split}-annotations-bbox.csv": self.boxes,
                "{split}-images-with-rotation.csv": self.images_csv}


def remote_path(pattern: str, split: str) -> str:
    remote = _REMOTE[pattern]
    return (remote[split] if isinstance(remote, dict) else remote).format(split=split)


def mask_zip_remote(split: str, mask_path: str) -> str:
    """Masks are sharded into 16 zips by the first hex digit of the ImageID (OpenImages V5 download page)."""
    return f"v5/{split}-masks/{split}-masks-{mask_path[0].lower()}.zip"


# ----------------------------------------------------------------------------- readers
def _open_csv(path: Path, columns: Sequence[str]):
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file (is this an OpenImages tree? see `bitlab openimages fetch`)") from None
    reader = csv.reader(f)
    header = next(reader, None) or []
    missing = [c for c in columns if c not in header]
    if missing:
        f.close()
        raise SpecError(f"{path}: missing column(s) {', '.join(missing)} (header: {', '.join(header) or 'none'})")
    return f, reader, {c: header.index(c) for c in header}


def read_class_descriptions(path: str | os.PathLike) -> dict[str, str]:
    """MID -> display name. The upstream file has no header; one copy in the wild adds one."""
    path = Path(path)
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    out: dict[str, str] = {}
    with f:
        reader = csv.reader(f)
        for row in reader:
            if not row or (reader.line_num == 1 and not row[0].startswith("/")):
                continue  # blank line, or a header
            if len(row) != 2 or not row[0] or not row[1]:
                raise SpecError(f"{path} line {reader.line_num}: expected 'MID,DisplayName', got {','.join(row)!r}")
            out[row[0]] = row[1]
    return out


@dataclass(frozen=True)
class Instance:
    """One row of the segmentation CSV: an instance mask of an object."""

    mask_path: str
    image_id: str
    mid: str
    box_id: str
    box: tuple[float, float, float, float]  # XMin, XMax, YMin, YMax, normalised
    predicted_iou: float | None
    line: int

    @property
    def uid(self) -> str:
        return self.mask_path.rsplit(".", 1)[0]


def read_segmentations(path: str | os.PathLike, mids: Iterable[str]) -> list[Instance]:
    """Rows of a segmentation CSV whose LabelName is one of `mids` (streamed: train's is 800 MB)."""
    path, mids = Path(path), set(mids)
    f, reader, col = _open_csv(path, SEG_COLUMNS)
    out = []
    with f:
        for row in reader:
            if len(row) < len(col):
                if not row:
                    continue
                raise SpecError(f"{path} line {reader.line_num}: {len(row)} values, header has {len(col)}")
            if row[col["LabelName"]] not in mids:
                continue
            mask_path, image_id = row[col["MaskPath"]], row[col["ImageID"]]
            if not (SAFE_NAME.match(mask_path) and mask_path.endswith(".png")):
                raise SpecError(f"{path} line {reader.line_num}: field 'MaskPath' must be a bare .png file name, "
                                f"got {mask_path!r}")
            if not SAFE_NAME.match(image_id):
                raise SpecError(f"{path} line {reader.line_num}: field 'ImageID' is not a plain id: {image_id!r}")
            box = tuple(_float(path, reader.line_num, row, col, k)
                        for k in ("BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax"))
            iou = row[col["PredictedIoU"]].strip()
            out.append(Instance(mask_path, image_id, row[col["LabelName"]], row[col["BoxID"]], box,
                                _float(path, reader.line_num, row, col, "PredictedIoU") if iou else None,
                                reader.line_num))
    return out


def _float(path: Path, line: int, row: list[str], col: dict[str, int], name: str) -> float:
    try:
        return float(row[col[name]])
    except ValueError:
        raise SpecError(f"{path} line {line}: field '{name}' is not a number: {row[col[name]]!r}") from None


def read_box_flags(path: str | os.PathLike, keys: set[tuple[str, str]]
                   ) -> dict[tuple[str, str], list[tuple[tuple[float, float, float, float], dict[str, int]]]]:
    """Box rows for (ImageID, LabelName) pairs in `keys`: [(box, {IsGroupOf: 0/1, ...})]."""
    path = Path(path)
    f, reader, col = _open_csv(path, BOX_COLUMNS)
    out: dict = defaultdict(list)
    flags = ("IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside")
    with f:
        for row in reader:
            if not row or (row[col["ImageID"]], row[col["LabelName"]]) not in keys:
                continue
            key = (row[col["ImageID"]], row[col["LabelName"]])
            box = tuple(_float(path, reader.line_num, row, col, k) for k in ("XMin", "XMax", "YMin", "YMax"))
            values = {}
            for k in flags:
                v = row[col[k]].strip()
                if v not in ("0", "1", "-1", ""):
                    raise SpecError(f"{path} line {reader.line_num}: field '{k}' must be 0, 1 or -1, got {v!r}")
                values[k] = int(v) if v else -1
            out[key].append((box, values))
    return dict(out)


def read_image_metadata(path: str | os.PathLike, image_ids: Iterable[str]) -> dict[str, dict[str, str]]:
    """Rows of the images CSV (licence, author, title, rotation) for `image_ids`."""
    path, ids = Path(path), set(image_ids)
    f, reader, col = _open_csv(path, ("ImageID", "License", "Author", "Title", "OriginalLandingURL", "Rotation"))
    out = {}
    with f:
        for row in reader:
            if row and row[col["ImageID"]] in ids:
                out[row[col["ImageID"]]] = {k: (row[i] if i < len(row) else "") for k, i in col.items()} | {
                    "line": str(reader.line_num)}
    return out


# ----------------------------------------------------------------------------- annotation filters
@dataclass
class AnnotationFilter:
    """Which instance masks may become foregrounds, decided from the CSVs alone."""

    min_predicted_iou: float = 0.75  # the annotation model's own quality estimate; empty fails when > 0
    min_box_fraction: float = 0.25  # annotation box's longest side / image side: skips tiny objects early
    allow_group_of: bool = False  # a box around several objects
    allow_depiction: bool = False  # a drawing, toy or photo of the object
    allow_truncated: bool = False  # cut by the image border
    allow_occluded: bool = True  # paper F: "Sometime foreground objects are partially occluded"
    require_box_match: bool = True  # drop masks whose box cannot be found in the box CSV
    box_tolerance: float = 1e-6  # both CSVs store 6 decimals; Datumaro joins them with atol=1e-6


def _box_ok(inst: Instance, matches, flt: AnnotationFilter) -> bool:
    tol = flt.box_tolerance + 1e-9  # float parsing noise on top of the stored precision
    found = [v for box, v in matches if all(abs(a - b) <= tol for a, b in zip(box, inst.box))]
    if not found:
        return not flt.require_box_match
    v = found[0]
    return ((flt.allow_group_of or v["IsGroupOf"] != 1) and (flt.allow_depiction or v["IsDepiction"] != 1)
            and (flt.allow_truncated or v["IsTruncated"] != 1) and (flt.allow_occluded or v["IsOccluded"] != 1))


def annotated_candidates(tree: Tree, classes: Sequence[OOCClass], flt: AnnotationFilter
                         ) -> tuple[dict[str, list[Instance]], dict[str, dict[str, int]]]:
    """Instances per class folder that pass `flt`, and per class how many survive each stage.

    Stages: masks (rows in the segmentation CSV) -> predicted_iou -> box_size -> box_flags (the
    box-CSV join: group-of, depiction, truncated) -> rotation (only images whose `Rotation` is 0:
    masks refer to the stored pixels, and 2.6% of images need a rotation, per OpenImages' 2018-05-17
    rotation notes).
    """
    by_mid = {c.mid: c for c in classes}
    instances = read_segmentations(tree.segmentations, by_mid)
    funnel: dict[str, Counter] = {c.folder: Counter() for c in classes}
    stage: dict[str, list[Instance]] = defaultdict(list)
    for inst in instances:
        c = by_mid[inst.mid]
        funnel[c.folder]["masks"] += 1
        if flt.min_predicted_iou > 0 and (inst.predicted_iou is None or inst.predicted_iou < flt.min_predicted_iou):
            continue
        funnel[c.folder]["predicted_iou"] += 1
        x0, x1, y0, y1 = inst.box
        if max(x1 - x0, y1 - y0) < flt.min_box_fraction:
            continue
        funnel[c.folder]["box_size"] += 1
        stage[c.folder].append(inst)
    survivors = [i for group in stage.values() for i in group]
    boxes = read_box_flags(tree.boxes, {(i.image_id, i.mid) for i in survivors})
    meta = read_image_metadata(tree.images_csv, {i.image_id for i in survivors})
    out: dict[str, list[Instance]] = {c.folder: [] for c in classes}
    for inst in survivors:
        folder = by_mid[inst.mid].folder
        if not _box_ok(inst, boxes.get((inst.image_id, inst.mid), []), flt):
            continue
        funnel[folder]["box_flags"] += 1
        rotation = meta.get(inst.image_id, {}).get("Rotation", "")
        try:
            upright = float(rotation) == 0.0
        except ValueError:  # empty or 'nan': not on Flickr, orientation unknown
            upright = False
        if not upright:
            continue
        funnel[folder]["rotation"] += 1
        out[folder].append(inst)
    order = ("masks", "predicted_iou", "box_size", "box_flags", "rotation")
    return out, {k: {s: v[s] for s in order} for k, v in funnel.items()}


# ----------------------------------------------------------------------------- fetch
@dataclass
class FetchConfig:
    """`bitlab openimages fetch`."""

    out: str
    classes: str
    split: str = "validation"
    selection: str | None = None  # fetch exactly a committed selection's foregrounds
    max_per_class: int = 25  # candidates to download per class (the plan then picks a few)
    seed: int = 0
    filters: AnnotationFilter = field(default_factory=AnnotationFilter)
    base_url: str = BASE_URL
    images_url: str = IMAGES_URL
    pins: dict[str, str] = field(default_factory=lambda: dict(UPSTREAM_MD5))  # upstream path -> md5
    workers: int = 8  # parallel image downloads (network-bound)
    retries: int = 3
    max_download: int = fileio.MAX_DOWNLOAD_BYTES  # bytes per file


def fetch(cfg: FetchConfig) -> dict:
    """Download what a build needs into the tree at `cfg.out`, locked meanwhile (one fetch fills a
    tree at a time); returns a summary (also fetch.json)."""
    sel = _check_fetch(cfg)
    with fileio.lock_folder(cfg.out, "openimages fetch"):
        return _fetch(cfg, sel)


def _fetch(cfg: FetchConfig, sel: Selection | None) -> dict:
    tree = Tree(Path(cfg.out), cfg.split)
    tree.root.mkdir(parents=True, exist_ok=True)
    files = {}
    # A committed selection names its instances: only the images CSV (licences) is needed, not the
    # annotation CSVs that choosing them took (2.3 GB of boxes alone for the train split).
    needed = (["{split}-images-with-rotation.csv"] if cfg.selection else list(tree.csv_files()))
    for pattern in needed:
        local = tree.csv_files()[pattern]
        remote = remote_path(pattern, cfg.split)
        _download(f"{cfg.base_url}/{remote}", local, cfg.pins.get(remote), cfg.retries, cfg.max_download)
        files[local.name] = {"url": f"{cfg.base_url}/{remote}", "md5": fileio.file_digest(local, "md5"),
                             "sha256": fileio.sha256_file(local)}
    wanted = _wanted_instances(tree, cfg, sel)
    masks = fetch_masks(tree, {w[0]: w[3] for w in wanted}, base_url=cfg.base_url, pins=cfg.pins, retries=cfg.retries,
                        max_bytes=cfg.max_download)
    images = fetch_images(tree, {w[1]: w[2] for w in wanted}, images_url=cfg.images_url, workers=cfg.workers,
                          retries=cfg.retries, max_bytes=cfg.max_download)
    _check_pins(tree, wanted)
    summary = {"config": asdict(cfg), "files": files, "instances": len(wanted),
               "mask_zips": masks, "images": images}
    fileio.write_json(tree.root / "fetch.json", summary)
    return summary


def _download(url: str, dest: Path, md5: str | None, retries: int, max_bytes: int) -> None:
    if dest.exists() and not md5:
        log.info("%s: present, kept (no pinned checksum to compare)", dest)
        return
    try:
        fileio.download(url, dest, md5=md5, retries=retries, max_bytes=max_bytes)
    except fileio.DownloadError as e:
        hint = " (pinned md5, observed 2020-07-15; pass --no-pins if upstream changed the file)" if md5 else ""
        raise fileio.DownloadError(f"{e}{hint}") from None


def _check_fetch(cfg: FetchConfig) -> Selection | None:
    """Everything local that can be wrong, before the first byte is downloaded: the numbers, the
    split, and the selection or class table (read here; a fetch can take hours)."""
    if cfg.split not in SPLITS:
        raise ConfigError("split", f"must be one of {', '.join(SPLITS)}, got {cfg.split!r}")
    for setting, url in (("base_url", cfg.base_url), ("images_url", cfg.images_url)):
        try:
            fileio.check_url(url)
        except fileio.UnsafeURLError as e:
            raise ConfigError(setting, f"{{setting}} {e}") from None
    for setting, value in (("max_per_class", cfg.max_per_class), ("workers", cfg.workers), ("retries", cfg.retries)):
        if value < 1:
            raise ConfigError(setting, f"must be at least 1, got {value}")
    if not cfg.selection:
        load_classes(cfg.classes)
        return None
    sel = load_selection(cfg.selection)
    other = sorted({f.split for f in sel.foregrounds} - {cfg.split})
    if other:
        raise BitlabError(f"{cfg.selection}: foregrounds from split(s) {', '.join(other)}; "
                          "fetch each split with --split")
    return sel


def _wanted_instances(tree: Tree, cfg: FetchConfig, sel: Selection | None
                      ) -> list[tuple[str, str, str | None, str | None]]:
    """(mask_path, image_id, image_sha256, mask_sha256) to fetch: a selection's, or a seeded pool."""
    if sel is not None:
        return [(f.mask_path, f.image_id, f.image_sha256, f.mask_sha256) for f in sel.foregrounds]
    classes = load_classes(cfg.classes)
    names = read_class_descriptions(tree.class_descriptions)
    for c in classes:
        if c.mid not in names:
            raise SpecError(f"{cfg.classes} {c.where}: MID {c.mid} ({c.name}) is not in {tree.class_descriptions}")
    pool, funnel = annotated_candidates(tree, classes, cfg.filters)
    wanted = []
    for c in classes:
        by_uid = {i.uid: i for i in pool[c.folder]}
        picked = seeded_order(by_uid, cfg.seed)[:cfg.max_per_class]
        log.info("%s: %d candidate masks (%s), fetching %d", c.folder, len(by_uid), funnel[c.folder], len(picked))
        wanted += [(by_uid[u].mask_path, by_uid[u].image_id, None, None) for u in picked]
    return wanted


def fetch_masks(tree: Tree, mask_paths: dict[str, str | None], *, base_url: str = BASE_URL,
                pins: dict[str, str] | None = None, retries: int = 3,
                max_bytes: int = fileio.MAX_DOWNLOAD_BYTES) -> dict[str, int]:
    """Extract `mask_paths` (mask path -> expected sha256 or None) into the tree, downloading only
    the zips that hold masks missing on disk or not matching their sha256."""
    pins = pins or {}
    by_zip: dict[str, list[str]] = defaultdict(list)
    for m, sha in mask_paths.items():
        path = tree.mask(m)
        if not path.is_file() or (sha and fileio.sha256_file(path) != sha):
            by_zip[mask_zip_remote(tree.split, m)].append(m)
    for remote, members in tqdm(sorted(by_zip.items()), desc="mask zips", unit="zip", disable=not by_zip):
        archive = tree.root / "downloads" / Path(remote).name
        if not _usable_zip(archive, members):
            _download(f"{base_url}/{remote}", archive, pins.get(remote), retries, max_bytes)
            if not pins.get(remote):  # no pin: at least prove it is a whole zip
                _usable_zip(archive, members, strict=True)
        _refuse_unsafe(archive, tree.masks_dir)
        fileio.extract_zip_members(archive, tree.masks_dir, members)
    return {"zips": len(by_zip), "extracted": sum(len(v) for v in by_zip.values())}


def _usable_zip(archive: Path, members: Sequence[str], strict: bool = False) -> bool:
    """Whether `archive` opens, holds `members` and passes its CRC check."""
    if not archive.exists():
        return False
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError) as e:
        if strict:
            raise BitlabError(f"{archive}: not a readable zip archive ({e})") from None
        return False
    if bad is not None and strict:
        raise BitlabError(f"{archive}: member {bad!r} fails its CRC check")
    missing = [m for m in members if m not in names]
    if missing and strict:
        raise BitlabError(f"{archive}: does not contain {', '.join(missing[:5])}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return bad is None and not missing


def _refuse_unsafe(archive: Path, dest: Path) -> None:
    """An archive with any member that would land outside `dest` is refused as a whole."""
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            try:
                fileio.safe_member_path(dest, name)
            except fileio.UnsafeArchiveError as e:
                raise fileio.UnsafeArchiveError(f"{archive}: {e}; refusing the archive") from None


def fetch_images(tree: Tree, image_ids: dict[str, str | None], *, images_url: str = IMAGES_URL, workers: int = 8,
                 retries: int = 3, max_bytes: int = fileio.MAX_DOWNLOAD_BYTES) -> dict[str, int]:
    """Download the JPEGs of `image_ids` (id -> expected sha256 or None) not on disk yet (or
    not decodable, or not matching their sha256)."""
    todo = sorted(i for i, sha in image_ids.items()
                  if not _decodes(tree.image(i)) or (sha and fileio.sha256_file(tree.image(i)) != sha))

    def one(image_id: str) -> None:
        url, dest = f"{images_url}/{tree.split}/{image_id}.jpg", tree.image(image_id)
        for attempt in range(1, retries + 1):
            fileio.download(url, dest, sha256=image_ids[image_id], retries=retries, progress=False, max_bytes=max_bytes)
            if _decodes(dest):
                return
            log.warning("%s: downloaded bytes do not decode (attempt %d/%d)", url, attempt, retries)
            dest.unlink(missing_ok=True)
        raise fileio.DownloadError(f"{url}: the downloaded file is not a readable image after {retries} attempts")

    if todo:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            futures = [pool.submit(one, i) for i in todo]
            for fut in tqdm(as_completed(futures), total=len(futures), desc="images", unit="img"):
                fut.result()
    return {"wanted": len(image_ids), "downloaded": len(todo)}


def _decodes(path: Path) -> bool:
    from bitlab.ooc import compose  # OpenCV: imported when needed, so `bitlab --help` stays light

    if not path.is_file():
        return False
    try:
        compose.decode(path, upright=False)
    except compose.BadInputError:
        return False
    return True


def _check_pins(tree: Tree, wanted: Sequence[tuple[str, str, str | None, str | None]]) -> None:
    """When fetching a selection, the files must be the ones it pinned."""
    for mask_path, image_id, image_sha, mask_sha in wanted:
        for path, want in ((tree.image(image_id), image_sha), (tree.mask(mask_path), mask_sha)):
            if want and (got := fileio.sha256_file(path)) != want:
                raise BitlabError(f"{path}: sha256 {got} differs from the selection's {want} as fetched "
                                  f"again; upstream changed the file, so this selection cannot be rebuilt exactly")

