"""BiT-HyperRule: the fine-tuning recipe as pure functions (official `bit_hyperrule.py`).

The rule picks everything from two facts about the downstream task, its image area and the
number of training examples actually used (k x classes in few-shot runs):

- resolution: resize to 160 and random-crop 128 when H*W < 96*96, else 512 and 480 (the code's
  numbers; the paper's text says 448/384, timm issue #388);
- schedule: 500 / 10k / 20k optimiser steps for < 20k / < 500k / larger training sets, with a
  linear warm-up and three lr decays of x0.1;
- MixUp with alpha 0.1 from 20k examples on;
- SGD, momentum 0.9, lr 0.003 at batch 512, no weight decay, zero-initialised head.

`get_lr` is exact, quirks included: the lr is 0 at step 0 (the first update does nothing,
official issue #58), and a decay point s applies from step s+1 (strict `s < step`). The schedule
is *not* scaled with the batch size (the official code has that line commented out);
`scale_schedule=True` opts into scaling the step counts by 512/batch (same number of epochs).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from bitlab.errors import BitlabError, ConfigError

# Below this image area the task counts as "small images" (CIFAR-like 32x32).
SMALL_IMAGE_AREA = 96 * 96
SMALL_RESOLUTION = (160, 128)  # (resize, crop)
LARGE_RESOLUTION = (512, 480)
# Dataset-size thresholds and step 'supports': [warm-up, decay1, decay2, decay3, total].
SMALL_DATASET = 20_000
MEDIUM_DATASET = 500_000
SCHEDULES = {
    "small": (100, 200, 300, 400, 500),  # decays at 40/60/80 % (not 30/60/90 as for the others)
    "medium": (500, 3000, 6000, 9000, 10_000),
    "large": (500, 6000, 12_000, 18_000, 20_000),
}
MIXUP_ALPHA = 0.1
BASE_LR = 0.003
MOMENTUM = 0.9
REFERENCE_BATCH = 512  # the batch size the rule's lr and step counts were tuned at


def get_resolution(original_hw: tuple[int, int]) -> tuple[int, int]:
    """(resize, crop) for images of `original_hw` = (H, W)."""
    h, w = original_hw
    if h <= 0 or w <= 0:
        raise BitlabError(f"image size must be positive, got {h}x{w}")
    return SMALL_RESOLUTION if h * w < SMALL_IMAGE_AREA else LARGE_RESOLUTION


def get_mixup(dataset_size: int) -> float:
    """MixUp alpha: none below 20k training examples, 0.1 from 20k on."""
    return 0.0 if dataset_size < SMALL_DATASET else MIXUP_ALPHA


def get_schedule(dataset_size: int) -> tuple[int, ...]:
    """The step supports [warm-up, decay1, decay2, decay3, total] for `dataset_size` examples."""
    if dataset_size <= 0:
        raise BitlabError(f"dataset size must be positive, got {dataset_size}")
    if dataset_size < SMALL_DATASET:
        return SCHEDULES["small"]
    if dataset_size < MEDIUM_DATASET:
        return SCHEDULES["medium"]
    return SCHEDULES["large"]


def scale_schedule(supports: tuple[int, ...], batch_size: int) -> tuple[int, ...]:
    """Step counts scaled by 512/batch (same epochs at another batch size), at least 1 step each.
    A batch so large that two supports round to the same step (warm-up, decays or end on top of
    each other) is refused: that schedule is not the rule's any more."""
    factor = REFERENCE_BATCH / batch_size
    scaled = tuple(max(1, round(s * factor)) for s in supports)
    if any(a >= b for a, b in zip(scaled, scaled[1:])):
        raise ConfigError("scale_schedule", f"{{setting}} at batch {batch_size} squeezes the schedule {list(supports)} into "
                          f"{list(scaled)} steps (supports coincide); use a smaller batch or give --schedule")
    return scaled


def lr_at(step: int, supports: tuple[int, ...], base_lr: float = BASE_LR) -> float | None:
    """The rule's lr for optimiser step `step` (0-based) under `supports`; None once training is over.

    Warm-up: base * step / warmup (0 at step 0, as the official code). Then base / 10 for every
    decay point s with s < step. Steps >= total return None.
    """
    warmup, *decays, total = supports
    if step < warmup:
        return base_lr * step / warmup
    if step >= total:
        return None
    return base_lr / 10 ** sum(s < step for s in decays)


def get_lr(step: int, dataset_size: int, base_lr: float = BASE_LR) -> float | None:
    """Official `bit_hyperrule.get_lr`: `lr_at` with the schedule chosen by `dataset_size`."""
    return lr_at(step, get_schedule(dataset_size), base_lr)


@dataclass(frozen=True)
class HyperRule:
    """Everything the rule chooses for one task (what `bitlab hyperrule` prints)."""

    dataset_size: int
    image_size: tuple[int, int]
    batch_size: int
    resize: int
    crop: int
    supports: tuple[int, ...]
    mixup_alpha: float
    base_lr: float
    momentum: float = MOMENTUM
    weight_decay: float = 0.0  # paper §3.3: no weight decay during transfer
    zero_head: bool = True

    @property
    def total_steps(self) -> int:
        return self.supports[-1]

    def lr(self, step: int) -> float | None:
        return lr_at(step, self.supports, self.base_lr)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_steps"] = self.total_steps
        return d


def hyperrule(dataset_size: int, image_size: tuple[int, int], *, batch_size: int = REFERENCE_BATCH,
              base_lr: float = BASE_LR, scale_with_batch: bool = False) -> HyperRule:
    """Apply BiT-HyperRule to a task of `dataset_size` training examples of `image_size` = (H, W)."""
    if dataset_size <= 0:
        raise ConfigError("dataset_size", f"must be positive, got {dataset_size}")
    if min(image_size) <= 0:
        raise ConfigError("image_size", f"must be positive, got {image_size[0]}x{image_size[1]}")
    if batch_size <= 0:
        raise ConfigError("batch_size", f"must be positive, got {batch_size}")
    if not (math.isfinite(base_lr) and base_lr > 0):
        raise ConfigError("base_lr", f"must be a positive number, got {base_lr}")
    supports = get_schedule(dataset_size)
    if scale_with_batch:
        supports = scale_schedule(supports, batch_size)
    resize, crop = get_resolution(image_size)
    return HyperRule(dataset_size=dataset_size, image_size=tuple(image_size), batch_size=batch_size,
                     resize=resize, crop=crop, supports=supports, mixup_alpha=get_mixup(dataset_size),
                     base_lr=base_lr)
