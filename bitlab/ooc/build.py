"""`bitlab make-ooc`: every selected foreground on every selected background, resumable and exact.

Output (`OUT/`), compatible with the official release's one-folder-per-class layout:

    <class folder>/<fg_uid>__<bg_uid>.png   one image per (foreground, background) pair (.jpg with --format jpg)
    manifest.csv                              one row per image (MANIFEST_COLUMNS)
    variants/<variant>/...                    with --variants: controls from the same geometry, each
                                              with its own manifest.csv (`bitlab.ooc.variants`)
    dataset.json                              command, config, versions, input checksums, manifest hash
    ATTRIBUTION.md                            every source photo with its author and licence
    classes.csv                               the class table of the classes built (same columns)
    config.json                               this command's configuration

How it stays correct and fast:
- Nothing is written until every input is found, matches the sha256 the selection pinned, and
  decodes (or, with `skip_bad`, the bad ones are dropped and reported).
- Each input is decoded once; foreground cut-outs and background squares are shared by worker
  threads (OpenCV and hashlib release the GIL, so threads use all cores without copying images).
- Each image is written to a temp file and renamed; a journal (`.make-ooc-journal.jsonl`)
  records its sha256 and recipe (input checksums, options, OpenCV version). A re-run skips
  every image whose file still has the journalled sha256 for the same recipe.
- Same inputs, options and library versions give byte-identical images and tables (no timestamps
  anywhere); only dataset.json and config.json, the provenance, name this machine's paths.
- One build writes a folder at a time (`bitlab.fileio.lock_folder`); before it replaces anything, the
  folder's old record goes, dataset.json first (`record.invalidate`), so a build killed midway
  leaves a folder that readers (`record.check_complete`) refuse until a rerun finishes it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
from tqdm.auto import tqdm

from bitlab import __version__, fileio
from bitlab.errors import BitlabError
from bitlab.ooc import backgrounds as bgmod
from bitlab.ooc import compose, variants
from bitlab.ooc.openimages import (ANNOTATIONS_LICENSE, ANNOTATIONS_LICENSE_COLUMN, UPSTREAM_MD5, Tree,
                                   read_image_metadata)
from bitlab.ooc.record import JOURNAL, MANIFEST, invalidate
from bitlab.ooc.spec import (CLASS_COLUMNS, Background, Foreground, OOCClass, class_row, load_background_categories,
                             load_classes, load_selection, table_text, write_table)
from bitlab.ooc.variants import COMPOSITE
from bitlab.paths import OOC_DATASET_DIR, SAMPLE_DIR

log = logging.getLogger(__name__)

# Bump when the same inputs and options would give different pixels (invalidates resumed files).
COMPOSE_VERSION = 1
MANIFEST_COLUMNS = (
    "file", "sha256", "pixel_sha256", "size", "class", "fg_class", "fg_mid", "ilsvrc_wnids", "ilsvrc_indices",
    "fg_uid", "fg_split", "fg_image_id", "fg_box_id", "fg_mask_path", "fg_predicted_iou", "fg_image_sha256",
    "fg_mask_sha256", "fg_box_src", "fg_scale", "fg_size_out", "fg_bbox_out", "paste_xy", "blend",
    "bg_category", "bg_uid", "bg_file", "bg_image_sha256", "bg_crop", "usual_context",
    "fg_title", "fg_author", "fg_author_url", "fg_landing_url", "fg_license",
    "bg_title", "bg_author", "bg_author_url", "bg_landing_url", "bg_license", "bg_license_url",
    "bg_provider", "bg_source_id", "bg_attribution", "annotations_license", "modified",
    # `composite`, or the variant (bitlab.ooc.variants); the composite's background a variant image
    # stands in for (mixed_rand; only_fg with --placement random), whose geometry it shares.
    "variant", "pair_bg_uid")
# Fields computed while compositing (kept in the journal so that resumed images need no work).
_COMPUTED = ("sha256", "pixel_sha256", "fg_box_src", "fg_scale", "fg_size_out", "fg_bbox_out", "paste_xy", "bg_crop")


@dataclass
class MakeOOCConfig:
    """`bitlab make-ooc`."""

    out: str
    openimages: str
    backgrounds: str
    selection: str
    classes: str
    # Names, per category, the classes for which it is a usual context (`usual_for`): recorded per
    # image as `usual_context`, so that evaluation can report those pairs apart.
    background_categories: str = str(OOC_DATASET_DIR / "backgrounds.csv")
    size: int = 512  # output side in px
    object_scale: float = 0.8  # paper F.1: longest object side = 80% of the background width
    placement: str = "center"  # the paper states none; centred keeps the object whole and prominent
    feather: float = 0.0  # Gaussian sigma of the alpha edge in output px (0: hard mask, as the paper)
    erode: int = 0  # shrink the mask by this many output px before pasting
    seed: int = 0  # used by placement='random' only
    format: str = "png"  # compose.FORMATS: png (lossless) | jpg (lossy; faster and smaller)
    png: str = "fast"  # compose.PNG_SETTINGS: fast | opencv | small (all lossless)
    jpeg_quality: int = 95
    workers: int = 0  # threads; 0 = one per core
    skip_bad: bool = False  # drop unusable inputs (and report them) instead of stopping
    variants: list[str] = field(default_factory=list)  # controls to build beside the composites (VARIANTS)

    def validate(self) -> None:
        self.variants = variants.check(self.variants)
        if self.size < 8:
            raise BitlabError(f"--size must be at least 8 px, got {self.size}")
        if not 0 < self.object_scale <= 1:  # also refuses NaN
            raise BitlabError(f"--object-scale must be in (0, 1], got {self.object_scale}")
        if self.placement not in compose.PLACEMENTS:
            raise BitlabError(f"--placement must be one of {', '.join(compose.PLACEMENTS)}, got {self.placement!r}")
        if self.format not in compose.FORMATS:
            raise BitlabError(f"--format must be one of {', '.join(compose.FORMATS)}, got {self.format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise BitlabError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.png not in compose.PNG_SETTINGS:
            raise BitlabError(f"--png must be one of {', '.join(compose.PNG_SETTINGS)}, got {self.png!r}")
        if not (math.isfinite(self.feather) and self.feather >= 0) or self.erode < 0:
            raise BitlabError(f"--feather and --erode must be finite and not negative, got {self.feather}, {self.erode}")

    @property
    def encoding(self) -> list:
        """What decides the file bytes besides the pixels (recorded in dataset.json and the recipe)."""
        return [self.format, *(compose.PNG_SETTINGS[self.png] if self.format == "png" else [self.jpeg_quality])]

    @property
    def blend(self) -> str:
        parts = [f"erode:{self.erode}"] if self.erode else []
        parts.append(f"gaussian:{self.feather:g}" if self.feather > 0 else "hard")
        return "+".join(parts)


@dataclass
class _Job:
    file: str  # relative to OUT
    fg: Foreground | None  # None: no_fg
    bg: Background | None  # the background shown; None: only_fg (grey)
    recipe: str
    variant: str = COMPOSITE
    pair_bg: Background | None = None  # the composite background whose geometry a variant image shares


@dataclass
class _Inputs:
    """What the build knows about its inputs before touching pixels."""

    classes: dict[str, OOCClass]
    foregrounds: list[Foreground]
    backgrounds: list[Background]
    fg_meta: dict[str, dict[str, str]]  # uid -> images-CSV row
    bg_meta: dict[str, bgmod.BackgroundFile]  # uid -> backgrounds.csv row
    usual_for: dict[str, set[str]]  # background category -> class folders it is a usual context for
    problems: list[str]
    inputs: dict[str, dict]


def build(cfg: MakeOOCConfig, command: Sequence[str] | None = None) -> dict:
    """Build the dataset into `cfg.out`, locked meanwhile (a folder another build writes is
    refused); returns a summary (counts, skipped inputs, timings)."""
    cfg.validate()
    with fileio.lock_folder(cfg.out, "make-ooc"):
        return _build(cfg, command)


def _build(cfg: MakeOOCConfig, command: Sequence[str] | None) -> dict:
    t0 = time.perf_counter()
    out = Path(cfg.out)
    inp = _preflight(cfg)
    workers = cfg.workers or os.cpu_count() or 1
    jobs = _plan_jobs(cfg, inp)
    if len({j.file for j in jobs}) != len(jobs):
        raise BitlabError(f"{cfg.selection}: two foreground/background pairs give the same file name")
    invalidate(out)  # before any image is replaced: a kill from here on leaves no complete-looking folder
    for v in variants.VARIANTS:  # nor variant manifests that a reader could take for this build's
        (out / variants.folder(v) / MANIFEST).unlink(missing_ok=True)
    _clean_temp(out, {str(Path(j.file).parent) for j in jobs})
    done = _resume(out, jobs, workers)
    todo = [j for j in jobs if j.file not in done]
    log.info("make-ooc: %d images, %d already built, %d to build", len(jobs), len(done), len(todo))
    if todo:
        cutouts, squares = _prepare(cfg, inp, todo, workers)
        if inp.problems and not cfg.skip_bad:
            _raise(inp.problems)
        todo = [j for j in todo if (j.fg is None or j.fg.uid in cutouts) and (j.bg is None or j.bg.uid in squares)]
        keep = set(done) | {j.file for j in todo}
        jobs = [j for j in jobs if j.file in keep]
        done.update(_compose_all(cfg, out, todo, cutouts, squares, workers))
    _write_records(cfg, out, inp, jobs, done, command)
    composites = [j for j in jobs if j.variant == COMPOSITE]
    summary = {"out": str(out), "images": len(composites), "composed": len(todo), "reused": len(jobs) - len(todo),
               "classes": len({j.fg.folder for j in composites}), "foregrounds": len({j.fg.uid for j in composites}),
               "backgrounds": len({j.bg.uid for j in composites}), "skipped": inp.problems,
               "variants": {v: sum(j.variant == v for j in jobs) for v in cfg.variants},
               "seconds": round(time.perf_counter() - t0, 3)}
    log.info("make-ooc: %s", {k: v for k, v in summary.items() if k != "skipped"})
    return summary


def _plan_jobs(cfg: MakeOOCConfig, inp: _Inputs) -> list[_Job]:
    """Every image to build: the composites, then each requested variant (`bitlab.ooc.variants`)."""
    ext = cfg.format
    jobs = [_Job(f"{fg.folder}/{fg.uid}__{bg.uid}.{ext}", fg, bg, _recipe(cfg, fg, bg))
            for fg in inp.foregrounds for bg in inp.backgrounds]
    for v in cfg.variants:
        base = variants.folder(v)
        if v == "no_fg":
            jobs += [_Job(f"{base}/{bg.category}/{bg.uid}.{ext}", None, bg, _recipe(cfg, None, bg, v), v)
                     for bg in inp.backgrounds]
        elif v == "only_fg" and cfg.placement == "center":  # one place per object: one image each
            jobs += [_Job(f"{base}/{fg.folder}/{fg.uid}.{ext}", fg, None, _recipe(cfg, fg, None, v), v)
                     for fg in inp.foregrounds]
        elif v == "only_fg":  # seeded places differ per pair: one image per composite
            jobs += [_Job(f"{base}/{fg.folder}/{fg.uid}__{bg.uid}.{ext}", fg, None, _recipe(cfg, fg, None, v, bg), v, bg)
                     for fg in inp.foregrounds for bg in inp.backgrounds]
        else:  # mixed_rand: one per composite, named after the composite it stands beside
            for fg in inp.foregrounds:
                for bg in inp.backgrounds:
                    other = variants.mixed_partner(fg, bg, inp.backgrounds, inp.usual_for, cfg.seed)
                    jobs.append(_Job(f"{base}/{fg.folder}/{fg.uid}__{bg.uid}.{ext}", fg, other,
                                     _recipe(cfg, fg, other, v, bg), v, bg))
    return jobs


# ----------------------------------------------------------------------------- inputs
def _preflight(cfg: MakeOOCConfig) -> _Inputs:
    """Read the tables and check every input file's presence and sha256 (no decoding yet)."""
    classes = {c.folder: c for c in load_classes(cfg.classes)}
    if not Path(cfg.selection).exists():
        raise BitlabError(f"{cfg.selection}: no such file; `bitlab make-ooc plan` writes it (ooc_dataset/README.md)")
    sel = load_selection(cfg.selection)
    problems: list[str] = []
    bad_fg: set[str] = set()
    bad_bg: set[str] = set()
    for fg in sel.foregrounds:
        if fg.folder not in classes:
            problems.append(f"{cfg.selection} line {fg.line}: class folder {fg.folder!r} is not in {cfg.classes}")
            bad_fg.add(fg.uid)
    for c in classes.values():
        if not any(fg.folder == c.folder for fg in sel.foregrounds):
            problems.append(f"{cfg.classes} {c.where}: class {c.name!r} ({c.folder}) has no foregrounds in "
                            f"{cfg.selection}")
    trees = {s: Tree(Path(cfg.openimages), s) for s in sorted({fg.split for fg in sel.foregrounds})}
    fg_meta: dict[str, dict[str, str]] = {}
    inputs: dict[str, dict] = {"selection": _file_info(cfg.selection), "classes": _file_info(cfg.classes)}
    for split, tree in trees.items():
        ids = {fg.image_id for fg in sel.foregrounds if fg.split == split}
        meta = read_image_metadata(tree.images_csv, ids)
        inputs[tree.images_csv.name] = _file_info(tree.images_csv)
        for fg in sel.foregrounds:
            if fg.split == split and fg.image_id in meta:
                fg_meta[fg.uid] = meta[fg.image_id]
    for fg in sel.foregrounds:
        tree = trees[fg.split]
        where = f"{cfg.selection} line {fg.line} ({fg.uid})"
        image, mask = tree.image(fg.image_id), tree.mask(fg.mask_path)
        if not mask.is_file():
            problems.append(f"{where}: mask {mask} is missing")
        elif not image.is_file():
            problems.append(f"{where}: the mask's image {image} is missing")
        elif fileio.sha256_file(image) != fg.image_sha256:
            problems.append(f"{where}: {image} does not match the selection's sha256")
        elif fileio.sha256_file(mask) != fg.mask_sha256:
            problems.append(f"{where}: {mask} does not match the selection's sha256")
        elif fg.uid not in fg_meta:
            problems.append(f"{where}: image {fg.image_id} has no row in {tree.images_csv} (licence unknown)")
        else:
            continue
        bad_fg.add(fg.uid)
    categories = {c.category: c for c in load_background_categories(cfg.background_categories)}
    inputs["background_categories"] = _file_info(cfg.background_categories)
    bg_root = Path(cfg.backgrounds)
    bg_table = {b.file: b for b in bgmod.scan(bg_root)}
    if (bg_root / bgmod.TABLE).exists():
        inputs[f"backgrounds/{bgmod.TABLE}"] = _file_info(bg_root / bgmod.TABLE)
    bg_meta = {}
    for bg in sel.backgrounds:
        path = bg_root / bg.file
        where = f"{cfg.selection} line {bg.line} ({bg.uid})"
        if bg.category not in categories:
            problems.append(f"{where}: background category {bg.category!r} is not in {cfg.background_categories}")
        elif not path.is_file():
            problems.append(f"{where}: background {path} is missing")
        elif fileio.sha256_file(path) != bg.sha256:
            problems.append(f"{where}: {path} does not match the selection's sha256")
        else:
            bg_meta[bg.uid] = bg_table.get(bg.file) or bgmod.BackgroundFile(bg.category, bg.file, bg.uid,
                                                                            license="unknown")
            continue
        bad_bg.add(bg.uid)
    if problems and not cfg.skip_bad:
        _raise(problems)
    fgs = sorted((f for f in sel.foregrounds if f.uid not in bad_fg), key=lambda f: (f.folder, f.uid))
    bgs = sorted((b for b in sel.backgrounds if b.uid not in bad_bg), key=lambda b: (b.category, b.uid))
    if not fgs or not bgs:
        _raise(problems + ["nothing left to build"])
    usual_for = {c.category: set(c.usual_for) for c in categories.values()}
    return _Inputs(classes, fgs, bgs, fg_meta, bg_meta, usual_for, problems, inputs)


def _raise(problems: Sequence[str]) -> None:
    shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    raise BitlabError(f"{len(problems)} problem(s) with the inputs; nothing was written "
                      f"(--skip-bad builds the rest):\n  {shown}")


def _file_info(path: str | os.PathLike) -> dict:
    return {"path": str(path), "sha256": fileio.sha256_file(path)}


def _recipe(cfg: MakeOOCConfig, fg: Foreground | None, bg: Background | None, variant: str = COMPOSITE,
            pair_bg: Background | None = None) -> str:
    parts = [COMPOSE_VERSION, cv2.__version__, cfg.encoding,
             fg and fg.image_sha256, fg and fg.mask_sha256, bg and bg.sha256, cfg.size, cfg.object_scale,
             cfg.placement, cfg.feather, cfg.erode, cfg.seed if cfg.placement == "random" else None]
    if variant != COMPOSITE:  # composites keep the recipe they always had: their resumes stay valid
        parts += [variant, variants.GREY if variant == "only_fg" else None, pair_bg and pair_bg.uid]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def _resume(out: Path, jobs: Sequence[_Job], workers: int) -> dict[str, dict]:
    """Journalled images whose file is intact and whose recipe is unchanged: file -> computed fields."""
    journal = out / JOURNAL
    if not journal.exists():
        return {}
    known = {}
    for line in journal.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            known[row["file"]] = row
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by an interruption
    candidates = [(j, known[j.file]) for j in jobs
                  if j.file in known and known[j.file].get("recipe") == j.recipe and (out / j.file).is_file()]

    def intact(item: tuple[_Job, dict]) -> bool:
        return fileio.sha256_file(out / item[0].file) == item[1].get("sha256")

    with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL: hash on all cores
        ok = list(pool.map(intact, candidates))
    return {j.file: {k: row[k] for k in _COMPUTED} for (j, row), good in zip(candidates, ok) if good}


def _clean_temp(out: Path, folders: Iterable[str]) -> None:
    """Remove temp files that a killed run left behind (`bitlab.fileio.atomic_write` names them .*.tmp)."""
    for folder in folders:
        for tmp in (out / folder).glob(".*.tmp") if (out / folder).is_dir() else ():
            tmp.unlink(missing_ok=True)


def _warn_strays(out: Path, files: set[str]) -> None:
    strays = [p for fmt in compose.FORMATS for pattern in (f"*/*.{fmt}", f"{variants.FOLDER}/*/*/*.{fmt}")
              for p in out.glob(pattern) if p.relative_to(out).as_posix() not in files]
    if strays:
        log.warning("%s: %d image file(s) not in this build's manifest (from an earlier selection?), e.g. %s",
                    out, len(strays), strays[0])


# ----------------------------------------------------------------------------- pixels
def _prepare(cfg: MakeOOCConfig, inp: _Inputs, todo: Sequence[_Job], workers: int
             ) -> tuple[dict[str, compose.Cutout], dict[str, tuple[np.ndarray, int]]]:
    """Decode each needed input once (in parallel): cut-outs at output scale, background squares."""
    fgs = {j.fg.uid: j.fg for j in todo if j.fg is not None}
    bgs = {j.bg.uid: j.bg for j in todo if j.bg is not None}
    trees = {}

    def fg_task(fg: Foreground) -> compose.Cutout:
        tree = trees.setdefault(fg.split, Tree(Path(cfg.openimages), fg.split))
        image, mask = compose.load_foreground(tree.image(fg.image_id), tree.mask(fg.mask_path))
        return compose.make_cutout(image, mask, size=cfg.size, object_scale=cfg.object_scale, erode=cfg.erode,
                                   feather=cfg.feather)

    def bg_task(bg: Background) -> tuple[np.ndarray, int]:
        img = compose.decode(Path(cfg.backgrounds) / bg.file)
        return compose.prepare_background(img, cfg.size), min(img.shape[:2])

    cutouts, squares = {}, {}
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(fg_task, fg): ("fg", fg) for fg in fgs.values()}
        futures.update({pool.submit(bg_task, bg): ("bg", bg) for bg in bgs.values()})
        for fut in tqdm(as_completed(futures), total=len(futures), desc="decode inputs", unit="file", leave=False):
            kind, item = futures[fut]
            try:
                value = fut.result()
            except compose.BadInputError as e:
                inp.problems.append(f"{cfg.selection} line {item.line} ({item.uid}): {e}")
                continue
            (cutouts if kind == "fg" else squares)[item.uid] = value
    return cutouts, squares


def _compose_all(cfg: MakeOOCConfig, out: Path, todo: Sequence[_Job], cutouts: dict[str, compose.Cutout],
                 squares: dict[str, tuple[np.ndarray, int]], workers: int) -> dict[str, dict]:
    """Composite, encode and write `todo` on `workers` threads; journal each finished image."""
    visible = {uid: c.visible_box() for uid, c in cutouts.items()}
    grey = variants.grey_square(cfg.size) if any(j.variant == "only_fg" for j in todo) else None

    def task(jobs: Sequence[_Job]) -> list[tuple[_Job, dict]]:
        results = []
        for j in jobs:
            img, computed = _render(cfg, j, cutouts, squares, visible, grey)
            data = compose.encode(img, cfg.format, png_setting=cfg.png, jpeg_quality=cfg.jpeg_quality)
            # No fsync per image: the rename is atomic, and a re-run re-checks each file's sha256.
            fileio.write_bytes(out / j.file, data, fsync=False)
            # a lossy file decodes to other pixels than the composite: no pixel hash for it
            results.append((j, {"sha256": hashlib.sha256(data).hexdigest(),
                                "pixel_sha256": compose.pixel_sha256(img) if cfg.format == "png" else "", **computed}))
        return results

    # One task per foreground and a slice of backgrounds: big enough to keep per-task overhead
    # negligible, small enough for a smooth progress bar and an even split over the threads.
    by_fg: dict[str, list[_Job]] = {}
    for j in todo:
        by_fg.setdefault(j.fg.uid if j.fg is not None else "", []).append(j)
    chunks = [js[i:i + 16] for js in by_fg.values() for i in range(0, len(js), 16)]
    done = {}
    out.mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(workers)
    try:
        with fileio.naming_full_disk(out / JOURNAL), open(out / JOURNAL, "a", encoding="utf-8") as journal, \
                tqdm(total=len(todo), desc="make-ooc", unit="img") as bar:
            for fut in as_completed([pool.submit(task, c) for c in chunks]):
                for j, computed in fut.result():
                    done[j.file] = computed
                    journal.write(json.dumps({"file": j.file, "recipe": j.recipe, **computed}, sort_keys=True) + "\n")
                    bar.update()
                journal.flush()
    finally:
        # On Ctrl-C or an error: running chunks finish their (atomic) writes, queued ones never start.
        pool.shutdown(wait=True, cancel_futures=True)
    return done


def _render(cfg: MakeOOCConfig, j: _Job, cutouts: dict[str, compose.Cutout], squares: dict[str, tuple[np.ndarray, int]],
            visible: dict, grey: np.ndarray | None) -> tuple[np.ndarray, dict]:
    """One image's pixels and the geometry the manifest records: the object on its background (a
    composite, mixed_rand), on grey (only_fg), or the background alone (no_fg)."""
    if j.bg is None:
        canvas, crop = grey, ""
    else:
        canvas, side = squares[j.bg.uid]
        crop = f"0,0,{side}"
    if j.fg is None:
        return canvas, {"fg_box_src": "", "fg_scale": "", "fg_size_out": "", "fg_bbox_out": "", "paste_xy": "",
                        "bg_crop": crop}
    cut = cutouts[j.fg.uid]
    place = j.pair_bg or j.bg  # a variant takes the place its composite had
    x, y = compose.paste_position(cfg.size, cut.size, cfg.placement, key=f"{cfg.seed}:{j.fg.uid}:{place and place.uid}")
    vb = visible[j.fg.uid]
    return compose.composite(canvas, cut, (x, y)), {
        "fg_box_src": ",".join(map(str, cut.box_src)), "fg_scale": round(cut.scale, 6),
        "fg_size_out": f"{cut.size[0]},{cut.size[1]}",
        "fg_bbox_out": "" if vb is None else f"{x + vb[0]},{y + vb[1]},{x + vb[2]},{y + vb[3]}",
        "paste_xy": f"{x},{y}", "bg_crop": crop}


# ----------------------------------------------------------------------------- records
def _write_records(cfg: MakeOOCConfig, out: Path, inp: _Inputs, jobs: Sequence[_Job], done: dict[str, dict],
                   command: Sequence[str] | None) -> None:
    """The manifests (the composites', each variant's), attribution, class table, configs, journal."""
    rows: dict[str, list[dict]] = {v: [] for v in (COMPOSITE, *cfg.variants)}
    for j in jobs:
        rows[j.variant].append(_manifest_row(cfg, inp, j, done[j.file]))
    composites = [j for j in jobs if j.variant == COMPOSITE]
    manifest = table_text(MANIFEST_COLUMNS, rows[COMPOSITE])
    fileio.write_text(out / "manifest.csv", manifest)
    variant_sha256 = {}
    for v in cfg.variants:
        text = table_text(MANIFEST_COLUMNS, rows[v])
        fileio.write_text(out / variants.folder(v) / "manifest.csv", text)
        variant_sha256[v] = hashlib.sha256(text.encode()).hexdigest()
    fileio.write_text(out / "ATTRIBUTION.md", _attribution(inp, composites, cfg.variants))
    write_table(out / "classes.csv", CLASS_COLUMNS, [class_row(c) for c in inp.classes.values()
                                                     if any(j.fg.folder == c.folder for j in composites)])
    fileio.write_json(out / "config.json", asdict(cfg))
    manifest_sha256 = hashlib.sha256(manifest.encode()).hexdigest()
    meta = _dataset_json(cfg, inp, composites, command, manifest_sha256)
    if cfg.variants:
        meta["variants"] = {v: {"folder": variants.folder(v), "images": len(rows[v]), "manifest_sha256": variant_sha256[v]}
                            for v in cfg.variants}
        meta["variants_grey"] = variants.GREY
    fileio.write_json(out / "dataset.json", meta)
    fileio.write_text(out / JOURNAL, "".join(json.dumps({"file": j.file, "recipe": j.recipe, **done[j.file]},
                                                    sort_keys=True) + "\n" for j in jobs))
    _warn_strays(out, {j.file for j in jobs})


def _manifest_row(cfg: MakeOOCConfig, inp: _Inputs, j: _Job, computed: dict) -> dict:
    # A variant's manifest lists its files relative to its own folder, which it describes alone.
    file = j.file if j.variant == COMPOSITE else Path(j.file).relative_to(variants.folder(j.variant)).as_posix()
    row = {"file": file, "size": cfg.size, "blend": cfg.blend, "annotations_license": "", "modified": "true",
           "variant": j.variant, "pair_bg_uid": j.pair_bg.uid if j.pair_bg else "", **computed}
    if j.fg is not None:
        c = inp.classes[j.fg.folder]
        meta = inp.fg_meta.get(j.fg.uid, {})
        row.update({
            "class": c.folder, "fg_class": c.name, "fg_mid": c.mid, "ilsvrc_wnids": c.ilsvrc_wnids,
            "ilsvrc_indices": c.ilsvrc_indices, "fg_uid": j.fg.uid, "fg_split": j.fg.split,
            "fg_image_id": j.fg.image_id, "fg_box_id": j.fg.box_id, "fg_mask_path": j.fg.mask_path,
            "fg_predicted_iou": j.fg.predicted_iou, "fg_image_sha256": j.fg.image_sha256,
            "fg_mask_sha256": j.fg.mask_sha256, "fg_title": meta.get("Title", ""), "fg_author": meta.get("Author", ""),
            "fg_author_url": meta.get("AuthorProfileURL", ""), "fg_landing_url": meta.get("OriginalLandingURL", ""),
            "fg_license": meta.get("License", ""), "annotations_license": _annotations_license(meta)})
    if j.bg is not None:
        bg = inp.bg_meta[j.bg.uid]
        row.update({
            "bg_category": j.bg.category, "bg_uid": j.bg.uid, "bg_file": j.bg.file, "bg_image_sha256": j.bg.sha256,
            "bg_title": bg.title, "bg_author": bg.author, "bg_author_url": bg.author_url,
            "bg_landing_url": bg.landing_url, "bg_license": bg.license, "bg_license_url": bg.license_url,
            "bg_provider": bg.provider, "bg_source_id": bg.source_id, "bg_attribution": bg.attribution})
    if j.fg is not None and j.bg is not None:  # whether the object is shown in a usual context
        row["usual_context"] = str(j.fg.folder in inp.usual_for[j.bg.category]).lower()
    return row


def _annotations_license(meta: dict[str, str]) -> str:
    """The licence of a foreground's mask and box: the images table's own, else Open Images'."""
    return meta.get(ANNOTATIONS_LICENSE_COLUMN, "").strip() or ANNOTATIONS_LICENSE


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ") or "-"


def _attribution(inp: _Inputs, jobs: Sequence[_Job], built_variants: Sequence[str] = ()) -> str:
    fgs = sorted({(j.fg.folder, j.fg.uid): j.fg for j in jobs}.values(), key=lambda f: (f.folder, f.uid))
    bgs = sorted({j.bg.uid: j.bg for j in jobs}.values(), key=lambda b: (b.category, b.uid))
    masks = {_annotations_license(inp.fg_meta.get(f.uid, {})) for f in fgs}
    lines = [
        "# Attribution", "",
        "Every image in this dataset is an adaptation (modified): a foreground object was cut out of a",
        "photo with its segmentation mask, scaled, and pasted onto the top-left square of a background",
        "photo, which was resized. Generated by `bitlab make-ooc`."
        + (f" The controls in variants/ ({', '.join(built_variants)}) are adaptations of the same photos."
           if built_variants else ""), "",
        # Open Images builds keep the one-line statement; other sources name each mask's own licence.
        f"Segmentation masks and annotations: Open Images, {ANNOTATIONS_LICENSE}." if masks == {ANNOTATIONS_LICENSE}
        else "Segmentation masks and annotations: each foreground's own licence, in the table's mask column.",
        "Licences are listed as the sources state them (Open Images makes no representations about the",
        "licence of each of its images), so verify them before you redistribute.", "",
        "## Foreground photos", "",
        "| class | foreground | title | author | licence | mask | source |", "|---|---|---|---|---|---|---|"]
    for f in fgs:
        m = inp.fg_meta.get(f.uid, {})
        author = m.get("Author", "")
        if m.get("AuthorProfileURL"):
            author = f"[{_md(author)}]({m['AuthorProfileURL']})"
        lines.append(f"| {f.folder} | {f.uid} | {_md(m.get('Title', ''))} | {_md(author)} | "
                     f"{_md(m.get('License', ''))} | {_md(_annotations_license(m))} | "
                     f"{_md(m.get('OriginalLandingURL', ''))} |")
    lines += ["", "## Backgrounds", "",
              "| category | background | title | author | licence | source | provider | credit line (as given) |",
              "|---|---|---|---|---|---|---|---|"]
    for b in bgs:
        m = inp.bg_meta[b.uid]
        author = f"[{_md(m.author)}]({m.author_url})" if m.author_url else m.author
        licence = f"[{_md(m.license)}]({m.license_url})" if m.license_url else m.license
        provider = f"{m.provider} {m.source_id}".strip()
        lines.append(f"| {b.category} | {b.uid} | {_md(m.title)} | {_md(author)} | {_md(licence)} | "
                     f"{_md(m.landing_url)} | {_md(provider)} | {_md(m.attribution)} |")
    return "\n".join(lines) + "\n"


def _dataset_json(cfg: MakeOOCConfig, inp: _Inputs, jobs: Sequence[_Job], command: Sequence[str] | None,
                  manifest_sha256: str) -> dict:
    sel_json = Path(cfg.selection).with_suffix(".json")
    seed = json.loads(sel_json.read_text())["config"].get("seed") if sel_json.exists() else None
    return {
        "name": "bitlab out-of-context (OOC) dataset",
        "generator": {"bitlab": __version__, "compose_version": COMPOSE_VERSION},
        "command": list(command) if command else None,
        "config": asdict(cfg),
        "selection_seed": seed,
        "counts": {"images": len(jobs), "classes": len({j.fg.folder for j in jobs}),
                   "foregrounds": len({j.fg.uid for j in jobs}), "backgrounds": len({j.bg.uid for j in jobs})},
        "classes": [class_row(c) for c in inp.classes.values()],
        "background_categories": sorted({j.bg.category for j in jobs}),
        "inputs": inp.inputs,
        "upstream_md5": UPSTREAM_MD5,
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__,
                     "isal": importlib.metadata.version("isal"), "encoding": cfg.encoding},
        "skipped": inp.problems,
        "manifest_sha256": manifest_sha256,
    }


# ----------------------------------------------------------------------------- the embedded sample
def demo_config(out: str | os.PathLike, sample_dir: Path = SAMPLE_DIR, **overrides) -> MakeOOCConfig:
    """The build of the embedded sample (9 foregrounds x 12 backgrounds, ooc_dataset/README.md), with
    every variant (the context scores need them)."""
    return replace(MakeOOCConfig(out=str(out), openimages=str(sample_dir / "openimages"),
                                 backgrounds=str(sample_dir / "backgrounds"),
                                 selection=str(sample_dir / "selection.csv"),
                                 classes=str(sample_dir / "classes.csv"),
                                 background_categories=str(sample_dir / "background_categories.csv"),
                                 variants=list(variants.VARIANTS)), **overrides)


def build_demo(out: str | os.PathLike, sample_dir: Path = SAMPLE_DIR, command: Sequence[str] | None = None,
               **overrides) -> Path:
    """Build the embedded sample into `out` (seconds, offline); returns `out`."""
    build(demo_config(out, sample_dir, **overrides), command=command)
    return Path(out)

