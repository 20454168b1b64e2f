"""`make-ooc plan`: choose the exact foregrounds and background files, and pin them in selection.csv.

Candidates are taken in a seeded order (`spec.seeded_order`): per class, the first instances
that pass the annotation filters (CSV level) and the pixel checks (the mask resized to the
photo's exact size: a tight box of at least `min_object_px` px, filled enough); per background
category, the first files that decode and are large enough. The same seed and inputs always give
the same selection; the selection pins every file by sha256, so later upstream changes cannot
silently change a dataset built from it.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from bitlab import fileio
from bitlab.errors import BitlabError
from bitlab.ooc import backgrounds as bgmod
from bitlab.ooc import compose
from bitlab.ooc.openimages import AnnotationFilter, Tree, annotated_candidates, read_class_descriptions
from bitlab.ooc.spec import (Background, Foreground, Selection, SpecError, load_background_categories, load_classes,
                             seeded_order)
from bitlab.paths import OOC_DATASET_DIR

log = logging.getLogger(__name__)


@dataclass
class PlanConfig:
    """`bitlab make-ooc plan`."""

    out: str  # the selection.csv to write (selection.json beside it)
    openimages: str
    backgrounds: str
    classes: str = str(OOC_DATASET_DIR / "classes.csv")
    background_categories: str = str(OOC_DATASET_DIR / "backgrounds.csv")
    split: str = "validation"
    seed: int = 0
    per_class: int | None = None  # overrides classes.csv's n_foregrounds
    per_category: int = 1  # paper: 41 backgrounds for 41 categories
    filters: AnnotationFilter = field(default_factory=AnnotationFilter)
    # At --size 512 the object's longest side is 410 px: 200 px keeps upsampling at most ~2x.
    min_object_px: int = 200
    min_mask_fill: float = 0.15  # mask pixels / tight-box pixels: drops slivers and stray specks
    min_background_px: int = 512  # shorter side; smaller backgrounds would be upsampled at --size 512


def plan(cfg: PlanConfig) -> tuple[Selection, dict]:
    """Choose foregrounds and backgrounds; write selection.csv and selection.json; return both."""
    classes = load_classes(cfg.classes)
    tree = Tree(Path(cfg.openimages), cfg.split)
    names = read_class_descriptions(tree.class_descriptions)
    for c in classes:
        if c.mid not in names:
            raise SpecError(f"{cfg.classes} {c.where}: MID {c.mid} ({c.name}) is not in {tree.class_descriptions}")
        if names[c.mid] != c.name:
            log.warning("%s %s: name %r, OpenImages calls %s %r", cfg.classes, c.where, c.name, c.mid, names[c.mid])
        if cfg.per_class is None and not c.n_foregrounds:
            raise SpecError(f"{cfg.classes} {c.where}: field 'n_foregrounds' is empty; fill it or pass --per-class")
    pool, funnel = annotated_candidates(tree, classes, cfg.filters)
    foregrounds, problems = [], []
    for c in tqdm(classes, desc="plan foregrounds", unit="class"):
        need = cfg.per_class if cfg.per_class is not None else c.n_foregrounds
        picked = _pick_foregrounds(tree, c.folder, pool[c.folder], need, cfg, funnel[c.folder])
        foregrounds += picked
        if len(picked) < need:
            stages = ", ".join(f"{k} {v}" for k, v in funnel[c.folder].items())
            problems.append(f"class {c.name!r} ({c.mid}, {cfg.classes} {c.where}): {len(picked)} usable "
                            f"foreground(s), need {need} [{stages}]")
    bg_picked, bg_report = _pick_backgrounds(cfg, problems)
    if problems:
        raise BitlabError("the plan cannot be met:\n  " + "\n  ".join(problems))
    selection = Selection(sorted(foregrounds, key=lambda f: (f.folder, f.uid)),
                          sorted(bg_picked, key=lambda b: (b.category, b.uid)))
    out = Path(cfg.out)
    selection.save(out)
    report = {"config": asdict(cfg), "foregrounds": len(foregrounds), "backgrounds": len(bg_picked),
              "images": len(foregrounds) * len(bg_picked), "funnel": funnel, "background_files": bg_report,
              "selection_sha256": fileio.sha256_file(out)}
    fileio.write_json(out.with_suffix(".json"), report)
    return selection, report


def _pick_foregrounds(tree: Tree, folder: str, candidates, need: int, cfg: PlanConfig,
                      funnel: dict) -> list[Foreground]:
    by_uid = {i.uid: i for i in candidates}
    picked: list[Foreground] = []
    for stage in ("on_disk", "decodes", "object_px", "mask_fill"):
        funnel[stage] = 0
    for uid in seeded_order(by_uid, cfg.seed):
        if len(picked) == need:
            break
        inst = by_uid[uid]
        image_path, mask_path = tree.image(inst.image_id), tree.mask(inst.mask_path)
        if not (image_path.is_file() and mask_path.is_file()):
            continue
        funnel["on_disk"] += 1
        try:
            _, mask = compose.load_foreground(image_path, mask_path)
        except compose.BadInputError as e:
            log.warning("%s: skip %s (%s)", folder, uid, e)
            continue
        funnel["decodes"] += 1
        x0, y0, x1, y1 = compose.tight_box(mask)
        if max(x1 - x0, y1 - y0) < cfg.min_object_px:
            continue
        funnel["object_px"] += 1
        if mask[y0:y1, x0:x1].mean() < cfg.min_mask_fill:
            continue
        funnel["mask_fill"] += 1
        picked.append(Foreground(folder, uid, tree.split, inst.image_id, inst.mid, inst.box_id, inst.mask_path,
                                 fileio.sha256_file(image_path), fileio.sha256_file(mask_path),
                                 "" if inst.predicted_iou is None else repr(inst.predicted_iou)))
    return picked


def _pick_backgrounds(cfg: PlanConfig, problems: list[str]) -> tuple[list[Background], dict]:
    root = Path(cfg.backgrounds)
    categories = load_background_categories(cfg.background_categories)
    files = bgmod.scan(root)
    bgmod.check_categories(root, categories, files, cfg.background_categories)
    by_cat: dict[str, dict[str, object]] = {}
    for b in files:
        by_cat.setdefault(b.category, {})[b.uid] = b
    picked, report = [], {}
    for cat in categories:
        files_here = by_cat[cat.category]
        chosen, seen = [], 0
        for uid in seeded_order(files_here, cfg.seed):
            if len(chosen) == cfg.per_category:
                break
            seen += 1
            bg = files_here[uid]
            try:
                info = bgmod.inspect(root, bg)
            except compose.BadInputError as e:
                where = f" ({root / bgmod.TABLE} line {bg.line})" if bg.line else ""
                log.warning("background %s%s: %s", bg.file, where, e)
                continue
            if bg.sha256 and info.sha256 != bg.sha256:
                log.warning("background %s: sha256 differs from %s line %d; skipped", bg.file, bgmod.TABLE, bg.line)
                continue
            if min(info.width, info.height) < cfg.min_background_px:
                continue
            chosen.append(Background(cat.category, uid, bg.file, info.sha256))
        report[cat.category] = {"files": len(files_here), "looked_at": seen, "picked": len(chosen)}
        if len(chosen) < cfg.per_category:
            problems.append(f"background category {cat.category!r} ({cfg.background_categories} line {cat.line}): "
                            f"{len(chosen)} usable file(s) of {len(files_here)} in {root / cat.category}, need "
                            f"{cfg.per_category} (decodable, shorter side >= {cfg.min_background_px} px)")
        picked += chosen
    return picked, report

