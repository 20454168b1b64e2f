"""A tiny out-of-context set built from real photos, in make-ooc's layout (manifest + class folders)."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

# Class table rows (make-ooc's classes.csv columns): the ILSVRC synsets each photo's object counts as.
CLASSES = [
    # name, folder, mid, wnids, indices
    ("Cat", "cat", "/m/01yrx", "n02123045;n02123159;n02124075", "281;282;285"),
    ("Coffee", "espresso", "/m/02vqfm", "n07920052", "967"),
    ("Rocket", "missile", "/m/09rvcxw", "n03773504;n04008634", "657;744"),
]
PHOTO_OF = {"cat": "chelsea", "espresso": "coffee", "missile": "rocket"}


def write_classes(path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "folder", "mid", "ilsvrc_wnids", "ilsvrc_indices"])
        w.writerows(CLASSES)
    return path


def backgrounds() -> dict[str, np.ndarray]:
    """Real CC0 texture photos from scikit-image (grey -> RGB), square."""
    import skimage.data as data

    grey = {"grass": data.grass(), "brick": data.brick(), "gravel": data.gravel()}
    return {k: np.repeat(v[..., None], 3, axis=2) for k, v in grey.items()}


def paste(fg: np.ndarray, bg: np.ndarray, side: int = 256) -> np.ndarray:
    """Paper F.1: largest top-left square of the background; object's longest side = 80% of it."""
    s = min(bg.shape[:2])
    canvas = cv2.resize(np.ascontiguousarray(bg[:s, :s]), (side, side), interpolation=cv2.INTER_AREA)
    scale = 0.8 * side / max(fg.shape[:2])
    h, w = round(fg.shape[0] * scale), round(fg.shape[1] * scale)
    obj = cv2.resize(fg, (w, h), interpolation=cv2.INTER_AREA)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = obj
    return canvas


def build_tiny_ooc(out: Path, photos: dict[str, np.ndarray]) -> Path:
    """3 photos x (3 texture backgrounds + their own, in-context) = 12 PNGs, manifest.csv, classes.csv."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, folder, _mid, wnids, indices in CLASSES:
        fg = photos[PHOTO_OF[folder]]
        views = {"in-context": fg, **{k: paste(fg, bg) for k, bg in backgrounds().items()}}
        for bg_name, img in views.items():
            rel = f"{folder}/{PHOTO_OF[folder]}__{bg_name}.png"
            (out / folder).mkdir(exist_ok=True)
            cv2.imwrite(str(out / rel), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            rows.append({"file": rel, "sha256": "", "class": folder, "ilsvrc_wnids": wnids,
                         "ilsvrc_indices": indices, "fg_uid": PHOTO_OF[folder], "bg_category": bg_name,
                         "bg_uid": bg_name})
    with (out / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_classes(out / "classes.csv")
    return out


@pytest.fixture(scope="session")
def tiny_ooc(tmp_path_factory, photos) -> Path:
    return build_tiny_ooc(tmp_path_factory.mktemp("ooc") / "tiny_ooc", photos)
