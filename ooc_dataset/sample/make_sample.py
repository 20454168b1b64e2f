"""How the embedded OOC sample was made (a maintainer's tool; its outputs are committed, `make demo`
never runs it).

    apt-get install -y --no-install-recommends tuxpaint-stamps-default tuxpaint-data mate-backgrounds
    PYTHONPATH=. python ooc_dataset/sample/make_sample.py [--preview DIR]

Run it from the repository root with the Debian packages in PACKAGES installed (Debian 12 versions
below; another version stops the script unless `--allow-other-versions`) and scikit-image (for the
Hubble Deep Field). It rewrites everything in ooc_dataset/sample/ except README-type files
(NOTICE.md) and this script:

- `openimages/`: an OpenImages-layout tree (class list, segmentation / box / image CSVs, masks,
  photos) around nine real photographs of objects of the paper's classes (FOREGROUNDS):
  - eight Tux Paint stamps, photos that Tux Paint ships cut out (RGBA PNG, 90-500 px). The "photo"
    written to `validation/<ImageID>.jpg` is the stamp exactly as make-ooc pastes objects (longest
    side 410 px, 80% of a 512 px square, resampled as `compose.make_cutout` does), alpha-blended
    onto flat grey (128): the object's neutral version, which differs from the composites only in
    the background. Its mask is the alpha channel, scaled alike, at one half (>= 128);
  - one Tux Paint template, a photo of a lighthouse against a clear sky, copied byte for byte
    (the object in its own context). Its mask is every pixel that is not sky blue (HSV hue 96-129,
    saturation > 60), opened with a 3x3 square, components under 2000 px dropped and holes under
    400 px filled; checked by eye with `--preview`. The tower runs out of the frame: IsTruncated=1.
  Masks are stored like upstream ones: 1-bit PNGs with a long side of 1600 px (bilinear, at one
  half), another resolution than the photo's, so the sample's builds resize them as real ones.
  PredictedIoU is empty (no annotation model scored these masks) and the images CSV carries the
  bitlab column `AnnotationsLicense` (the masks' licence: that of the photo they come from).
- `backgrounds/<category>/`: twelve colour scene photos (BACKGROUNDS) from tuxpaint-data,
  mate-backgrounds and scikit-image, resized (area) so that the shorter side is at most 512 px
  (make-ooc's --size) and saved as JPEG (quality 90); `backgrounds.csv` holds each one's origin.
- `classes.csv` and `background_categories.csv`: the rows of ooc_dataset/classes.csv and
  ooc_dataset/backgrounds.csv for what the sample holds (with `n_foregrounds` counted here).
- `SOURCES.csv`: one row per committed data file: source package and version, original file and its
  sha256, author, licence, what was done to it. `COPYING.GPL-2`: the GPL version 2 text (Debian's
  /usr/share/common-licenses/GPL-2), as the GPL asks of whoever passes such files on.
- `selection.csv` / `selection.json`: `make-ooc plan` on the tree above, with the limits this
  sample needs (no PredictedIoU, the truncated lighthouse, a 448 x 376 reef photo).

How the objects and backgrounds were chosen: measured, not guessed. The candidates were every
photographic stamp of a paper class (12: three penguins, two tigers, three armoured vehicles, a
zebra, a sea lion, an ostrich, a teddy bear; plus the lighthouse photo) and 35 scenes (the 19
Tux Paint templates, the 12 MATE nature photos, two Tux Paint starters, the Hubble field,
scikit-learn's china.jpg; the lighthouse and sheep templates show objects, so they were not
eligible). Each pair was composited with make-ooc's geometry and classified by the offline
EfficientNet-Lite0, -Lite1 and -Lite2. The sample keeps objects that Lite0 gets right alone and wrong on some scenes (sea lion,
penguin, ostrich, teddy bear, the Stryker) beside objects it gets right almost everywhere (zebra,
tiger, lighthouse, the Bradley), and one scene per category for twelve categories, among them
scenes that fool it (ocean, maize field, flowers) and scenes that do not (storm sky, outer space).
Chosen to show the effect, its numbers illustrate it; they estimate nothing.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from bitlab.ooc import compose, select
from bitlab.ooc.openimages import ANNOTATIONS_LICENSE_COLUMN, BOX_COLUMNS, IMAGE_COLUMNS, SEG_COLUMNS, AnnotationFilter
from bitlab.ooc.spec import BACKGROUND_FILE_COLUMNS, CLASS_COLUMNS, mask_stem, read_table, write_table

HERE = Path("ooc_dataset/sample")
OI = HERE / "openimages"
SPLIT = "validation"
PACKAGES = {"tuxpaint-stamps-default": "2022.06.04-1", "tuxpaint-data": "1:0.9.28-sdl2-1",
            "mate-backgrounds": "1.26.0-1"}
STAMPS = Path("/usr/share/tuxpaint/stamps")
TUXPAINT = Path("/usr/share/tuxpaint")
MATE = Path("/usr/share/backgrounds/mate")
GREY = 128  # the neutral backdrop of the flattened stamps
OBJECT_SCALE = 0.8  # object's longest side / canvas side, as make-ooc pastes objects (paper F.1)
CANVAS = 512  # make-ooc's --size: a stamp's photo is the object exactly as make-ooc pastes it
BACKGROUND_SIDE = 512  # make-ooc's --size: larger backgrounds gain nothing
MASK_LONG_SIDE = 1600  # OpenImages masks have a long edge of 1600 px, whatever the photo's size (reference §1.3)
GPL2 = "https://www.gnu.org/licenses/old-licenses/gpl-2.0.html"
PDM = "https://creativecommons.org/publicdomain/mark/1.0/"
TUXPAINT_URL = "https://tuxpaint.org/"
MATE_URL = "https://git.mate-desktop.org/mate-backgrounds/"
# Debian's copyright file of tuxpaint-stamps-default gives every stamp as "2002-2022 by Bill Kendrick",
# GPL-2 ("version 2 of the License, or (at your option) any later version"); the package changelog
# credits each stamp's maker, quoted in `credit`.
STAMPS_LICENSE = "GPL-2 or later (tuxpaint-stamps-default: Files: *, Copyright: 2002-2022 Bill Kendrick)"


@dataclass(frozen=True)
class Source:
    key: str
    package: str
    path: Path
    title: str
    author: str
    license: str
    license_url: str
    landing: str


@dataclass(frozen=True)
class Object(Source):
    cls: str = ""  # OpenImages display name, a row of ooc_dataset/classes.csv
    mask: str = "alpha"  # "alpha": the stamp's alpha channel; "sky": everything not sky blue


@dataclass(frozen=True)
class Scene(Source):
    category: str = ""  # a row of ooc_dataset/backgrounds.csv


def _stamp(key: str, rel: str, cls: str, title: str, credit: str) -> Object:
    return Object(key, "tuxpaint-stamps-default", STAMPS / rel, title, credit, STAMPS_LICENSE, GPL2, TUXPAINT_URL,
                  cls=cls)


FOREGROUNDS = [
    _stamp("zebra", "animals/mammals/equines/zebra.png", "Zebra", "A zebra (Tux Paint stamp)",
           "Tux Paint (changelog: a zebra among Bill Kendrick's San Francisco Zoo photos, 2005, and among the "
           "stamps imported from Childsplay, 2007; zebra.png updated by Pere Pujal i Carabantes, 2008)"),
    _stamp("sea_lion", "animals/mammals/aquatic/sea_lion.png", "Sea lion", "A sea lion (Tux Paint stamp)",
           "Tux Paint (changelog: imported from Childsplay, Stas Zytkiewicz, adapted by Pere Pujal i Carabantes, "
           "2007-2008)"),
    _stamp("penguin", "animals/birds/penguin.png", "Penguin", "A penguin (Tux Paint stamp)",
           "Tux Paint (changelog: imported from Childsplay, Stas Zytkiewicz, adapted by Pere Pujal i Carabantes, "
           "2007-2008)"),
    _stamp("ostrich", "animals/birds/ostrich.png", "Ostrich", "An ostrich (Tux Paint stamp)",
           "Bill Kendrick (changelog: birds from the San Francisco Zoo, 2005)"),
    _stamp("tiger", "animals/mammals/cats/tiger.png", "Tiger", "A tiger (Tux Paint stamp)",
           "Tux Paint (changelog: imported from Childsplay, Stas Zytkiewicz, adapted by Pere Pujal i Carabantes, "
           "2007-2008)"),
    _stamp("teddy_bear", "animals/mammals/bears/toys/edward_bear.png", "Teddy bear",
           "Edward bear, a teddy bear (Tux Paint stamp)", "Jim Trice (changelog: toy dolls, 2006)"),
    _stamp("tank_stryker", "military/vehicles/infantry-stryker.png", "Tank",
           "A Stryker armoured vehicle (Tux Paint stamp)", "Albert Cahalan (changelog: tanks, 2005)"),
    _stamp("tank_bradley", "military/vehicles/bradley.png", "Tank",
           "An M-3 Bradley fighting vehicle (Tux Paint stamp)", "Albert Cahalan (changelog: tanks, 2005)"),
    Object("lighthouse", "tuxpaint-data", TUXPAINT / "templates/lighthouse.jpg", "Lighthouse (Tux Paint template)",
           "Bill Kendrick", "GPL-2 or later (tuxpaint-data: Files: *)", GPL2, TUXPAINT_URL, cls="Lighthouse",
           mask="sky"),
]
_TEMPLATE = dict(package="tuxpaint-data", author="Bill Kendrick", license="GPL-2 or later (tuxpaint-data: Files: *)",
                 license_url=GPL2, landing=TUXPAINT_URL)
_MATE = dict(package="mate-backgrounds", license="GPL-2 or later (mate-backgrounds copyright)", license_url=GPL2,
             landing=MATE_URL)
BACKGROUNDS = [
    Scene("reef", "tuxpaint-data", TUXPAINT / "starters/reef-back.png",
          "Coral reef (NOAA image reef2583, The Coral Kingdom Collection; a Tux Paint starter)",
          "Thomas K. Gibson, Florida Keys National Marine Sanctuary (NOAA)",
          "public domain (NOAA; tuxpaint-data's AUTHORS.txt)", PDM, "http://www.photolib.noaa.gov/",
          category="underwater"),
    Scene("ocean_waves", path=TUXPAINT / "templates/ocean_waves.jpg", title="Ocean waves (Tux Paint template)",
          category="beach", **_TEMPLATE),
    Scene("mossy_bark", path=TUXPAINT / "templates/mossy_bark.jpg", title="Mossy bark (Tux Paint template)",
          category="wood", **_TEMPLATE),
    Scene("trees_above", path=TUXPAINT / "templates/trees_above.jpg", title="Trees above (Tux Paint template)",
          category="forest", **_TEMPLATE),
    Scene("cliff", path=TUXPAINT / "templates/cliff.jpg", title="Cliff (Tux Paint template)",
          category="mountain", **_TEMPLATE),
    Scene("rocks", path=TUXPAINT / "templates/rocks.jpg", title="Rocks (Tux Paint template)",
          category="gravel", **_TEMPLATE),
    Scene("corn_maze", path=TUXPAINT / "templates/corn_maze.jpg", title="Corn maze (Tux Paint template)",
          category="wheat_field", **_TEMPLATE),  # a maize field: the nearest of the 41 categories
    Scene("storm", path=MATE / "nature/Storm.jpg", title="Storm (MATE desktop background)",
          author="Sergey Nazarov", category="sky_clouds", **_MATE),
    Scene("green_meadow", path=MATE / "nature/GreenMeadow.jpg", title="Green meadow (MATE desktop background)",
          author="Timothy Schellhase, Lapo Calamandrei", category="grass", **_MATE),
    Scene("fresh_flower", path=MATE / "nature/FreshFlower.jpg", title="Fresh flower (MATE desktop background)",
          author="Jens Ansorg", category="flower_meadow", **_MATE),
    Scene("dune", path=MATE / "nature/Dune.jpg", title="Dune (MATE desktop background)",
          author="Marco Cogoni, Hylke Bons", category="sand_dunes", **_MATE),
    Scene("hubble_deep_field", "scikit-image", Path("skimage/data/hubble_deep_field.jpg"),
          "Hubble eXtreme Deep Field", "NASA", "public domain (NASA)", PDM,
          "http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/", category="outer_space"),
]


# ----------------------------------------------------------------------------- sources
def package_version(package: str) -> str:
    if package == "scikit-image":
        import skimage

        return skimage.__version__
    res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{package} is not installed: apt-get install -y --no-install-recommends {package}")
    return res.stdout.strip()


def source_file(src: Source) -> Path:
    if src.package == "scikit-image":
        import skimage

        return Path(skimage.__file__).parent.parent / src.path
    return src.path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- objects
def flatten_stamp(rgba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stamp as make-ooc pastes objects (longest side 80% of a 512 px square, resampled as
    `compose.make_cutout` does: area when shrinking, bilinear when enlarging) on flat grey, and its
    mask there (alpha >= 128). Blended onto grey before scaling, so that the edges mix with grey
    and never with the colour a transparent pixel happens to hold."""
    ys, xs = np.nonzero(rgba[..., 3] >= 128)
    crop = rgba[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    a = crop[..., 3:4].astype(np.float32) / 255
    flat = np.rint(crop[..., :3] * a + GREY * (1 - a)).astype(np.uint8)
    h, w = crop.shape[:2]
    side = compose.object_side(CANVAS, OBJECT_SCALE)
    ow, oh = (side, max(1, round(h * side / w))) if w >= h else (max(1, round(w * side / h)), side)
    how = cv2.INTER_AREA if ow * oh < w * h else cv2.INTER_LINEAR
    canvas = np.full((CANVAS, CANVAS, 3), GREY, np.uint8)
    mask = np.zeros((CANVAS, CANVAS), bool)
    top, left = (CANVAS - oh) // 2, (CANVAS - ow) // 2
    canvas[top:top + oh, left:left + ow] = cv2.resize(flat, (ow, oh), interpolation=how)
    alpha = cv2.resize(np.ascontiguousarray(crop[..., 3]), (ow, oh), interpolation=how)
    mask[top:top + oh, left:left + ow] = alpha >= 128
    return canvas, mask


def sky_mask(bgr: np.ndarray) -> np.ndarray:
    """Everything that is not clear blue sky (OpenCV hue 0-179), cleaned of specks and pinholes."""
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    sky = (hsv[..., 0] > 95) & (hsv[..., 0] < 130) & (hsv[..., 1] > 60)
    fg = cv2.morphologyEx((~sky).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    keep = np.isin(labels, [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= 2000])
    n, labels, stats, _ = cv2.connectedComponentsWithStats((~keep).astype(np.uint8), connectivity=4)
    return keep | np.isin(labels, [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] < 400])


def write_objects(mids: dict[str, str], versions: dict[str, str], preview: Path | None) -> list[dict]:
    """Photos, masks and the three annotation CSVs; returns SOURCES rows."""
    for sub in (SPLIT, f"{SPLIT}-masks"):
        shutil.rmtree(OI / sub, ignore_errors=True)
        (OI / sub).mkdir(parents=True)
    seg, boxes, images, sources = [], [], [], []
    for obj in FOREGROUNDS:
        src = source_file(obj)
        image_id = hashlib.sha256(f"{obj.package}:{obj.path}".encode()).hexdigest()[:16]
        mid = mids[obj.cls]
        jpg = OI / SPLIT / f"{image_id}.jpg"
        if obj.mask == "alpha":
            photo, mask = flatten_stamp(cv2.imread(str(src), cv2.IMREAD_UNCHANGED))
            cv2.imwrite(str(jpg), photo, [cv2.IMWRITE_JPEG_QUALITY, 95])
            done = (f"alpha-blended onto grey {GREY}, scaled to a longest side of "
                    f"{compose.object_side(CANVAS, OBJECT_SCALE)} px, centred on a {CANVAS} px square, JPEG quality 95")
            mask_how = "the stamp's alpha channel, scaled with the photo, >= 128"
        else:
            shutil.copyfile(src, jpg)
            photo = cv2.imread(str(jpg))
            mask = sky_mask(photo)
            done, mask_how = "copied unchanged", "not sky blue (make_sample.sky_mask), checked by eye"
        h, w = mask.shape
        ys, xs = np.nonzero(mask)
        coords = [f"{v:.6f}" for v in (xs.min() / w, (xs.max() + 1) / w, ys.min() / h, (ys.max() + 1) / h)]
        truncated = int(xs.min() == 0 or ys.min() == 0 or xs.max() == w - 1 or ys.max() == h - 1)
        box_id = hashlib.sha256(f"{image_id}{mid}".encode()).hexdigest()[:8]
        mask_path = f"{mask_stem(image_id, mid, box_id)}.png"
        png = OI / f"{SPLIT}-masks" / mask_path
        k = MASK_LONG_SIDE / max(h, w)
        # Bilinear then at one half: smoother at 1600 px, and closer to the photo-sized mask once
        # make-ooc resizes it back (nearest) than a nearest upscale (726 vs 1334 edge pixels of 52k).
        big = cv2.resize(mask.astype(np.uint8) * 255, (round(w * k), round(h * k)), interpolation=cv2.INTER_LINEAR)
        cv2.imwrite(str(png), np.where(big >= 128, 255, 0).astype(np.uint8), [cv2.IMWRITE_PNG_BILEVEL, 1])
        seg.append([mask_path, image_id, mid, box_id, *coords, "", ""])
        boxes.append([image_id, "xclick", mid, "1", *coords, "0", str(truncated), "0", "0", "0"])
        data = src.read_bytes()  # OpenImages' OriginalSize / OriginalMD5 describe the original file
        images.append({"ImageID": image_id, "Subset": SPLIT, "OriginalURL": "", "OriginalLandingURL": obj.landing,
                       "License": obj.license_url, "AuthorProfileURL": "", "Author": obj.author,
                       "Title": f"{obj.title}, {obj.package} {versions[obj.package]}", "OriginalSize": len(data),
                       "OriginalMD5": base64.b64encode(hashlib.md5(data).digest()).decode(),
                       "Thumbnail300KURL": "", "Rotation": "0.0",
                       ANNOTATIONS_LICENSE_COLUMN: f"{obj.license}; mask: {mask_how}"})
        for file, what, how in ((jpg, "foreground photo", done), (png, "foreground mask", mask_how)):
            sources.append(_source_row(file, what, obj, versions, src, how))
        if preview:
            _preview(preview / f"{obj.key}.png", photo, mask)

    def csv(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
        lines = ([",".join(header)] if header else []) + [",".join(r) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    csv(OI / f"{SPLIT}-annotations-object-segmentation.csv", list(SEG_COLUMNS), sorted(seg))
    csv(OI / f"{SPLIT}-annotations-bbox.csv", list(BOX_COLUMNS), sorted(boxes))
    write_table(OI / f"{SPLIT}-images-with-rotation.csv", [*IMAGE_COLUMNS, ANNOTATIONS_LICENSE_COLUMN],
                sorted(images, key=lambda r: r["ImageID"]))
    return sources


def _preview(path: Path, photo: np.ndarray, mask: np.ndarray) -> None:
    """The photo darkened outside the mask, the mask's outline in green: to check it by eye."""
    out = photo.copy()
    out[~mask] = (out[~mask] * 0.25).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (0, 255, 0), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), out)


def _source_row(file: Path, what: str, src: Source, versions: dict[str, str], original: Path, how: str) -> dict:
    return {"file": file.relative_to(HERE).as_posix(), "what": what, "package": src.package,
            "package_version": versions[src.package], "original_file": str(src.path),
            "original_sha256": sha256(original), "title": src.title, "author": src.author, "license": src.license,
            "license_url": src.license_url, "made_by": how}


# ----------------------------------------------------------------------------- backgrounds
def write_backgrounds(versions: dict[str, str]) -> list[dict]:
    root = HERE / "backgrounds"
    shutil.rmtree(root, ignore_errors=True)
    rows, sources = [], []
    for scene in BACKGROUNDS:
        src = source_file(scene)
        img = cv2.imread(str(src))
        h, w = img.shape[:2]
        s = min(1.0, BACKGROUND_SIDE / min(h, w))
        if s < 1:
            img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        dest = root / scene.category / f"{scene.key}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(dest), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        how = (f"resized from {w} x {h} to {img.shape[1]} x {img.shape[0]} (area), " if s < 1 else "") + \
            "JPEG quality 90"
        provider = f"{scene.package} {versions[scene.package]}"
        rows.append({"category": scene.category, "file": dest.relative_to(root).as_posix(),
                     "uid": f"{scene.category}_{scene.key}", "sha256": sha256(dest), "width": img.shape[1],
                     "height": img.shape[0], "title": scene.title, "author": scene.author, "author_url": "",
                     "landing_url": scene.landing, "license": scene.license, "license_url": scene.license_url,
                     "provider": provider, "source_id": str(scene.path), "search_terms": "",
                     "attribution": f'"{scene.title}" by {scene.author}, {scene.license}; {how} by bitlab'})
        sources.append(_source_row(dest, "background", scene, versions, src, how))
    write_table(root / "backgrounds.csv", BACKGROUND_FILE_COLUMNS, rows)
    return sources


# ----------------------------------------------------------------------------- tables
def write_tables() -> dict[str, str]:
    """classes.csv, background_categories.csv and the class list from the full set's tables;
    returns display name -> MID of the sample's classes."""
    full_classes = [row for _, row in read_table(HERE.parent / "classes.csv", CLASS_COLUMNS[:5])]
    counts = {c: sum(o.cls == c for o in FOREGROUNDS) for c in dict.fromkeys(o.cls for o in FOREGROUNDS)}
    rows = [{**r, "n_foregrounds": counts[r["name"]]} for r in full_classes if r["name"] in counts]
    missing = set(counts) - {r["name"] for r in rows}
    if missing:
        raise SystemExit(f"{HERE.parent / 'classes.csv'} has no row for {sorted(missing)}")
    write_table(HERE / "classes.csv", CLASS_COLUMNS, rows)
    cats = {s.category for s in BACKGROUNDS}
    columns = ["category", "search_terms", "description", "usual_for"]
    write_table(HERE / "background_categories.csv", columns,
                [r for _, r in read_table(HERE.parent / "backgrounds.csv", columns) if r["category"] in cats])
    # Like upstream's file: every class of the full table (no header), not only the sample's.
    (OI / "class-descriptions-boxable.csv").write_text(
        "".join(f"{r['mid']},{r['name']}\n" for r in sorted(full_classes, key=lambda r: r["mid"])), encoding="utf-8")
    return {r["name"]: r["mid"] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preview", type=Path, help="folder for mask previews (PNG) to check the masks by eye")
    ap.add_argument("--allow-other-versions", action="store_true",
                    help="make the sample from other package versions than the committed one was made from")
    args = ap.parse_args()
    versions = {p: package_version(p) for p in [*PACKAGES, "scikit-image"]}
    other = {p: v for p, v in versions.items() if p in PACKAGES and v != PACKAGES[p]}
    if other and not args.allow_other_versions:
        raise SystemExit(f"installed {other}, the committed sample was made from {PACKAGES}: "
                         "pass --allow-other-versions to remake it anyway")
    OI.mkdir(parents=True, exist_ok=True)
    mids = write_tables()
    sources = write_objects(mids, versions, args.preview) + write_backgrounds(versions)
    write_table(HERE / "SOURCES.csv", list(sources[0]), sources)
    shutil.copyfile("/usr/share/common-licenses/GPL-2", HERE / "COPYING.GPL-2")
    select.plan(select.PlanConfig(
        out=str(HERE / "selection.csv"), openimages=str(OI), backgrounds=str(HERE / "backgrounds"),
        classes=str(HERE / "classes.csv"), background_categories=str(HERE / "background_categories.csv"),
        filters=AnnotationFilter(min_predicted_iou=0.0, allow_truncated=True), **SAMPLE_PLAN_LIMITS))


# The sample's own limit for `make-ooc plan` (tests/ooc/test_select.py replans with it): the
# 448 x 376 reef photo, upsampled at --size 512.
SAMPLE_PLAN_LIMITS = {"min_background_px": 360}

if __name__ == "__main__":
    main()
