"""Image pre-processing with OpenCV: decode, resize, crop, flip, normalise.

Workers return uint8 CHW tensors (4x less to move between processes than float32), normalised
once per batch with `normalize` (on the GPU when there is one); BiT models take RGB in [-1, 1].
Shrinking is anti-aliased (like PIL's bilinear resize in the official code): JPEGs are decoded at
1/2, 1/4 or 1/8 size when the next resize allows it, then halved with a Gaussian pyramid and
finished bilinearly (`resize`); enlarging is bilinear.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from bitlab.data.imagesize import imdecode, jpeg_size
from bitlab.errors import BitlabError

# Keep OpenCV from spawning its own thread pool inside every DataLoader worker.
cv2.setNumThreads(1)

BIT_MEAN = (0.5, 0.5, 0.5)  # [0, 1] -> [-1, 1]
BIT_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BadImageError(BitlabError):
    """An image file that cannot be decoded."""


@dataclass(frozen=True)
class DataConfig:
    """How a model wants its input: size, normalisation and evaluation resize.

    `crop_pct == 1.0` is BiT's evaluation: squash-resize the whole image to `input_size`
    (no centre crop). Below 1.0 (timm models): resize the shorter side to
    `input_size / crop_pct`, then take the centre `input_size` square.
    """

    input_size: int = 224
    mean: tuple[float, float, float] = BIT_MEAN
    std: tuple[float, float, float] = BIT_STD
    crop_pct: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def decode_image(path: str | os.PathLike, min_side: int | None = None) -> np.ndarray:
    """Read an image file as RGB uint8 HxWx3; grey and RGBA inputs are converted.

    `min_side`: the caller only needs an image whose shorter side is at least this many pixels
    (it resizes down to it next). A JPEG that large by 2, 4 or 8 times is then decoded at that
    fraction directly (libjpeg's DCT scaling): 2-4x less decoding for the usual downscales, with
    the result anti-aliased like INTER_AREA. Other formats are decoded whole.
    """
    return decode_image_sizes(path, (min_side,))[0]


def decode_image_sizes(path: str | os.PathLike, min_sides: Sequence[int | None]) -> list[np.ndarray]:
    """`decode_image(path, min_side=m)` for each of `min_sides` (several models' views of one file):
    the file is read once and decoded once per distinct JPEG reduction, so each view gets exactly
    the pixels a decode of its own would give. The images may be shared: do not modify them."""
    data = np.fromfile(path, dtype=np.uint8) if Path(path).is_file() else None
    if data is None:
        raise BadImageError(f"{path}: no such image file")
    size = jpeg_size(data) if any(min_sides) else None
    flags = [_REDUCED.get(_reduction(size, m), cv2.IMREAD_COLOR) if m and size else cv2.IMREAD_COLOR
             for m in min_sides]
    decoded: dict[int, np.ndarray] = {}
    for flag in flags:
        if flag not in decoded:
            img = imdecode(data, flag, str(path), BadImageError)  # refuses absurd sizes before allocating them
            if img is None:
                raise BadImageError(f"{path}: cannot decode image (corrupt or not an image)")
            decoded[flag] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return [decoded[flag] for flag in flags]


_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _reduction(size: tuple[int, int], min_side: int) -> int:
    """The largest of 8, 4, 2 that keeps the shorter side at least `min_side` (1 if none)."""
    shorter = min(size)
    return next((r for r in (8, 4, 2) if -(-shorter // r) >= min_side), 1)


def resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize to `width` x `height`, anti-aliased when shrinking.

    Shrinking halves the image with `cv2.pyrDown` (a 5x5 Gaussian, then every other pixel) while
    it is at least twice the target both ways, then finishes bilinearly (under 2x, bilinear
    sampling does not alias). That is 5-10x faster than INTER_AREA on the CPU for the same
    anti-aliasing; INTER_AREA remains for the rare image still 2x too large one way only.
    """
    while img.shape[1] >= 2 * width and img.shape[0] >= 2 * height:
        img = cv2.pyrDown(img)
    if img.shape[1] == width and img.shape[0] == height:
        return img
    lopsided = img.shape[1] >= 2 * width or img.shape[0] >= 2 * height
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if lopsided else cv2.INTER_LINEAR)


def resize_shorter(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    scale = size / min(h, w)
    return resize(img, max(size, round(w * scale)), max(size, round(h * scale)))


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return img[top:top + size, left:left + size]


def eval_min_side(cfg: DataConfig) -> int:
    """The shorter side `eval_image` resizes to: what `decode_image(min_side=)` may decode down to."""
    return cfg.input_size if cfg.crop_pct >= 1.0 else int(cfg.input_size / cfg.crop_pct)


def eval_image(img: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """The evaluation view of an RGB image at `cfg`'s resolution (uint8 HxWx3)."""
    if cfg.crop_pct >= 1.0:
        return resize(img, cfg.input_size, cfg.input_size)
    return center_crop(resize_shorter(img, eval_min_side(cfg)), cfg.input_size)


@dataclass(frozen=True)
class TrainAugment:
    """BiT's training view: square resize to `resize`, random `crop` square, horizontal flip.

    Each step can be turned off for tasks where it breaks the labels or the geometry:
    `square_resize=False` keeps the aspect ratio (shorter side to `resize`), `random_crop=False`
    takes the centre crop, `flip=False` never mirrors (e.g. digits, text, left/right classes).
    """

    resize: int
    crop: int
    square_resize: bool = True
    random_crop: bool = True
    flip: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.crop <= self.resize:
            raise BitlabError(f"crop ({self.crop}) must be positive and at most the resize ({self.resize})")


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A `size` x `size` window at a uniformly random position (as torchvision's RandomCrop)."""
    h, w = img.shape[:2]
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return img[top:top + size, left:left + size]


def train_image(img: np.ndarray, aug: TrainAugment, rng: np.random.Generator) -> np.ndarray:
    """The training view of an RGB uint8 image (official bit_pytorch: Resize((p, p)) -> RandomCrop
    -> RandomHorizontalFlip). All randomness comes from `rng`, so a seeded rng gives the same view."""
    img = resize(img, aug.resize, aug.resize) if aug.square_resize else resize_shorter(img, aug.resize)
    img = random_crop(img, aug.crop, rng) if aug.random_crop else center_crop(img, aug.crop)
    if aug.flip and rng.random() < 0.5:
        img = img[:, ::-1]
    return img


def square_eval_image(img: np.ndarray, crop: int) -> np.ndarray:
    """The evaluation view during fine-tuning: resize the whole image to `crop` x `crop` (no centre
    crop), as the official trainer does."""
    return resize(img, crop, crop)


def to_chw_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> uint8 tensor 3xHxW (contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def normalize(batch: torch.Tensor, mean=BIT_MEAN, std=BIT_STD) -> torch.Tensor:
    """uint8 NCHW -> float NCHW: (x / 255 - mean) / std as x * a + b, in place on the one float copy
    (no temporaries: on a CPU this per-batch pass is memory-bound, 2-3x faster than the naive form)."""
    std_t = torch.tensor(std, device=batch.device, dtype=torch.float32).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, device=batch.device, dtype=torch.float32).view(1, -1, 1, 1)
    return batch.float().mul_(1.0 / (255.0 * std_t)).sub_(mean_t / std_t)


# ----------------------------------------------------------------------------- upstream (pre-training)
@dataclass(frozen=True)
class InceptionAugment:
    """BiT's upstream training view (paper §3.3, official issue #26): an Inception-style crop
    resized to `crop` x `crop`, then a random horizontal flip.

    The crop box is drawn as TF's `sample_distorted_bounding_box` draws it in big_vision's
    `inception_crop` (`inception_box`): 5-100 % of the area (5 %, not torchvision's 8 %) and TF's
    default aspect range 0.75-1.33 (width / height), no object to cover.
    """

    crop: int = 224
    area: tuple[float, float] = (0.05, 1.0)
    ratio: tuple[float, float] = (0.75, 1.33)  # TF's default, which big_vision keeps (not 4/3)
    flip: bool = True

    def __post_init__(self) -> None:
        if self.crop <= 0:
            raise BitlabError(f"crop must be positive, got {self.crop}")
        if not 0 < self.area[0] <= self.area[1] <= 1:
            raise BitlabError(f"crop area range must satisfy 0 < min <= max <= 1, got {self.area}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise BitlabError(f"crop aspect range must satisfy 0 < min <= max, got {self.ratio}")


# TF's sample_distorted_bounding_box tries this many boxes before falling back to the whole image.
INCEPTION_ATTEMPTS = 100


def inception_box(height: int, width: int, aug: InceptionAugment,
                  rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random box, drawn as TF draws it: per attempt an aspect ratio
    uniform in `aug.ratio`, then a height uniform over the whole pixels that keep the area in
    `aug.area` (so sizes are uniform in side length, not in area as in torchvision), the width
    rounded from it, and a uniform position. The whole image when no attempt fits."""
    lo_area, hi_area = aug.area[0] * height * width, aug.area[1] * height * width
    for _ in range(INCEPTION_ATTEMPTS):
        aspect = aug.ratio[0] + rng.random() * (aug.ratio[1] - aug.ratio[0])
        h = round(math.sqrt(lo_area / aspect))  # round: half to even, as TF's lrintf
        h_max = round(math.sqrt(hi_area / aspect))
        if round(h_max * aspect) > width:  # the tallest box whose rounded width still fits
            h_max = int((width + 0.5 - 1e-7) / aspect)
            if round(h_max * aspect) > width:
                h_max -= 1
        h_max = min(h_max, height)
        h = min(h, h_max)
        if h < h_max:
            h += int(rng.integers(0, h_max - h + 1))
        w = round(h * aspect)
        if w * h < lo_area:  # rounding left it just too small or too large: one pixel of slack
            h += 1
            w = round(h * aspect)
        if w * h > hi_area:
            h -= 1
            w = round(h * aspect)
        if lo_area <= w * h <= hi_area and 0 < w <= width and 0 < h <= height:
            # TF draws offsets in [0, H - h) (never the last one), and 0 for a full-height box
            top = int(rng.integers(0, height - h)) if h < height else 0
            left = int(rng.integers(0, width - w)) if w < width else 0
            return top, left, h, w
    return 0, 0, height, width


def inception_image(img: np.ndarray, aug: InceptionAugment, rng: np.random.Generator) -> np.ndarray:
    """The upstream training view of an RGB uint8 image: Inception crop -> resize to `aug.crop`
    square -> flip with probability 1/2. All randomness comes from `rng`."""
    top, left, h, w = inception_box(img.shape[0], img.shape[1], aug, rng)
    img = resize(img[top:top + h, left:left + w], aug.crop, aug.crop)
    if aug.flip and rng.random() < 0.5:
        img = img[:, ::-1]
    return img


# Upstream evaluation: shorter side to crop / 0.875 (256 for 224), centre crop (big_vision bit_i1k).
UPSTREAM_EVAL_CROP_PCT = 0.875


def upstream_eval_image(img: np.ndarray, crop: int) -> np.ndarray:
    """The upstream validation view: resize the shorter side to crop / 0.875, centre `crop` square."""
    return eval_image(img, DataConfig(input_size=crop, crop_pct=UPSTREAM_EVAL_CROP_PCT))


def decode_image_bytes(data: bytes, name: str) -> np.ndarray:
    """`decode_image` for an encoded image held in memory (a tar shard member); `name` is what an
    error reports."""
    buf = np.frombuffer(data, dtype=np.uint8)
    img = imdecode(buf, cv2.IMREAD_COLOR, name, BadImageError)
    if img is None:
        raise BadImageError(f"{name}: cannot decode image (corrupt or not an image)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
