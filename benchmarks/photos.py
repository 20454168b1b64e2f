"""Benchmark inputs: distinct JPEGs cut from real photos (scikit-learn's two and the embedded sample's)."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitlab.data.transforms import decode_image  # noqa: E402
from bitlab.paths import SAMPLE_DIR  # noqa: E402


def make_jpegs(root: Path, n: int, classes: int = 4, longest: int = 500) -> Path:
    """`n` distinct JPEGs (random crops, longest side `longest`, quality 90) as `root/c<k>/`."""
    import sklearn.datasets

    sources = [Path(sklearn.datasets.__file__).parent / "images" / f for f in ("china.jpg", "flower.jpg")]
    sources += sorted((SAMPLE_DIR / "openimages" / "validation").glob("*.jpg"))
    photos = [decode_image(p) for p in sources]
    rng = np.random.default_rng(0)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        scale = longest / max(ch, cw)
        crop = cv2.resize(img[top:top + ch, left:left + cw], (round(cw * scale), round(ch * scale)),
                          interpolation=cv2.INTER_AREA)
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return root
