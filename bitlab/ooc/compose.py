"""Geometry and blending of one OOC image, in pure numpy/OpenCV (BGR uint8 throughout).

The rules (paper appendix F.1, and what it leaves open, decided here):
- background: the largest square from its top-left corner, resized to `size` x `size`;
- foreground: the instance mask is resized to the photo's exact (W, H) with nearest neighbour
  (OpenImages masks have another resolution than their images, and scaling by a factor rounds
  differently: openimages/dataset issue #92); the object is the tight box of that mask;
- the object's longest side becomes `round(object_scale * size)` px (paper: 80% of the
  background width), the other side keeps the aspect ratio;
- placement: centred (the paper states none), or a seeded uniform position;
- blending: a hard 0/1 mask (the paper describes no blending); `erode` shrinks it by whole
  output pixels, `feather` blurs it with a Gaussian of that sigma (output pixels).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from bitlab.data.imagesize import imdecode
from bitlab.errors import BitlabError
from bitlab.ooc import png

# --png: how PNG output is encoded (all lossless: the manifest's pixel_sha256 is the same for each).
# 'fast' (default) is bitlab's writer (png.py: Up filter + ISA-L deflate), ~3x faster than OpenCV's
# fastest setting for files about as small as OpenCV's default (benchmarks/RESULTS.md, "make-ooc");
# 'opencv' is OpenCV's default (level 1, adaptive filters); 'small' is OpenCV at level 9, ~10%
# smaller at ~15x the time of 'opencv'.
PNG_SETTINGS: dict[str, list] = {
    "fast": ["bitlab-png", "up", "isal", png.LEVEL],
    "opencv": [cv2.IMWRITE_PNG_COMPRESSION, 1],
    "small": [cv2.IMWRITE_PNG_COMPRESSION, 9],
}

# PNG is lossless (the default: pixels are exactly the composite). JPEG encodes ~10x faster and
# is ~4x smaller at quality 95, at the price of compression artefacts on the pasted edges.
FORMATS = ("png", "jpg")
PLACEMENTS = ("center", "random")


class BadInputError(BitlabError):
    """An input image or mask that cannot be used (unreadable, empty mask...)."""


# ----------------------------------------------------------------------------- decoding
def decode(path: str | os.PathLike, *, upright: bool = True) -> np.ndarray:
    """Read an image as BGR uint8 HxWx3 (grey and alpha inputs converted).

    `upright=False` keeps the stored pixel grid and ignores an EXIF orientation tag: OpenImages
    masks and boxes refer to the stored pixels, so foreground photos are read that way.
    """
    flags = cv2.IMREAD_COLOR if upright else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    img = imdecode(_read(path), flags, str(path), BadInputError)  # refuses absurd sizes before allocating
    if img is None:
        raise BadInputError(f"{path}: cannot decode image (corrupt or not an image)")
    return img


def decode_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a binary mask PNG as bool HxW. OpenImages masks are 0/255 (FiftyOne thresholds at
    122 after a grey conversion); masks saved as 0/1 are accepted too."""
    m = imdecode(_read(path), cv2.IMREAD_GRAYSCALE, str(path), BadInputError)
    if m is None:
        raise BadInputError(f"{path}: cannot decode mask (corrupt or not an image)")
    return m > (127 if m.max() > 1 else 0)


def _read(path: str | os.PathLike) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except (FileNotFoundError, IsADirectoryError):
        raise BadInputError(f"{path}: no such file") from None
    if not data.size:
        raise BadInputError(f"{path}: empty file")
    return data


def mask_to_image(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a bool mask to the image's exact (width, height), nearest neighbour."""
    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask.view(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), end-exclusive, of the True pixels; None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not rows.size:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """INTER_AREA when shrinking (anti-aliased), INTER_LINEAR when enlarging."""
    if (width, height) == (img.shape[1], img.shape[0]):
        return img
    shrink = width * height < img.shape[0] * img.shape[1]
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


# ----------------------------------------------------------------------------- the two inputs
def prepare_background(img: np.ndarray, size: int) -> np.ndarray:
    """The largest square from the top-left corner (paper F.1), resized to size x size."""
    side = min(img.shape[:2])
    return np.ascontiguousarray(_resize(img[:side, :side], size, size))


@dataclass(frozen=True)
class Cutout:
    """A foreground object at output scale: pixels, alpha (0..255) and where it came from."""

    bgr: np.ndarray  # h x w x 3 uint8
    alpha: np.ndarray  # h x w uint8; 0/255 for a hard mask
    box_src: tuple[int, int, int, int]  # tight box in the source photo (x0, y0, x1, y1)
    scale: float  # output px per source px
    hard: bool

    @property
    def size(self) -> tuple[int, int]:
        return self.bgr.shape[1], self.bgr.shape[0]

    def visible_box(self) -> tuple[int, int, int, int] | None:
        """Tight box of alpha > 0 inside the cutout (what a viewer sees of the object)."""
        return tight_box(self.alpha > 0)


def object_side(size: int, object_scale: float) -> int:
    """Longest side of the pasted object in output px: `object_scale` of the background side."""
    return max(1, round(object_scale * size))


def make_cutout(image: np.ndarray, mask: np.ndarray, *, size: int, object_scale: float = 0.8,
                erode: int = 0, feather: float = 0.0) -> Cutout:
    """Cut the object out of `image` (mask already at the image's size) and scale it so its
    longest side is `object_side(size, object_scale)` px."""
    box = tight_box(mask)
    if box is None:
        raise BadInputError("empty mask")
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    side = object_side(size, object_scale)
    scale = side / max(bw, bh)
    # The longest side is exactly `side`; the other is rounded, never 0.
    ow, oh = (side, max(1, round(bh * scale))) if bw >= bh else (max(1, round(bw * scale)), side)
    bgr = _resize(image[y0:y1, x0:x1], ow, oh)
    # The mask is resampled like the pixels (area/linear) and thresholded at one half, so that
    # its edge follows the object's edge at the new scale rather than nearest-neighbour steps.
    alpha = _resize(mask[y0:y1, x0:x1].astype(np.uint8) * np.uint8(255), ow, oh)
    alpha = np.where(alpha >= 128, np.uint8(255), np.uint8(0))
    if erode > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * erode + 1, 2 * erode + 1))
        alpha = cv2.erode(alpha, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    if feather > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigmaX=feather, sigmaY=feather, borderType=cv2.BORDER_CONSTANT)
    return Cutout(np.ascontiguousarray(bgr), np.ascontiguousarray(alpha), box, scale, hard=feather <= 0)


def paste_position(size: int, cutout_size: tuple[int, int], placement: str = "center",
                   key: str = "") -> tuple[int, int]:
    """Top-left (x, y) of the object. 'center': centred (odd leftovers go right/below);
    'random': uniform over all positions that keep it inside, fixed by `key` (seed + ids)."""
    w, h = cutout_size
    if placement == "center":
        return (size - w) // 2, (size - h) // 2
    if placement == "random":
        digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
        return digest % (size - w + 1), (digest >> 32) % (size - h + 1)
    raise BitlabError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")


def composite(background: np.ndarray, cutout: Cutout, xy: tuple[int, int]) -> np.ndarray:
    """A new image: `cutout` over `background` at `xy`."""
    out = background.copy()
    x, y = xy
    w, h = cutout.size
    region = out[y:y + h, x:x + w]
    if cutout.hard:  # OpenCV's masked copy: ~30x faster than numpy's copyto(where=) here
        cv2.copyTo(cutout.bgr, cutout.alpha, region)
    else:  # integer alpha blend, rounded: deterministic everywhere
        a = cutout.alpha[:, :, None].astype(np.uint16)
        region[:] = ((cutout.bgr * a + region * (255 - a) + 127) // 255).astype(np.uint8)
    return out


def encode(img: np.ndarray, fmt: str = "png", *, png_setting: str = "fast", jpeg_quality: int = 95) -> bytes:
    """Encode a BGR image as PNG (lossless; `png_setting` picks the speed/size trade-off) or JPEG."""
    if fmt not in FORMATS:
        raise BitlabError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "png" and png_setting == "fast":
        return png.encode_bgr(img)
    params = PNG_SETTINGS[png_setting] if fmt == "png" else [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
    ok, buf = cv2.imencode(f".{fmt}", img, params)
    if not ok:
        raise BitlabError(f"OpenCV could not encode a {fmt.upper()} image")
    return buf.tobytes()


def pixel_sha256(bgr: np.ndarray) -> str:
    """sha256 of the RGB uint8 HxWx3 pixels in C order: survives re-encoding the PNG."""
    return hashlib.sha256(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).data).hexdigest()


def load_foreground(image_path: str | os.PathLike, mask_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A foreground photo (stored pixel grid) and its mask at the photo's exact size."""
    image = decode(image_path, upright=False)
    mask = mask_to_image(decode_mask(mask_path), image.shape[1], image.shape[0])
    if not mask.any():
        raise BadInputError(f"{Path(mask_path)}: the mask is empty")
    return image, mask
