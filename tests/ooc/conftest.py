"""Fixture OpenImages trees and backgrounds folders, written from real photos with real masks.

The photos and masks are the embedded sample's (Tux Paint photos with masks from their alpha
channel, a lighthouse photo with a colour-key mask), shrunk so that tests stay fast; masks are
stored at another resolution than their images, as upstream.
"""
from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest

from bitlab.ooc.openimages import BOX_COLUMNS, IMAGE_COLUMNS, SEG_COLUMNS
from bitlab.ooc.spec import BACKGROUND_FILE_COLUMNS, mask_stem, write_table
from bitlab.paths import SAMPLE_DIR

SAMPLE_OI = SAMPLE_DIR / "openimages"


@dataclass
class Inst:
    """One instance to write into a fixture tree."""

    image_id: str
    mid: str
    photo: int = 0  # which real photo (SAMPLE_PHOTOS: 0 zebra, 1 sea lion, 2 lighthouse)
    iou: str = "0.9"
    rotation: str = "0.0"
    flags: dict = field(default_factory=dict)  # IsGroupOf etc. overrides
    box_row: bool = True  # write a matching row in the box CSV
    write_image: bool = True
    write_mask: bool = True

    @property
    def box_id(self) -> str:
        return hashlib.sha256(self.image_id.encode()).hexdigest()[:8]

    @property
    def mask_path(self) -> str:
        return f"{mask_stem(self.image_id, self.mid, self.box_id)}.png"


def image_id(*parts) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:16]


# Three of the sample's photos, by class MID: two objects on flat grey and one in its own scene
# that runs out of the frame (the lighthouse: a truncated object).
SAMPLE_PHOTOS = ("/m/0898b", "/m/0gd36", "/m/04h7h")


def real_foregrounds(long_side: int = 120) -> list[tuple[np.ndarray, np.ndarray]]:
    """Three of the sample's photos with their masks (SAMPLE_PHOTOS), photo shrunk to `long_side`
    (BGR, bool mask)."""
    seg_csv = SAMPLE_OI / "validation-annotations-object-segmentation.csv"
    seg = [r.split(",") for r in seg_csv.read_text().splitlines()[1:]]
    out = []
    for mid in SAMPLE_PHOTOS:
        mask_path, image_id_ = next(r[:2] for r in seg if r[2] == mid)
        img = cv2.imread(str(SAMPLE_OI / "validation" / f"{image_id_}.jpg"))
        mask = cv2.imread(str(SAMPLE_OI / "validation-masks" / mask_path), cv2.IMREAD_GRAYSCALE)
        s = long_side / max(img.shape[:2])
        w, h = round(img.shape[1] * s), round(img.shape[0] * s)
        out.append((cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA),
                    cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST) > 127))
    return out


def write_openimages_tree(root: Path, instances: list[Inst], names: dict[str, str], *, split: str = "validation",
                          long_side: int = 120, mask_scale: float = 1.5625) -> Path:
    """An OpenImages tree; masks are `mask_scale` times the image size (1600 / 1024 upstream)."""
    fgs = real_foregrounds(long_side)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / f"{split}-masks").mkdir(parents=True, exist_ok=True)
    seg, boxes, images = [], [], []
    for inst in instances:
        img, mask = fgs[inst.photo]
        h, w = mask.shape
        ys, xs = np.nonzero(mask)
        box = [f"{v:.6f}" for v in (xs.min() / w, (xs.max() + 1) / w, ys.min() / h, (ys.max() + 1) / h)]
        jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        if inst.write_image:
            (root / split / f"{inst.image_id}.jpg").write_bytes(jpg)
        if inst.write_mask:
            big = cv2.resize(mask.astype(np.uint8) * 255, (round(w * mask_scale), round(h * mask_scale)),
                             interpolation=cv2.INTER_NEAREST)
            cv2.imwrite(str(root / f"{split}-masks" / inst.mask_path), big, [cv2.IMWRITE_PNG_BILEVEL, 1])
        seg.append([inst.mask_path, inst.image_id, inst.mid, inst.box_id, *box, inst.iou, ""])
        flags = {"IsOccluded": "0", "IsTruncated": "0", "IsGroupOf": "0", "IsDepiction": "0", "IsInside": "0"}
        flags.update(inst.flags)
        if inst.box_row:
            boxes.append([inst.image_id, "xclick", inst.mid, "1", *box, *flags.values()])
        images.append([inst.image_id, split, "", f"https://example.org/{inst.image_id}",
                       "https://creativecommons.org/licenses/by/2.0/", "", f"author {inst.image_id[:4]}",
                       f"photo {inst.image_id[:4]}", str(len(jpg)),
                       base64.b64encode(hashlib.md5(jpg).digest()).decode(), "", inst.rotation])

    def csv(name: str, header, rows) -> None:
        lines = ([",".join(header)] if header else []) + [",".join(r) for r in rows]
        (root / name).write_text("\n".join(lines) + "\n")

    csv("class-descriptions-boxable.csv", None, [[m, n] for m, n in sorted(names.items())])
    csv(f"{split}-annotations-object-segmentation.csv", SEG_COLUMNS, seg)
    csv(f"{split}-annotations-bbox.csv", BOX_COLUMNS, boxes)
    csv(f"{split}-images-with-rotation.csv", IMAGE_COLUMNS, images)
    return root


def real_textures() -> list[np.ndarray]:
    import skimage.data as data

    grey = [cv2.cvtColor(f(), cv2.COLOR_GRAY2BGR) for f in (data.grass, data.gravel, data.brick)]
    colour = [np.ascontiguousarray(f()[:, :, ::-1]) for f in (data.hubble_deep_field, data.astronaut, data.coffee)]
    return grey + colour


def write_backgrounds(root: Path, categories: list[str], *, per_category: int = 1, width: int = 64,
                      height: int = 48, listed: bool = True) -> Path:
    """`per_category` real photos (different crops) per category, non-square so the top-left crop matters."""
    textures = real_textures()
    rows = []
    for i, cat in enumerate(categories):
        for k in range(per_category):
            src = textures[(i + k) % len(textures)]
            off = (7 * i + 3 * k) % 40
            img = cv2.resize(src[off:, off:], (width, height), interpolation=cv2.INTER_AREA)
            rel = f"{cat}/{cat}_{k}.png"
            (root / cat).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / rel), img)
            rows.append({"category": cat, "file": rel, "uid": f"{cat}_{k}",
                         "sha256": hashlib.sha256((root / rel).read_bytes()).hexdigest(), "width": width,
                         "height": height, "title": f"{cat} {k}", "author": "a | b", "license": "cc0",
                         "license_url": "https://creativecommons.org/publicdomain/zero/1.0/",
                         "landing_url": f"https://example.org/{cat}/{k}", "provider": "test",
                         "source_id": f"id-{cat}-{k}", "attribution": f'"{cat} {k}" by a | b is marked with CC0 1.0'})
    if listed:
        write_table(root / "backgrounds.csv", BACKGROUND_FILE_COLUMNS, rows)
    return root


@pytest.fixture(scope="session")
def full_inputs(tmp_path_factory) -> dict:
    """The acceptance inputs: ooc_dataset/classes.csv's 20 classes (81 good foregrounds plus two
    that the filters must drop per class) and ooc_dataset/backgrounds.csv's 41 categories."""
    from bitlab.ooc.spec import load_background_categories, load_classes
    from bitlab.paths import OOC_DATASET_DIR

    root = tmp_path_factory.mktemp("full")
    classes = load_classes(OOC_DATASET_DIR / "classes.csv")
    instances = []
    for ci, c in enumerate(classes):
        for k in range(c.n_foregrounds):
            instances.append(Inst(image_id(c.mid, k), c.mid, photo=(ci + k) % 3))
        instances.append(Inst(image_id(c.mid, "group"), c.mid, flags={"IsGroupOf": "1"}))
        instances.append(Inst(image_id(c.mid, "rotated"), c.mid, rotation="90.0"))
    write_openimages_tree(root / "openimages", instances, {c.mid: c.name for c in classes})
    cats = [c.category for c in load_background_categories(OOC_DATASET_DIR / "backgrounds.csv")]
    write_backgrounds(root / "backgrounds", cats)
    return {"root": root, "openimages": root / "openimages", "backgrounds": root / "backgrounds",
            "classes": OOC_DATASET_DIR / "classes.csv", "categories": OOC_DATASET_DIR / "backgrounds.csv",
            "instances": instances}


@pytest.fixture
def small_inputs(tmp_path) -> dict:
    """Two classes x 3 good instances (+ filtered ones), two background categories x 2 files."""
    from bitlab.ooc.spec import CLASS_COLUMNS

    classes = [{"name": "Cat", "folder": "cat", "mid": "/m/01yrx", "ilsvrc_wnids": "n02123045;n02124075",
                "ilsvrc_indices": "281;285", "n_foregrounds": 2},
               {"name": "Coffee cup", "folder": "coffee_cup", "mid": "/m/02p5f1q", "ilsvrc_wnids": "n07920052",
                "ilsvrc_indices": "967", "n_foregrounds": 2}]
    write_table(tmp_path / "classes.csv", CLASS_COLUMNS, classes)
    write_table(tmp_path / "categories.csv", ["category", "search_terms", "usual_for"],
                [{"category": "grass", "search_terms": "grass", "usual_for": "cat"},
                 {"category": "space", "search_terms": "space", "usual_for": ""}])
    instances = []
    for c, photo in (("/m/01yrx", 0), ("/m/02p5f1q", 1)):
        instances += [Inst(image_id(c, k), c, photo=photo) for k in range(3)]
        instances += [Inst(image_id(c, "group"), c, photo=photo, flags={"IsGroupOf": "1"}),
                      Inst(image_id(c, "depiction"), c, photo=photo, flags={"IsDepiction": "1"}),
                      Inst(image_id(c, "truncated"), c, photo=photo, flags={"IsTruncated": "1"}),
                      Inst(image_id(c, "rotated"), c, photo=photo, rotation="270.0"),
                      Inst(image_id(c, "nan"), c, photo=photo, rotation=""),
                      Inst(image_id(c, "lowiou"), c, photo=photo, iou="0.3"),
                      Inst(image_id(c, "noiou"), c, photo=photo, iou=""),
                      Inst(image_id(c, "nobox"), c, photo=photo, box_row=False)]
    write_openimages_tree(tmp_path / "openimages", instances,
                          {"/m/01yrx": "Cat", "/m/02p5f1q": "Coffee cup", "/m/04ylt": "Missile"})
    write_backgrounds(tmp_path / "backgrounds", ["grass", "space"], per_category=2)
    return {"root": tmp_path, "openimages": tmp_path / "openimages", "backgrounds": tmp_path / "backgrounds",
            "classes": tmp_path / "classes.csv", "categories": tmp_path / "categories.csv", "instances": instances}


@pytest.fixture
def plan_small(small_inputs):
    """Plan the small inputs; returns (inputs, selection path)."""
    from bitlab.ooc.openimages import AnnotationFilter
    from bitlab.ooc.select import PlanConfig, plan

    sel = small_inputs["root"] / "selection.csv"
    plan(PlanConfig(out=str(sel), openimages=str(small_inputs["openimages"]),
                    backgrounds=str(small_inputs["backgrounds"]), classes=str(small_inputs["classes"]),
                    background_categories=str(small_inputs["categories"]), per_category=2,
                    filters=AnnotationFilter(min_predicted_iou=0.5), min_object_px=40, min_background_px=32))
    return small_inputs, sel
