"""Background images: fetched from Openverse with their licences, or taken from a user folder.

A backgrounds root holds `<category>/<file>` and `backgrounds.csv` (one row per file: licence,
author, source; `spec.BACKGROUND_FILE_COLUMNS`). Files dropped into a category folder without a
row are used too, with licence "unknown" (and a warning), so a plain folder of photos works.

Openverse (https://api.openverse.org/v1/images/) indexes openly licensed images and needs no
key for light use; anonymous callers get at most 20 results per page. Compositing modifies an
image, so only licences that allow modification qualify; the default also allows commercial
reuse (cc0, pdm, by, by-sa), so the finished dataset can be shared like the official one.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from bitlab import fileio
from bitlab.errors import BitlabError
from bitlab.ooc.spec import (BACKGROUND_FILE_COLUMNS, BackgroundCategory, BackgroundFile, load_background_categories,
                             read_background_files, write_table)

log = logging.getLogger(__name__)

OPENVERSE_URL = "https://api.openverse.org/v1/images/"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_LICENSES = ("cc0", "pdm", "by", "by-sa")
TABLE = "backgrounds.csv"
SEARCH_PER_CATEGORY = 3  # images per category a search fetches unless told (a folder gives what it holds)


# ----------------------------------------------------------------------------- a backgrounds root
def scan(root: str | os.PathLike) -> list[BackgroundFile]:
    """All background files under `root`: the rows of `root/backgrounds.csv` (if any) plus image
    files in category folders that it does not list (licence 'unknown')."""
    root = Path(root)
    if not root.is_dir():
        raise BitlabError(f"{root}: no such backgrounds folder")
    listed = read_background_files(root / TABLE) if (root / TABLE).exists() else []
    known = {b.file for b in listed}
    uids = {b.uid for b in listed}
    extra = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(folder.iterdir()):
            rel = f"{folder.name}/{path.name}"
            if rel in known or path.suffix.lower() not in IMAGE_EXTENSIONS or path.name.startswith("."):
                continue
            uid = _unique(_slug(f"{folder.name}_{path.stem}"), uids)
            extra.append(BackgroundFile(folder.name, rel, uid, license="unknown", provider="user folder"))
    if extra:
        log.warning("%s: %d image(s) not listed in %s, used with licence 'unknown' (e.g. %s)",
                    root, len(extra), TABLE, extra[0].file)
    return listed + extra


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", text).strip("-.") or "image"


def _unique(uid: str, taken: set[str]) -> str:
    base, n = uid, 1
    while uid in taken:
        n += 1
        uid = f"{base}-{n}"
    taken.add(uid)
    return uid


def inspect(root: Path, bg: BackgroundFile) -> BackgroundFile:
    """Fill sha256 and size from the file itself (raises BadInputError if it does not decode)."""
    from bitlab.ooc import compose  # OpenCV: imported when needed, so `bitlab --help` stays light

    path = root / bg.file
    img = compose.decode(path)
    return BackgroundFile(**{**bg.row(), "sha256": fileio.sha256_file(path), "width": img.shape[1],
                             "height": img.shape[0]}, line=bg.line)


# ----------------------------------------------------------------------------- fetch
# The largest image file accepted from a search result: 100 MiB, over twice a 100 MP camera's JPEG;
# the build uses a --size square (512 px), so more is never worth a download.
MAX_IMAGE_DOWNLOAD = 100 << 20
# The largest search API answer read: 16 MiB (a page of 20 Openverse results is about 30 KB).
MAX_API_ANSWER = 16 << 20


@dataclass
class BackgroundsConfig:
    """`bitlab backgrounds fetch`."""

    out: str
    spec: str  # the category table (ooc_dataset/backgrounds.csv)
    per_category: int | None = None  # search: images per category (None: 3); folder: the least (None: 1)
    categories: list[str] = field(default_factory=list)  # a subset; empty = all
    licenses: list[str] = field(default_factory=lambda: list(DEFAULT_LICENSES))
    min_side: int = 512  # shorter side in px: the build crops a square and resizes it to --size
    api_url: str = OPENVERSE_URL
    max_pages: int = 3
    page_size: int = 20  # Openverse's limit for anonymous callers
    folder: str | None = None  # import a user folder <folder>/<category>/* instead of searching
    retries: int = 3
    max_download: int = MAX_IMAGE_DOWNLOAD  # bytes per image file


def fetch(cfg: BackgroundsConfig) -> dict:
    """Fill `cfg.out` with images for every category; returns counts per category.

    Searching, `per_category` images per category (default `SEARCH_PER_CATEGORY`). From a `--folder`,
    every image each category folder holds (those imported before are skipped), and `per_category`
    is the least a category needs (default 1): a category folder with fewer image files is refused
    before anything is imported. Every category is tried; `backgrounds.csv` is rewritten
    (atomically) after each one, so it always lists exactly the files fetched, and if some
    categories stay short the error names each of them (a rerun resumes). `fetch.json` is written
    only when every category is complete. One fetch fills a folder at a time (`bitlab.fileio.lock_folder`).
    """
    if cfg.per_category is not None and cfg.per_category < 1:
        raise BitlabError(f"--per-category must be at least 1, got {cfg.per_category}")
    least = cfg.per_category or (1 if cfg.folder else SEARCH_PER_CATEGORY)
    if not cfg.folder:
        try:
            fileio.check_url(cfg.api_url)
        except fileio.UnsafeURLError as e:
            raise BitlabError(f"--api-url {e}") from None
    categories = load_background_categories(cfg.spec)
    if cfg.categories:
        unknown = sorted(set(cfg.categories) - {c.category for c in categories})
        if unknown:
            raise BitlabError(f"{cfg.spec}: no category {', '.join(unknown)}")
        categories = [c for c in categories if c.category in cfg.categories]
    with fileio.lock_folder(cfg.out, "backgrounds fetch"):
        return _fetch(cfg, Path(cfg.out), categories, least)


def _fetch(cfg: BackgroundsConfig, root: Path, categories: list[BackgroundCategory], least: int) -> dict:
    """`fetch` once `root` is locked; `least`: images each category needs."""
    table = {b.uid: b for b in (read_background_files(root / TABLE) if (root / TABLE).exists() else [])}
    have = {c.category: [b for b in table.values() if b.category == c.category and (root / b.file).is_file()]
            for c in categories}
    if cfg.folder:
        new_files = _folder_files(Path(cfg.folder), categories, have, least)
        need = {c: len(files) for c, files in new_files.items()}
    else:
        need = {c.category: least - len(have[c.category]) for c in categories}
    root.mkdir(parents=True, exist_ok=True)
    counts, short, skipped = {}, [], []
    for cat in tqdm(categories, desc="backgrounds", unit="category"):
        if need[cat.category] <= 0:
            counts[cat.category] = len(have[cat.category])
            continue
        if cfg.folder:
            new = _import_folder(Path(cfg.folder), root, cat, new_files[cat.category], set(table), skipped)
        else:
            used = {b.source_id for b in table.values() if b.source_id}
            new = _search(cfg, root, cat, need[cat.category], used, set(table))
        for b in new:
            table[b.uid] = b
        _save(root, table.values())  # after each category, so an interrupted fetch keeps its work
        counts[cat.category] = len(have[cat.category]) + len(new)
        if counts[cat.category] < least:
            short.append(cat)
    if short:
        (root / "fetch.json").unlink(missing_ok=True)  # the record of a complete fetch
        source = cfg.folder or cfg.api_url
        missing = "; ".join(f"{cfg.spec} line {c.line}: category {c.category!r} has {counts[c.category]} usable "
                            f"image(s) from {source}, need {least}" for c in short)
        raise BitlabError(f"{missing}. {root / TABLE} lists the {sum(counts.values())} image(s) fetched so far "
                          f"({len(categories) - len(short)} of {len(categories)} categories complete); "
                          "a rerun keeps them and fetches only what is missing")
    summary = {"config": asdict(cfg), "counts": counts, "skipped": skipped}
    fileio.write_json(root / "fetch.json", summary)
    return summary


def _folder_files(src: Path, categories: Sequence[BackgroundCategory], have: dict[str, list[BackgroundFile]],
                  least: int) -> dict[str, list[Path]]:
    """The image files of each `src/<category>/` not imported yet (by content). Every category must
    reach `least` with them: checked before anything is imported, so a folder missing a later
    category imports nothing."""
    problems, new = [], {}
    for cat in categories:
        folder = src / cat.category
        files = _image_files(folder)
        known = {b.sha256 for b in have[cat.category]}
        new[cat.category] = [f for f in files if fileio.sha256_file(f) not in known]
        if len(have[cat.category]) + len(new[cat.category]) >= least:
            continue
        if not files:
            problems.append(f"{folder}: no images for category {cat.category!r} "
                            f"(expected {', '.join(IMAGE_EXTENSIONS)} files)")
        else:
            problems.append(f"{folder}: {len(files)} image file(s) for category {cat.category!r}, need {least}")
    if problems:
        raise BitlabError("; ".join(problems) + "; nothing was imported")
    return new


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())


def _save(root: Path, rows) -> None:
    ordered = sorted(rows, key=lambda b: (b.category, b.uid))
    write_table(root / TABLE, BACKGROUND_FILE_COLUMNS, [b.row() for b in ordered])


def _search(cfg: BackgroundsConfig, root: Path, cat: BackgroundCategory, need: int, used: set[str],
            uids: set[str]) -> list[BackgroundFile]:
    """Query Openverse page by page and keep the first `need` results that qualify."""
    allowed = {x.lower() for x in cfg.licenses}
    new: list[BackgroundFile] = []
    seen: set[str] = set()
    for page in range(1, cfg.max_pages + 1):
        query = urllib.parse.urlencode({"q": cat.search_terms, "license": ",".join(cfg.licenses),
                                        "license_type": "modification", "page": page, "page_size": cfg.page_size,
                                        "mature": "false"})
        url = f"{cfg.api_url}?{query}"
        data = _get_json(url, cfg.retries)
        results = data.get("results")
        if not isinstance(results, list):
            raise BitlabError(f"{url}: unexpected answer (no 'results' list)")
        fresh = [r for r in results if isinstance(r, dict) and r.get("id") not in seen]
        if not fresh:
            break
        for r in fresh:
            seen.add(r.get("id"))
            reason = _reject(r, allowed, cfg.min_side, used)
            if reason:
                log.info("%s: skip %s (%s)", cat.category, r.get("id"), reason)
                continue
            got = _download_result(root, cat, r, uids, cfg)
            if got is None:
                continue
            used.add(got.source_id)
            new.append(got)
            if len(new) == need:
                return new
        if len(results) < cfg.page_size:
            break
    return new


def _reject(r: dict, allowed: set[str], min_side: int, used: set[str]) -> str:
    if not r.get("id") or not r.get("url"):
        return "no id or url"
    if str(r.get("license", "")).lower() not in allowed:
        return f"licence {r.get('license')!r} not in {sorted(allowed)}"
    if r["id"] in used:
        return "already used by another category"
    w, h = r.get("width") or 0, r.get("height") or 0
    if w and h and min(w, h) < min_side:  # sizes are optional in the API; unknown sizes are checked after download
        return f"{w}x{h} is smaller than {min_side} px"
    return ""


def _download_result(root: Path, cat: BackgroundCategory, r: dict, uids: set[str], cfg: BackgroundsConfig
                     ) -> BackgroundFile | None:
    """Download one search result (http(s) only, at most `cfg.max_download` bytes); None if unusable."""
    from bitlab.ooc import compose

    ext = Path(urllib.parse.urlparse(r["url"]).path).suffix.lower()
    ext = ext if ext in IMAGE_EXTENSIONS else ".jpg"
    uid = _unique(_slug(f"{cat.category}_ov{str(r['id']).replace('-', '')[:10]}"), uids)
    rel = f"{cat.category}/{uid}{ext}"
    dest = root / rel
    try:
        fileio.download(str(r["url"]), dest, retries=cfg.retries, progress=False, max_bytes=cfg.max_download)
        img = compose.decode(dest)
        if min(img.shape[:2]) < cfg.min_side:
            raise compose.BadInputError(f"{img.shape[1]}x{img.shape[0]} is smaller than {cfg.min_side} px")
    except (fileio.DownloadError, compose.BadInputError) as e:
        log.warning("%s: skip %s (%s)", cat.category, r["url"], e)
        dest.unlink(missing_ok=True)
        uids.discard(uid)
        return None
    licence = str(r.get("license", ""))
    if r.get("license_version"):
        licence += f" {r['license_version']}"
    return BackgroundFile(
        category=cat.category, file=rel, uid=uid, sha256=fileio.sha256_file(dest), width=img.shape[1],
        height=img.shape[0], title=str(r.get("title") or ""), author=str(r.get("creator") or ""),
        author_url=str(r.get("creator_url") or ""), landing_url=str(r.get("foreign_landing_url") or ""),
        license=licence, license_url=str(r.get("license_url") or ""),
        provider=f"openverse:{r.get('provider') or r.get('source') or ''}", source_id=str(r["id"]),
        search_terms=cat.search_terms, attribution=str(r.get("attribution") or ""))


def _get_json(url: str, retries: int, timeout: float = 30.0) -> dict:
    last = ""
    for attempt in range(1, retries + 1):
        try:
            data = fileio.read_url(url, max_bytes=MAX_API_ANSWER, headers={"Accept": "application/json"}, timeout=timeout)
            return json.loads(data.decode("utf-8"))
        except urllib.error.HTTPError as e:
            if e.code != 429 and 400 <= e.code < 500:
                raise BitlabError(f"{url}: HTTP {e.code} {e.reason}") from None
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            last = f"{type(e).__name__}: {e}"
        log.warning("%s: %s (attempt %d/%d)", url, last, attempt, retries)
        time.sleep(min(2.0 ** attempt, 30.0) * 0.05)
    raise BitlabError(f"{url}: gave up after {retries} attempts: {last}")


def _import_folder(src: Path, root: Path, cat: BackgroundCategory, files: Sequence[Path], uids: set[str],
                   skipped: list[str]) -> list[BackgroundFile]:
    """Copy `files` (from `src/<category>/`) that decode; licence from `src/backgrounds.csv` when it
    lists them, else 'unknown'. Each file that does not decode is added to `skipped` with the reason
    (a folder of photos with one broken file still imports the rest; the summary names it)."""
    from bitlab.ooc import compose

    meta = {b.file: b for b in read_background_files(src / TABLE)} if (src / TABLE).exists() else {}
    new = []
    for path in files:
        rel_src = f"{cat.category}/{path.name}"
        try:
            img = compose.decode(path)
        except compose.BadInputError as e:
            log.warning("%s (skipped)", e)
            skipped.append(str(e))
            continue
        known = meta.get(rel_src)
        uid = _unique(known.uid if known else _slug(f"{cat.category}_{path.stem}"), uids)
        rel = f"{cat.category}/{uid}{path.suffix.lower()}"
        with fileio.atomic_write(root / rel) as out, open(path, "rb") as f:
            shutil.copyfileobj(f, out)
        base = known.row() if known else {"license": "unknown", "provider": "user folder"}
        new.append(BackgroundFile(**{**base, "category": cat.category, "file": rel, "uid": uid,
                                     "sha256": fileio.sha256_file(root / rel), "width": img.shape[1],
                                     "height": img.shape[0]}))
    return new


def check_categories(root: Path, categories: Sequence[BackgroundCategory], files: Sequence[BackgroundFile],
                     spec_path: str | os.PathLike) -> None:
    """Every category needs at least one image file."""
    have = {b.category for b in files}
    empty = [c for c in categories if c.category not in have]
    if empty:
        raise BitlabError("; ".join(f"{root / c.category}: no images for category {c.category!r} "
                                    f"({spec_path} line {c.line})" for c in empty))
