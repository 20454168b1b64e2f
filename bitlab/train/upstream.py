"""BiT's upstream (pre-training) recipe: numbers and pure functions, no torch (the CLI's defaults).

The official release has no pre-training code (big_transfer issues #2, #26); this follows the
paper (§3.3, §4.2-4.3) and the maintainers' answers in #26. Everything can be overridden.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from bitlab.errors import BitlabError, ConfigError

# Paper §3.3. (epochs, lr decay epochs) per preset.
PRESETS: dict[str, tuple[float, tuple[float, ...]]] = {
    "bit-s": (90, (30, 60, 80)),  # ILSVRC-2012
    "bit-m": (90, (30, 60, 80)),  # ImageNet-21k
    "bit-l": (40, (10, 23, 30, 37)),  # JFT-300M
}
BASE_LR = 0.03  # at batch 256, scaled linearly with the global batch (Goyal et al., paper ref. [9])
REFERENCE_BATCH = 256
GLOBAL_BATCH = 4096  # paper: 4096 images on a TPUv3-512, 8 per chip
WARMUP_STEPS = 5000
WEIGHT_DECAY = 1e-4  # §4.2: lower values look faster early on but end worse
MOMENTUM = 0.9
CROP = 224
CROP_AREA_MIN = 0.05  # big_vision's inception_crop (TF's sample_distorted_bounding_box), not torchvision's 0.08
LR_DECAY = 0.1


@dataclass(frozen=True)
class UpstreamSchedule:
    """Linear warm-up to `peak_lr`, then x0.1 at each decay step (paper §3.3)."""

    peak_lr: float
    warmup_steps: int
    decay_steps: tuple[int, ...]
    total_steps: int
    steps_per_epoch: float

    def lr(self, step: int) -> float | None:
        """lr of optimiser step `step` (0-based); None once the schedule is over. Warm-up counts from 1
        (peak / warmup at step 0): unlike the official fine-tuning code (#58), no update at lr 0."""
        if step >= self.total_steps:
            return None
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return self.peak_lr * warm * LR_DECAY ** sum(step >= d for d in self.decay_steps)


def check_recipe(epochs: float, decay_epochs: Sequence[float], warmup_steps: int) -> None:
    """Refuse an epoch count, decay epochs or warm-up that no schedule can use, naming the setting."""
    if not (math.isfinite(epochs) and epochs > 0):
        raise ConfigError("epochs", f"must be positive, got {epochs}")
    if list(decay_epochs) != sorted(decay_epochs) or any(not 0 < e < epochs for e in decay_epochs):
        raise ConfigError("decay_epochs", f"must increase and lie inside (0, {epochs}), got {list(decay_epochs)}")
    if warmup_steps < 0:
        raise ConfigError("warmup_steps", f"must be >= 0, got {warmup_steps}")


def recipe(preset: str, epochs: float | None = None, decay_epochs: Sequence[float] | None = None
           ) -> tuple[float, tuple[float, ...]]:
    """(epochs, decay epochs): the preset's unless overridden (`epochs` alone scales the decays along)."""
    preset_epochs, decays = PRESETS[preset]
    if decay_epochs is not None:
        decays = tuple(decay_epochs)
    elif epochs is not None:
        decays = tuple(d * epochs / preset_epochs for d in decays)
    return (preset_epochs if epochs is None else epochs), decays


def make_schedule(num_examples: int, batch_size: int, *, epochs: float, decay_epochs: Sequence[float],
                  warmup_steps: int = WARMUP_STEPS, base_lr: float = BASE_LR) -> UpstreamSchedule:
    """Epochs -> optimiser steps for `num_examples` images at `batch_size` (the global batch)."""
    if num_examples <= 0 or batch_size <= 0:
        raise BitlabError(f"need images and a positive batch (got {num_examples} images, batch {batch_size})")
    check_recipe(epochs, decay_epochs, warmup_steps)
    per_epoch = num_examples / batch_size
    return UpstreamSchedule(peak_lr=base_lr * batch_size / REFERENCE_BATCH, warmup_steps=warmup_steps,
                            decay_steps=tuple(round(e * per_epoch) for e in decay_epochs),
                            total_steps=max(1, math.ceil(epochs * per_epoch)), steps_per_epoch=per_epoch)


def micro_batches(batch_size: int, world_size: int, batch_split: int = 1, device_batch: int | None = None) -> int:
    """Micro-steps per optimiser step on each process: `batch_split`, raised until a micro-batch
    holds at most `device_batch` images and the global batch still splits evenly (both at least 1:
    `PretrainConfig` checks them)."""
    if device_batch is None:
        return batch_split
    for split in range(batch_split, batch_size + 1):
        parts = world_size * split
        if batch_size % parts == 0 and batch_size // parts <= device_batch:
            return split
    raise BitlabError(f"batch size {batch_size} cannot be split over {world_size} process(es) into micro-batches "
                      f"of at most {device_batch}")


def default_head_bias(num_classes: int) -> float:
    """-log(C): sigmoid(-log C) ~ 1/C, the prior of one positive label per image. At a zero bias the
    first steps of a 21k-class model push 21k logits down (a start loss of C log 2 ~ 15,000 per
    image); big_vision's ImageNet-21k config uses -10, i.e. -log(21843) to two digits."""
    return -math.log(num_classes)
