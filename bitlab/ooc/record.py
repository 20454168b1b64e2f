"""What marks a make-ooc folder complete, and the check its readers make (`build.py` writes it).

A finished build ends by writing `dataset.json` (counts, settings and the sha256 of
`manifest.csv`); a rebuild removes it before anything else (`invalidate`), then the other record
files, so a build killed midway, whatever its settings, leaves the journal without `dataset.json`:
a folder `check_complete` refuses until a rerun finishes it. Folders that make-ooc did not write
(the official release, hand-made manifests) have neither file and are not checked here.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from bitlab import fileio
from bitlab.data.imagesize import image_size
from bitlab.errors import BitlabError

DATASET = "dataset.json"
MANIFEST = "manifest.csv"
JOURNAL = ".make-ooc-journal.jsonl"
# Removed before a rebuild replaces anything, dataset.json first: it is what says "complete".
RECORD_FILES = (DATASET, MANIFEST, "config.json", "classes.csv", "ATTRIBUTION.md")
# Images whose size and sha256 a reader compares with the record: spread over the whole manifest,
# a few ms each, so a check costs well under a second on the paper's 3321 images.
SAMPLE = 64


def invalidate(out: str | Path) -> None:
    """Before a build touches `out`: its old record goes, dataset.json first."""
    for name in RECORD_FILES:
        (Path(out) / name).unlink(missing_ok=True)


def check_complete(root: str | Path) -> None:
    """Refuse (`BitlabError` naming the file and field) a make-ooc folder being written, one whose
    build did not finish, or one whose record disagrees with its files: the manifest against
    dataset.json's `manifest_sha256` and `counts.images`, and a sample of images against the
    manifest's `sha256` and dataset.json's `config.size`."""
    root = Path(root)
    fileio.check_not_in_use(root)
    record = root / DATASET
    if not record.is_file():
        if (root / JOURNAL).exists():
            raise BitlabError(f"{root}: an unfinished make-ooc build ({JOURNAL} but no {DATASET}: it was interrupted, "
                              "or a rebuild with other settings was); rerun the make-ooc command to finish it")
        return
    meta = _read_record(record)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise BitlabError(f"{manifest}: missing, but {record} records a finished build")
    digest = fileio.sha256_file(manifest)
    if digest != meta["manifest_sha256"]:
        raise BitlabError(f"{manifest}: its sha256 is {digest[:16]}..., not {record} field 'manifest_sha256' "
                          f"({str(meta['manifest_sha256'])[:16]}...): the manifest is from another build or was edited")
    rows = list(csv.DictReader(fileio.text_lines(manifest)))
    if len(rows) != meta["counts"]["images"]:
        raise BitlabError(f"{manifest}: {len(rows)} rows, but {record} field 'counts.images' is "
                          f"{meta['counts']['images']}")
    size = meta["config"]["size"]
    for n in sorted({round(i * (len(rows) - 1) / max(SAMPLE - 1, 1)) for i in range(SAMPLE)} if rows else ()):
        _check_image(root, rows[n], n + 2, size, record)


def _read_record(record: Path) -> dict:
    try:
        meta = json.loads(record.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BitlabError(f"{record}: unreadable ({e})") from None
    for dotted in ("manifest_sha256", "counts.images", "config.size"):
        value = meta
        for key in dotted.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            raise BitlabError(f"{record}: field {dotted!r} is missing (not a finished make-ooc record)")
    return meta


def _check_image(root: Path, row: dict, line: int, size: int, record: Path) -> None:
    file = root / (row.get("file") or "")
    where = f"{root / MANIFEST} line {line}"
    try:
        data = file.read_bytes()
    except OSError:
        raise BitlabError(f"{file}: listed in {where} but missing or unreadable") from None
    if (got := image_size(data)) != (size, size) or row.get("size") != str(size):
        shown = f"{got[0]}x{got[1]} px" if got else "of unknown size"
        raise BitlabError(f"{file}: {shown}, but {record} field 'config.size' is {size} (and {where} field 'size' "
                          f"{row.get('size')!r}): images from another build; rerun the make-ooc command")
    if hashlib.sha256(data).hexdigest() != row.get("sha256"):
        raise BitlabError(f"{file}: its sha256 is not {where} field 'sha256': the image was changed after the build; "
                          "rerun the make-ooc command")
