"""How the embedded OOC sample was made (a maintainer's tool; its outputs are committed).

    PYTHONPATH=. python ooc_dataset/sample/make_sample.py [--preview DIR]

From the three committed CC0 / public-domain photos in `openimages/validation/`, it writes an
OpenImages-layout tree around them (class list, segmentation / box / image CSVs, instance masks),
copies four CC0 / public-domain backgrounds out of scikit-image's wheel, and runs
`make-ooc plan` to write `selection.csv`. Run it from the repository root.

Masks: a hand-drawn outline (polygons and ellipses, coordinates below, read off the photos on a
grid) refined by OpenCV GrabCut in a band of a few pixels around it, then checked by eye with
`--preview` (the outline drawn over a darkened photo). Like real OpenImages masks they are stored
as 1-bit PNGs at another resolution than the photo (long side 1600 px, reference §1.3).
PredictedIoU is left empty (no annotation model scored these masks), so the sample is planned
with `--min-iou 0`; the cat fills its frame (IsTruncated=1), so with `--allow-truncated`.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
from pathlib import Path

import cv2
import numpy as np

from bitlab.ooc import select
from bitlab.ooc.openimages import AnnotationFilter
from bitlab.ooc.spec import BACKGROUND_FILE_COLUMNS, mask_stem, write_table

HERE = Path("ooc_dataset/sample")
OI = HERE / "openimages"
MASK_LONG_SIDE = 1600  # OpenImages masks have a long edge of 1600 px (reference §1.3)
CC0 = "https://creativecommons.org/publicdomain/zero/1.0/"
PDM = "https://creativecommons.org/publicdomain/mark/1.0/"

PHOTOS = {
    "d9ce3f9b1da15b67": dict(
        mid="/m/01yrx", name="Cat", truncated=1, title="Chelsea the cat", author="Stefan van der Walt",
        landing="https://scikit-image.org/docs/stable/api/skimage.data.html#skimage.data.chelsea", license=CC0,
        outline=dict(polygons=[[(38, 0), (400, 0), (360, 60), (364, 85), (369, 115), (370, 140), (362, 170),
                                (350, 200), (342, 230), (336, 265), (335, 299), (0, 299), (0, 128), (15, 118),
                                (30, 80), (35, 40)]], band=8)),
    "477fca715251f3a5": dict(
        mid="/m/02p5f1q", name="Coffee cup", truncated=0, title="Coffee cup (Pikolo Espresso Bar)",
        author="Rachel Michetti",
        landing="https://scikit-image.org/docs/stable/api/skimage.data.html#skimage.data.coffee", license=CC0,
        outline=dict(ellipses=[((278, 232), (201, 156), -3), ((291, 108), (119, 92), 0)],  # saucer, cup rim
                     polygons=[[(172, 108), (410, 108), (395, 250), (190, 250)],  # cup body
                               [(403, 72), (414, 64), (423, 72), (392, 235), (380, 232)]],  # spoon handle
                     band=6)),
    "11ec6abc282e3e38": dict(
        mid="/m/09rvcxw", name="Rocket", truncated=0, title="Launch of DSCOVR on Falcon 9", author="SpaceX",
        landing="https://www.flickr.com/photos/spacexphotos/16511594820/", license=PDM,
        outline=dict(polygons=[[(320, 126), (315, 130), (312, 137), (310, 147), (310, 160), (311, 175), (313, 180),
                                (313, 405), (332, 405), (332, 180), (334, 175), (335, 160), (334, 145), (331, 135),
                                (326, 128)]], band=3)),
}
OTHER_CLASSES = {"/m/04ylt": "Missile", "/m/02jvh9": "Mug"}  # a real class list has more than our three

# (category, file in skimage/data, title, author, landing page, licence, licence URL)
BACKGROUNDS = [
    ("grass", "grass.png", "Grass 01 (grey 512 px crop by scikit-image)", "linolafett",
     "https://www.deviantart.com/linolafett/art/Grass-01-434853879", "cc0", CC0),
    ("gravel", "gravel.png", "Gravel04 (grey 512 px crop by scikit-image)", "CC0Textures",
     "https://cc0textures.com/view.php?tex=Gravel04", "cc0", CC0),
    ("brick_wall", "brick.png", "Bricks25 (grey, rectified crop by scikit-image)", "CC0Textures",
     "https://cc0textures.com/view.php?tex=Bricks25", "cc0", CC0),
    ("outer_space", "hubble_deep_field.jpg", "Hubble eXtreme Deep Field", "NASA",
     "http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/", "pdm", PDM),
]


def outline_mask(shape: tuple[int, int], outline: dict) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    for center, axes, angle in outline.get("ellipses", []):
        cv2.ellipse(m, center, axes, angle, 0, 360, 1, -1)
    for poly in outline.get("polygons", []):
        cv2.fillPoly(m, [np.array(poly, np.int32)], 1)
    return m


def grabcut(img: np.ndarray, inside: np.ndarray, band: int) -> np.ndarray:
    """Sure foreground deep inside the outline, sure background far outside, GrabCut in between."""
    cv2.setRNGSeed(0)  # GrabCut's GMM initialisation draws random numbers
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    gc = np.full(inside.shape, cv2.GC_BGD, np.uint8)
    gc[cv2.dilate(inside, k) == 1] = cv2.GC_PR_BGD
    gc[inside == 1] = cv2.GC_PR_FGD
    gc[cv2.erode(inside, k, borderType=cv2.BORDER_REPLICATE) == 1] = cv2.GC_FGD
    cv2.grabCut(img, gc, None, np.zeros((1, 65)), np.zeros((1, 65)), 8, cv2.GC_INIT_WITH_MASK)
    return np.isin(gc, (cv2.GC_FGD, cv2.GC_PR_FGD))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preview", help="folder for outline previews (PNG) to check the masks by eye")
    args = ap.parse_args()
    seg, boxes, images = [], [], []
    (OI / "validation-masks").mkdir(parents=True, exist_ok=True)
    for image_id, p in PHOTOS.items():
        jpg = OI / "validation" / f"{image_id}.jpg"
        img = cv2.imread(str(jpg))
        h, w = img.shape[:2]
        mask = grabcut(img, outline_mask((h, w), p["outline"]), p["outline"]["band"])
        ys, xs = np.nonzero(mask)
        box = (xs.min() / w, (xs.max() + 1) / w, ys.min() / h, (ys.max() + 1) / h)  # XMin, XMax, YMin, YMax
        box_id = hashlib.sha256(f"{image_id}{p['mid']}".encode()).hexdigest()[:8]
        mask_path = f"{mask_stem(image_id, p['mid'], box_id)}.png"
        s = MASK_LONG_SIDE / max(h, w)
        big = cv2.resize(mask.astype(np.uint8) * 255, (round(w * s), round(h * s)), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(OI / "validation-masks" / mask_path), big, [cv2.IMWRITE_PNG_BILEVEL, 1])
        coords = [f"{v:.6f}" for v in box]
        seg.append([mask_path, image_id, p["mid"], box_id, *coords, "", ""])
        boxes.append([image_id, "xclick", p["mid"], "1", *coords, "0", str(p["truncated"]), "0", "0", "0"])
        data = jpg.read_bytes()
        images.append([image_id, "validation", "", p["landing"], p["license"], "", p["author"], p["title"],
                       str(len(data)), base64.b64encode(hashlib.md5(data).digest()).decode(), "", "0.0"])
        if args.preview:
            ov = img.copy()
            ov[~mask] = (ov[~mask] * 0.25).astype(np.uint8)
            cnts, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(ov, cnts, -1, (0, 255, 0), 1)
            Path(args.preview).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(Path(args.preview) / f"{p['name'].replace(' ', '_').lower()}.png"), ov)

    def csv(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
        lines = ([",".join(header)] if header else []) + [",".join(r) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    from bitlab.ooc.openimages import BOX_COLUMNS, IMAGE_COLUMNS, SEG_COLUMNS

    names = {p["mid"]: p["name"] for p in PHOTOS.values()} | OTHER_CLASSES
    # no header, as upstream
    csv(OI / "class-descriptions-boxable.csv", None, [[m, n] for m, n in sorted(names.items())])
    csv(OI / "validation-annotations-object-segmentation.csv", list(SEG_COLUMNS), sorted(seg))
    csv(OI / "validation-annotations-bbox.csv", list(BOX_COLUMNS), sorted(boxes))
    csv(OI / "validation-images-with-rotation.csv", list(IMAGE_COLUMNS), sorted(images))

    import skimage

    data_dir = Path(skimage.__file__).parent / "data"
    rows = []
    for cat, name, title, author, landing, lic, lic_url in BACKGROUNDS:
        dest = HERE / "backgrounds" / cat / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir / name, dest)
        img = cv2.imread(str(dest))
        rows.append({"category": cat, "file": f"{cat}/{name}", "uid": f"{cat}_skimage",
                     "sha256": hashlib.sha256(dest.read_bytes()).hexdigest(), "width": img.shape[1],
                     "height": img.shape[0], "title": title, "author": author, "landing_url": landing,
                     "license": lic, "license_url": lic_url,
                     "provider": f"scikit-image {skimage.__version__} wheel (skimage/data/{name})"})
    write_table(HERE / "backgrounds" / "backgrounds.csv", BACKGROUND_FILE_COLUMNS, rows)
    write_table(HERE / "background_categories.csv", ["category", "search_terms", "description"],
                [{"category": c, "search_terms": c.replace("_", " "), "description": "sample (scikit-image wheel)"}
                 for c, *_ in BACKGROUNDS])
    select.plan(select.PlanConfig(
        out=str(HERE / "selection.csv"), openimages=str(OI), backgrounds=str(HERE / "backgrounds"),
        classes=str(HERE / "classes.csv"), background_categories=str(HERE / "background_categories.csv"),
        filters=AnnotationFilter(min_predicted_iou=0.0, allow_truncated=True)))


if __name__ == "__main__":
    main()
