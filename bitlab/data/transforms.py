"""Image pre-processing: decode, resize, crop, flip, normalise.

Workers return uint8 CHW tensors (4x less to move between processes than float32), normalised
once per batch with `normalize` (on the GPU when there is one); BiT models take RGB in [-1, 1].

Two resize paths, on purpose:
- evaluation (`eval_image`: `evaluate`, `predict`, `dedup`'s embeddings) resamples as each model's
  reference pipeline does, from its `DataConfig`: PIL's antialiased filters through torchvision's
  `Resize` (timm's `create_transform`, the official bit_pytorch evaluation), so that per-image
  predictions are the reference's (`benchmarks/preprocess_agreement.py`);
- training views (`train_image`, `inception_image` and the validation views during training) stay
  on the faster OpenCV path: JPEGs decoded at 1/2, 1/4 or 1/8 size when the next resize allows it,
  then halved with a Gaussian pyramid and finished bilinearly (`resize`); enlarging is bilinear.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

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


# Evaluation filters by timm's names, each PIL's (what torchvision's Resize applies to PIL images).
PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
               "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}
# timm's crop modes that bitlab reproduces ('border', a letterbox, is used by no pretrained timm model).
CROP_MODES = ("center", "squash")


@dataclass(frozen=True)
class DataConfig:
    """How a model wants its input: size, normalisation and its reference evaluation view.

    The evaluation view is timm's (`transforms_imagenet_eval`): the resize target is
    `floor(input_size / crop_pct)`; `crop_mode="squash"` resizes both sides to it (aspect ratio
    lost), `"center"` resizes the shorter side to it (the longer one truncated, as torchvision's
    `Resize(int)`); then the centre `input_size` square is taken. `interpolation` names the filter
    (antialiased when shrinking, as PIL's). The default is BiT's official evaluation (bit_pytorch
    `Resize((s, s))`, bilinear, no crop, [-1, 1]). Frozen and comparable: models with equal configs
    see the same pixels.
    """

    input_size: int = 224
    mean: tuple[float, float, float] = BIT_MEAN
    std: tuple[float, float, float] = BIT_STD
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "squash"

    def __post_init__(self) -> None:
        if self.interpolation not in PIL_FILTERS:
            raise BitlabError(f"interpolation {self.interpolation!r} is not supported "
                              f"(one of {', '.join(PIL_FILTERS)})")
        if self.crop_mode not in CROP_MODES:
            raise BitlabError(f"crop_mode {self.crop_mode!r} is not supported (one of {', '.join(CROP_MODES)})")
        if not 0 < self.crop_pct <= 1:
            raise BitlabError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    def to_dict(self) -> dict:
        return asdict(self)


def decode_image(path: str | os.PathLike, min_side: int | None = None) -> np.ndarray:
    """Read an image file as RGB uint8 HxWx3; grey and RGBA inputs are converted.

    `min_side`: the caller only needs an image whose shorter side is at least this many pixels
    (it resizes down to it next). A JPEG that large by 2, 4 or 8 times is then decoded at that
    fraction directly (libjpeg's DCT scaling): 2-4x less decoding for the usual downscales, with
    the result anti-aliased like INTER_AREA. Other formats are decoded whole.
    """
    data = np.fromfile(path, dtype=np.uint8) if Path(path).is_file() else None
    if data is None:
        raise BadImageError(f"{path}: no such image file")
    flag = cv2.IMREAD_COLOR
    if min_side and (size := jpeg_size(data)):
        flag = _REDUCED.get(_reduction(size, min_side), cv2.IMREAD_COLOR)
    img = imdecode(data, flag, str(path), BadImageError)  # refuses absurd sizes before allocating them
    if img is None:
        raise BadImageError(f"{path}: cannot decode image (corrupt or not an image)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


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


def eval_resize_shape(height: int, width: int, cfg: DataConfig) -> tuple[int, int]:
    """(height, width) the evaluation view resizes an image to, before its centre crop: timm's
    `floor(size / crop_pct)`, both sides (squash) or the shorter side with the longer one truncated
    (`int`, as torchvision's `Resize(int)`)."""
    scale = math.floor(cfg.input_size / cfg.crop_pct)
    if cfg.crop_mode == "squash":
        return scale, scale
    if width <= height:
        return int(scale * height / width), scale
    return scale, int(scale * width / height)


def reference_resize(img: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    """Resize an RGB uint8 image as PIL's `Image.resize(filter)` does (torchvision's `Resize` on PIL
    images): antialiased, the filter widened by the downscale factor.

    Bicubic (timm's EfficientNets and most timm models) runs on torchvision's uint8 tensor kernel,
    written to reproduce PIL's: on real photos it differs from PIL by at most 2 levels in at most
    2.6 % of the values, which left every top-1 of the agreement benchmark as the reference's
    (EfficientNet-Lite0 and Lite2, 645 hard images) at twice PIL's speed in a loader worker. Bilinear
    (BiT's official view) calls PIL itself: the tensor kernel's few one-level differences flipped 14
    of the 645 top-1s of an R50x1 with random weights (flat outputs, near-ties everywhere), PIL's
    none; it costs 0.64x the tensor kernel's images/s, still 1.1x the reference pipeline's
    (benchmarks/preprocess_agreement.py). The other filters call PIL itself too.
    """
    if img.shape[:2] == (height, width):
        return img
    if interpolation == "bicubic":
        # torchvision on first use: the CLI's other commands need not import it.
        from torchvision.transforms.v2.functional import InterpolationMode, resize as tv_resize

        chw = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)  # a channels-last view: the fast kernels'
        out = tv_resize(chw, [height, width], interpolation=InterpolationMode(interpolation), antialias=True)
        return out.permute(1, 2, 0).numpy()
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((width, height), PIL_FILTERS[interpolation]))


def reference_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """torchvision's `CenterCrop`: offsets `round((h - size) / 2)` (half to even), not floored."""
    h, w = img.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img[top:top + size, left:left + size]


def eval_image(img: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """The model's reference evaluation view of an RGB image (uint8 HxWx3, `cfg.input_size` square):
    resized as `cfg` says with `cfg.interpolation` (`reference_resize`), then centre-cropped."""
    height, width = eval_resize_shape(*img.shape[:2], cfg)
    return reference_center_crop(reference_resize(img, height, width, cfg.interpolation), cfg.input_size)


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
    """The upstream validation view: resize the shorter side to crop / 0.875, centre `crop` square
    (big_vision's `resize_small` + `central_crop`, offsets floored), on the OpenCV path."""
    return center_crop(resize_shorter(img, int(crop / UPSTREAM_EVAL_CROP_PCT)), crop)


def decode_image_bytes(data: bytes, name: str) -> np.ndarray:
    """`decode_image` for an encoded image held in memory (a tar shard member); `name` is what an
    error reports."""
    buf = np.frombuffer(data, dtype=np.uint8)
    img = imdecode(buf, cv2.IMREAD_COLOR, name, BadImageError)
    if img is None:
        raise BadImageError(f"{name}: cannot decode image (corrupt or not an image)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
