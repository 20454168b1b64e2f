"""`bitlab pretrain`: BiT upstream pre-training, from one CPU process to many GPU nodes (torchrun / DDP).

The official release has no pre-training code (big_transfer issues #2, #26); this follows the paper
(§3.3, §4.2-4.3) and the maintainers' answers in #26:

- SGD, momentum 0.9, lr 0.03 x global batch / 256, linear warm-up over 5000 steps, weight decay
  1e-4 (not on normalisation parameters and biases, as is usual for ResNets; `decay_all` to
  include them), 90 epochs with the lr / 10 at epochs 30, 60, 80 (BiT-S, BiT-M) or the BiT-L
  preset (40 epochs, decays at 10, 23, 30, 37). Everything can be overridden.
- Inception crop to 224 + random horizontal flip, inputs in [-1, 1] (OpenCV, in the workers).
- Softmax cross-entropy for single-label data; sigmoid cross-entropy (summed over classes, mean
  over images, as big_vision's `sigmoid_xent`) for multi-label data, with the head bias set to
  -log(num_classes): every class then starts at p ~ 1/C, about the label prior of one positive per
  image, instead of 0.5 — at 0.5 the first steps of a 21k-class model are spent pushing 21k
  logits down (an initial loss of C log 2 ~ 15,000 per image). big_vision's ImageNet-21k config
  uses -10, i.e. -log(21843) to two digits.
- The global batch is fixed: each of W processes runs micro-batches of global / (W x batch_split);
  gradients are all-reduced once per step (`no_sync` on the inner micro-steps, in `loop.run`).
  With GroupNorm the result does not depend on W or batch_split; BatchNorm ablations normalise
  over each micro-batch, so their runs differ by design when the split changes.

Data: an ImageFolder tree, a single-label CSV, a multi-label CSV or JSON lines
(`bitlab.data.multilabel`), or a shard set written by `bitlab shards` (`bitlab.data.shards`).
File sets are sampled by `StepSampler` (epoch-wise permutations seeded by (seed, epoch) — what
DistributedSampler's set_epoch does — sharded over ranks by global position, so the data order is
the same on any number of processes); shard sets stream per reader (`ShardStream`).

Faults: a rank that cannot read an image or shard tells every rank through one small all-reduce
per step, and all of them checkpoint the last completed step and stop with the file names (no rank
hangs in a collective); a NaN loss stops every rank before the update, keeping the last good
checkpoint (`loop.run`); `resume` refuses a checkpoint written with other settings, for other data
(image or class count) or for another model. With `torchrun --max-restarts N` a dead worker
restarts the job, which resumes from `checkpoint.pt`; a SIGTERM stop exits 0 on every rank
(`cli.train.report_unfinished`), so it is not restarted.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bitlab import io
from bitlab.data import datasets, shards
from bitlab.data.datasets import ImageSet
from bitlab.data.multilabel import MultiLabelSet, load_labelled, random_holdout, read_classes, relabel
from bitlab.data.shards import ShardIndex
from bitlab.data.transforms import (
    BadImageError, InceptionAugment, decode_image, decode_image_bytes, inception_image, to_chw_tensor,
    upstream_eval_image,
)
from bitlab.errors import BitlabError
from bitlab.models import ResNetV2, registry
from bitlab.train import distributed as D
from bitlab.train.config import LoopConfig, check_running, require
from bitlab.train.distributed import control_group, stop_on_errors
from bitlab.train.loop import LoopResult, MicroBatches, device_defaults, eval_logits, run
from bitlab.train.rundir import RunRecord, check_resume_settings, write_config

log = logging.getLogger(__name__)

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
LR_DECAY = 0.1
# Keeps upstream augmentation randomness apart from other streams of the same seed.
_AUG_STREAM = 0x757073
# A bad image is replaced by the next readable one (with skip_bad_images); give up after this many.
MAX_SUBSTITUTES = 64
# What a resumed run must share with the run that wrote the checkpoint (else data or schedule differ).
_RESUME_KEYS = ("model", "data", "classes", "label_sep", "val_fraction", "preset", "epochs", "decay_epochs",
                "warmup_steps", "batch_size", "base_lr", "weight_decay", "decay_all", "crop", "crop_area_min",
                "flip", "head_bias", "seed")

Source = ImageSet | MultiLabelSet | ShardIndex


@dataclass
class PretrainConfig:
    """`bitlab pretrain`: what to pre-train on what, and how (saved as config.json)."""

    model: str
    data: str
    out: str
    val_data: str | None = None
    val_fraction: float = 0.0
    classes: str | None = None  # class list file (one per line) fixing the label order
    label_sep: str | None = None  # multi-label CSV: separator inside the labels cell (default whitespace)
    preset: str = "bit-m"
    epochs: float | None = None  # default: the preset's
    decay_epochs: list[float] | None = None  # default: the preset's
    warmup_steps: int = WARMUP_STEPS
    batch_size: int = GLOBAL_BATCH  # global, over all processes and micro-steps
    batch_split: int = 1  # micro-steps per optimiser step on each process
    device_batch: int | None = None  # most images per process per micro-step: raises batch_split as needed
    base_lr: float = BASE_LR  # at batch 256
    weight_decay: float = WEIGHT_DECAY
    decay_all: bool = False  # weight decay on norm parameters and biases too
    crop: int = CROP
    crop_area_min: float = 0.05
    flip: bool = True
    head_bias: float | None = None  # multi-label head bias (default -log(num_classes))
    seed: int = 0
    eval_every: int = 0
    checkpoint_every: int = 1000
    log_every: int = 50
    eval_batch_size: int | None = None
    workers: int | None = None
    device: str | None = None
    precision: str | None = None  # default: bf16 on GPU, fp32 on CPU
    channels_last: bool | None = None  # default: on for GPU
    compile: bool = False
    skip_bad_images: bool = False
    resume: bool = True  # continue from out/checkpoint.pt when there is one (torchrun restarts, requeues)
    stop_after: int | None = None
    progress: bool = True

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("data", "val_data", "classes")  # compared resolved on resume
    RESUME_HINT: ClassVar[str] = "leave out --no-resume"  # pretrain resumes by default

    def __post_init__(self) -> None:
        _validate(self)  # before any data is read or any folder made
        check_running(self)


def _validate(cfg: PretrainConfig) -> None:
    """Refuse values no run can use, naming the flag. (The loop's own knobs are `check_running`'s.)"""
    need = functools.partial(require, cfg)
    finite = math.isfinite

    if cfg.preset not in PRESETS:
        raise BitlabError(f"unknown --preset {cfg.preset!r} (choose from {', '.join(PRESETS)})")
    epochs, decays = _recipe(cfg)
    check_recipe(epochs, decays, cfg.warmup_steps)
    need(cfg.batch_size >= 1, "batch_size", "at least 1")
    need(cfg.batch_split >= 1, "batch_split", "at least 1")
    need(cfg.device_batch is None or cfg.device_batch >= 1, "device_batch", "at least 1")
    need(cfg.eval_batch_size is None or cfg.eval_batch_size >= 1, "eval_batch_size", "at least 1")
    need(finite(cfg.base_lr) and cfg.base_lr > 0, "base_lr", "a positive number")
    need(finite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight_decay", "0 (none) or more")
    need(cfg.crop >= 1, "crop", "at least 1 pixel")
    need(0 < cfg.crop_area_min <= 1, "crop_area_min", "above 0 and at most 1")
    need(0 <= cfg.val_fraction < 1, "val_fraction", "at least 0 and below 1")
    need(cfg.head_bias is None or finite(cfg.head_bias), "head_bias", "a finite number")
    need(cfg.seed >= 0, "seed", "0 or more")
    need(cfg.workers is None or cfg.workers >= 0, "workers", "0 (load in the main process) or more")


@dataclass
class PretrainResult:
    run_dir: Path
    completed: bool
    step: int
    total_steps: int
    metrics: dict
    plan: dict
    stopped_by: str | None = None
    bad_images: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class UpstreamSchedule:
    """Linear warm-up to `peak_lr`, then x0.1 at each decay step (paper §3.3)."""

    peak_lr: float
    warmup_steps: int
    decay_steps: tuple[int, ...]
    total_steps: int
    steps_per_epoch: float

    def lr(self, step: int) -> float | None:
        """lr of optimiser step `step` (0-based); None once the schedule is over.

        Warm-up counts from 1 (lr = peak / warmup at step 0): unlike the official fine-tuning code
        (issue #58) the first update is not wasted at lr 0."""
        if step >= self.total_steps:
            return None
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return self.peak_lr * warm * LR_DECAY ** sum(step >= d for d in self.decay_steps)

    def to_dict(self) -> dict:
        return asdict(self)


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


def check_recipe(epochs: float, decay_epochs: Sequence[float], warmup_steps: int) -> None:
    """Refuse an epoch count, decay epochs or warm-up that no schedule can use, naming the flag."""
    if not (math.isfinite(epochs) and epochs > 0):
        raise BitlabError(f"--epochs must be positive, got {epochs}")
    if list(decay_epochs) != sorted(decay_epochs) or any(not 0 < e < epochs for e in decay_epochs):
        raise BitlabError(f"--decay-epochs must increase and lie inside (0, {epochs}), got {list(decay_epochs)}")
    if warmup_steps < 0:
        raise BitlabError(f"--warmup-steps must be >= 0, got {warmup_steps}")


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


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Two SGD groups: weights with decay; norm scales/offsets and biases (1-d tensors) without,
    unless `decay_all`."""
    decay, plain = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if decay_all or p.ndim > 1 else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def classifier(model: nn.Module) -> nn.Module:
    """The model's final classification layer."""
    head = model.head.conv if isinstance(model, ResNetV2) else getattr(model, "get_classifier", lambda: None)()
    if not isinstance(head, (nn.Linear, nn.Conv2d)):
        raise BitlabError(f"{type(model).__name__}: cannot find a linear classifier to initialise")
    return head


def default_head_bias(num_classes: int) -> float:
    """-log(C): sigmoid(-log C) ~ 1/C, the prior of one positive label per image (module docs)."""
    return -math.log(num_classes)


def build_model(name: str, num_classes: int, *, multi_label: bool, head_bias: float | None = None) -> nn.Module:
    """A randomly initialised registry model with a `num_classes` head; multi-label heads get the
    rare-positive bias."""
    model = registry.create_model(name, num_classes=num_classes)
    if multi_label:
        head = classifier(model)
        if head.bias is None:
            raise BitlabError(f"{name}: the classifier has no bias to initialise for multi-label training")
        with torch.no_grad():
            head.bias.fill_(default_head_bias(num_classes) if head_bias is None else head_bias)
    return model


def softmax_xent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def sigmoid_xent(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over classes of the per-class binary cross-entropy, mean over images (big_vision)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none").sum(1).mean()


# ----------------------------------------------------------------------------- data sources
@dataclass
class UpstreamData:
    train: Source
    val: Source | None
    classes: list[str]
    multi_label: bool
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _open(spec: str, label_sep: str | None, classes: list[str] | None) -> dict[str, Source]:
    path = Path(spec)
    if shards.is_shard_set(path):
        return {"all": shards.read_index(path)}
    if path.is_dir() and shards.is_shard_set(path / "train"):
        found: dict[str, Source] = {"train": shards.read_index(path / "train")}
        for name in datasets.VAL_SPLIT_NAMES:
            if shards.is_shard_set(path / name):
                found[name] = shards.read_index(path / name)
                break
        return found
    return dict(load_labelled(spec, label_sep=label_sep, classes=classes))


def _is_multi(source: Source) -> bool:
    return source.multi_label if isinstance(source, ShardIndex) else isinstance(source, MultiLabelSet)


def _align(val: Source, classes: list[str], what: str) -> Source:
    if isinstance(val, ImageSet):
        return relabel(val, classes)
    if list(val.classes) != list(classes):
        raise BitlabError(f"{what}: its {len(val.classes)} classes are not the training set's {len(classes)} "
                          "(same names in the same order); write both with the same --classes list")
    return val


def load_data(cfg: PretrainConfig) -> UpstreamData:
    """Training and (optional) validation sources from `cfg.data` / `cfg.val_data`."""
    classes = read_classes(cfg.classes) if cfg.classes else None
    splits = _open(cfg.data, cfg.label_sep, classes)
    train = splits.get("train") or splits.get("all")
    if train is None:
        raise BitlabError(f"{cfg.data}: no training split (found: {', '.join(sorted(splits))})")
    if classes is not None and list(train.classes) != classes:
        raise BitlabError(f"{cfg.data}: its classes differ from {cfg.classes}")
    classes = list(train.classes)
    notes = []
    val: Source | None = None
    if cfg.val_data:
        other = _open(cfg.val_data, cfg.label_sep, classes)
        pick = next((n for n in (*datasets.VAL_SPLIT_NAMES, "all") if n in other), None)
        if pick is None:
            raise BitlabError(f"{cfg.val_data}: no validation split (found: {', '.join(sorted(other))})")
        val = other[pick]
    elif found := next((n for n in datasets.VAL_SPLIT_NAMES if n in splits), None):
        val = splits[found]
    elif cfg.val_fraction > 0:
        if isinstance(train, ShardIndex):
            raise BitlabError("--val-fraction needs a file data set; for shards write a validation shard set "
                              "and pass it with --val-data")
        if isinstance(train, MultiLabelSet):
            train, val = random_holdout(train, cfg.val_fraction, cfg.seed)
        else:
            train, val = datasets.stratified_holdout(train, cfg.val_fraction, cfg.seed)
        notes.append(f"validation: {len(val)} images held out of {cfg.data} ({cfg.val_fraction:.0%}, seed {cfg.seed})")
    if val is not None:
        if _is_multi(val) != _is_multi(train):
            raise BitlabError(f"{cfg.val_data or cfg.data}: validation and training data must both be single-label "
                              "or both multi-label")
        val = _align(val, classes, cfg.val_data or cfg.data)
    if len(classes) < 2 and not _is_multi(train):
        raise BitlabError(f"{cfg.data}: single-label training needs at least 2 classes, found {len(classes)}")
    return UpstreamData(train, val, classes, _is_multi(train), notes)


# ----------------------------------------------------------------------------- items and batches
class Item(NamedTuple):
    """One decoded view (uint8 CHW; None when no readable image), its target and any messages."""

    image: torch.Tensor | None
    target: Any  # int class (single-label) or uint8 multi-hot tensor (multi-label)
    messages: tuple[str, ...]


class Batch(NamedTuple):
    images: torch.Tensor  # uint8 NCHW
    targets: torch.Tensor  # int64 N, or uint8 N x C
    warnings: tuple[str, ...]  # bad images replaced by others (skip_bad_images)
    errors: tuple[str, ...]  # items without an image: the step cannot go on


def _target(labels: Sequence[int], num_classes: int, multi: bool) -> Any:
    if not multi:
        return int(labels[0])
    t = torch.zeros(num_classes, dtype=torch.uint8)
    t[list(labels)] = 1
    return t


def collate(items: Sequence[Item]) -> Batch:
    good = [it for it in items if it.image is not None]
    warnings = tuple(m for it in good for m in it.messages)
    errors = tuple(m for it in items if it.image is None for m in it.messages)
    if not good:
        multi = bool(items) and isinstance(items[0].target, torch.Tensor)
        targets = torch.empty((0, len(items[0].target)) if multi else 0,
                              dtype=torch.uint8 if multi else torch.int64)
        return Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), targets, warnings, errors)
    images = torch.stack([it.image for it in good])
    if isinstance(good[0].target, torch.Tensor):
        targets = torch.stack([it.target for it in good])
    else:
        targets = torch.tensor([it.target for it in good], dtype=torch.int64)
    return Batch(images, targets, warnings, errors)


def _labels_of(images: ImageSet | MultiLabelSet, i: int) -> Sequence[int]:
    return images.labels[i].tolist() if isinstance(images, MultiLabelSet) else [int(images.labels[i])]


class FileTrainImages(Dataset):
    """Training views of a file set, keyed by `(index, stream position)` pairs from `StepSampler`:
    the view's randomness is seeded by (seed, position), whatever the process or worker count."""

    def __init__(self, images: ImageSet | MultiLabelSet, aug: InceptionAugment, *, seed: int, skip_bad: bool) -> None:
        self.images, self.aug, self.seed, self.skip_bad = images, aug, seed, skip_bad
        self.multi, self.num_classes = isinstance(images, MultiLabelSet), len(images.classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        index, position = key
        rng = np.random.default_rng((self.seed, _AUG_STREAM, position))
        messages: list[str] = []
        for attempt in range(MAX_SUBSTITUTES if self.skip_bad else 1):
            i = (index + attempt) % len(self.images)
            try:
                img = decode_image(self.images.paths[i])
            except BadImageError as e:
                messages.append(str(e))
                continue
            except OSError as e:  # permissions, I/O errors: the file name is what matters
                messages.append(f"{self.images.paths[i]}: cannot read ({e.strerror or e})")
                continue
            view = to_chw_tensor(inception_image(img, self.aug, rng))
            return Item(view, _target(_labels_of(self.images, i), self.num_classes, self.multi), tuple(messages))
        return Item(None, _target(_labels_of(self.images, index), self.num_classes, self.multi), tuple(messages))


class ShardTrainTransform:
    """`ShardStream` transform: sample j of a loaded shard -> training `Item` (seeded by its key)."""

    def __init__(self, aug: InceptionAugment, *, num_classes: int, multi: bool, seed: int, skip_bad: bool) -> None:
        self.aug, self.num_classes, self.multi, self.seed, self.skip_bad = aug, num_classes, multi, seed, skip_bad

    def __call__(self, samples: list[shards.Sample], j: int, key: tuple[int, int, int]) -> Item:
        rng = np.random.default_rng((self.seed, _AUG_STREAM, *key))
        messages: list[str] = []
        for attempt in range(MAX_SUBSTITUTES if self.skip_bad else 1):
            sample = samples[(j + attempt) % len(samples)]
            try:
                name, data = sample.image()
                labels = sample.labels()
                img = decode_image_bytes(data, name)
            except BitlabError as e:
                messages.append(str(e))
                continue
            view = to_chw_tensor(inception_image(img, self.aug, rng))
            return Item(view, _target(labels, self.num_classes, self.multi), tuple(messages))
        return self.error(messages)

    def error(self, messages: str | list[str]) -> Item:
        messages = [messages] if isinstance(messages, str) else messages
        return Item(None, _target([0], self.num_classes, self.multi), tuple(messages))


def _worker_init(_: int) -> None:
    import signal

    # Ctrl-C reaches the whole process group; only the main process reacts (checkpoint, stop).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _loader(dataset, batch_size: int, *, workers: int, sampler=None, dist: D.DistInfo,
            persistent: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=dist.device.type == "cuda", worker_init_fn=_worker_init if workers else None,
                      persistent_workers=persistent and workers > 0, prefetch_factor=4 if workers else None,
                      # its own generator: making a loader must not consume the global torch RNG (resume)
                      generator=torch.Generator().manual_seed(0))


class TrainData:
    """The pre-training stream for `loop.run`: this rank's micro-batches of every step from `start` on."""

    def __init__(self, source: Source, aug: InceptionAugment, *, batch_size: int, micro_steps: int, seed: int,
                 num_classes: int, multi: bool, mean, std, dist: D.DistInfo, workers: int, skip_bad: bool,
                 previous_layout: dict | None = None) -> None:
        self.source, self.aug, self.batch_size, self.micro_steps = source, aug, batch_size, micro_steps
        self.seed, self.num_classes, self.multi, self.mean, self.std = seed, num_classes, multi, mean, std
        self.dist, self.skip_bad, self.previous_layout = dist, skip_bad, previous_layout
        self.micro = D.per_rank_batch(batch_size, micro_steps, dist)
        self.workers = workers
        if isinstance(source, ShardIndex):
            self.workers = shards.reader_layout(len(source.shards), dist.world_size, workers)
        self.group = control_group(dist)
        self.bad: set[str] = set()

    @property
    def layout(self) -> dict | None:
        """Shard sets: what each reader's stream and its resume position depend on — the readers
        (processes x workers) and the micro-batches they fill."""
        if not isinstance(self.source, ShardIndex):
            return None
        return {"readers": self.dist.world_size * max(self.workers, 1), "micro_batch": self.micro,
                "micro_steps": self.micro_steps}

    def _loader(self, start: int) -> DataLoader:
        if isinstance(self.source, ShardIndex):
            start_step, start_epoch = start, 0
            if start and self.previous_layout and self.previous_layout != self.layout:
                # The per-reader streams depend on the layout: the consumed samples cannot be
                # skipped exactly, so a fresh pass starts at the next epoch boundary.
                start_step = 0
                start_epoch = math.ceil(start * self.batch_size / self.source.num_samples)
                log.warning("the shard stream was read as %s and is now read as %s: resuming at the start of "
                            "epoch %d instead of the exact sample", self.previous_layout, self.layout, start_epoch)
            transform = ShardTrainTransform(self.aug, num_classes=self.num_classes, multi=self.multi, seed=self.seed,
                                            skip_bad=self.skip_bad)
            stream = shards.ShardStream(self.source, transform, seed=self.seed, rank=self.dist.rank,
                                        world_size=self.dist.world_size, workers=self.workers,
                                        micro_batch=self.micro, micro_steps=self.micro_steps, start_step=start_step,
                                        start_epoch=start_epoch, on_error=transform.error)
            return _loader(stream, self.micro, workers=self.workers, dist=self.dist)
        dataset = FileTrainImages(self.source, self.aug, seed=self.seed, skip_bad=self.skip_bad)
        sampler = D.StepSampler(len(dataset), self.batch_size, seed=self.seed, start_step=start, info=self.dist)
        return _loader(dataset, self.micro, workers=self.workers, sampler=sampler, dist=self.dist)

    def steps(self, start: int) -> Iterator[MicroBatches]:
        it = iter(self._loader(start))
        dev = self.dist.device
        while True:
            parts: list[Batch] = [next(it) for _ in range(self.micro_steps)]
            # with skip_bad, only whole unreadable shards remain errors here
            stop_on_errors([e for b in parts for e in b.errors], self.dist, "training", hint=not self.skip_bad,
                           group=self.group)
            for message in (w for b in parts for w in b.warnings):
                if message not in self.bad:
                    log.warning("skipped: %s", message)
                    self.bad.add(message)
            images = torch.cat([b.images for b in parts]).to(dev, non_blocking=True)
            targets = torch.cat([b.targets for b in parts]).to(dev, non_blocking=True)
            yield MicroBatches(images, targets, self.micro_steps, self.mean, self.std)


# ----------------------------------------------------------------------------- evaluation
class FileEvalImages(Dataset):
    def __init__(self, images: ImageSet | MultiLabelSet, crop: int) -> None:
        self.images, self.crop = images, crop
        self.multi, self.num_classes = isinstance(images, MultiLabelSet), len(images.classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Item:
        target = _target(_labels_of(self.images, i), self.num_classes, self.multi)
        try:
            img = decode_image(self.images.paths[i])
        except BadImageError as e:
            return Item(None, target, (str(e),))
        except OSError as e:
            return Item(None, target, (f"{self.images.paths[i]}: cannot read ({e.strerror or e})",))
        return Item(to_chw_tensor(upstream_eval_image(img, self.crop)), target, ())


class ShardEvalTransform:
    def __init__(self, crop: int, num_classes: int, multi: bool) -> None:
        self.crop, self.num_classes, self.multi = crop, num_classes, multi

    def __call__(self, sample: shards.Sample) -> Item:
        try:
            name, data = sample.image()
            target = _target(sample.labels(), self.num_classes, self.multi)
            img = decode_image_bytes(data, name)
        except BitlabError as e:
            return self.error(str(e))
        return Item(to_chw_tensor(upstream_eval_image(img, self.crop)), target, ())

    def error(self, message: str) -> Item:
        return Item(None, _target([0], self.num_classes, self.multi), (message,))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes with at least one positive of the average precision (area under the
    precision-recall curve, scikit-learn's definition); NaN when no class has a positive."""
    from sklearn.metrics import average_precision_score

    present = targets.sum(0) > 0
    if not present.any():
        return math.nan
    return float(average_precision_score(targets[:, present], scores[:, present], average="macro"))


class Evaluator:
    """Upstream validation, sharded over ranks: loss and top-1/top-5 (single-label) or loss,
    precision@1 and mAP (multi-label; scores are gathered for the mAP, so keep such validation
    sets to a size whose N x C scores fit in memory)."""

    def __init__(self, source: Source, crop: int, *, multi: bool, num_classes: int, batch_size: int, mean, std,
                 dist: D.DistInfo, workers: int, skip_bad: bool, precision: str, channels_last: bool) -> None:
        if isinstance(source, ShardIndex):
            transform = ShardEvalTransform(crop, num_classes, multi)
            dataset = shards.ShardPass(source, transform, rank=dist.rank, world_size=dist.world_size,
                                       on_error=transform.error)
            workers = min(workers, len(dataset.mine))
            self.loader = _loader(dataset, batch_size, workers=workers, dist=dist, persistent=True)
        else:
            sampler = D.ShardSampler(len(source), dist)
            self.loader = _loader(FileEvalImages(source, crop), batch_size, sampler=sampler, dist=dist,
                                  workers=workers if len(sampler) > batch_size else 0, persistent=True)
        self.multi, self.dist, self.skip_bad = multi, dist, skip_bad
        self.precision, self.channels_last, self.mean, self.std = precision, channels_last, mean, std
        self.bad: set[str] = set()

    @torch.inference_mode()
    def __call__(self, model: nn.Module, step: int) -> dict:
        dev = self.dist.device
        sums = torch.zeros(4, dtype=torch.float64, device=dev)  # loss, top1 (prec@1), top5, n
        errors: list[str] = []
        scores, targets = [], []
        for batch in self.loader:
            if batch.errors:
                if not self.skip_bad:
                    errors += batch.errors
                else:
                    for m in batch.errors:
                        if m not in self.bad:
                            log.warning("left out of validation: %s", m)
                            self.bad.add(m)
            if not len(batch.images) or errors:
                continue
            logits = eval_logits(model, batch.images, mean=self.mean, std=self.std, device=dev,
                                 precision=self.precision, channels_last=self.channels_last)
            y = batch.targets.to(dev, non_blocking=True)
            n = torch.tensor(float(len(y)), dtype=torch.float64, device=dev)
            if self.multi:
                loss = F.binary_cross_entropy_with_logits(logits, y.float(), reduction="none").sum()
                top1 = y.gather(1, logits.argmax(1, keepdim=True)).sum()
                sums += torch.stack([loss.double(), top1.double(), torch.zeros_like(n), n])
                scores.append(torch.sigmoid(logits).cpu().numpy())
                targets.append(y.cpu().numpy())
            else:
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                hit = top == y[:, None]
                sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), hit[:, 0].sum().double(),
                                     hit.any(dim=1).sum().double(), n])
        # Every rank finishes its share first (no collective inside the loop: shares differ in size).
        stop_on_errors(errors, self.dist, "validation", hint=not self.skip_bad)
        loss, top1, top5, n = D.all_reduce_sum(sums, self.dist).tolist()
        if n == 0:
            raise BitlabError("no readable validation images")
        if not self.multi:
            return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "n": int(n)}
        mine = (np.concatenate(scores) if scores else None, np.concatenate(targets) if targets else None)
        parts = [p for p in D.all_gather_object(mine, self.dist) if p[0] is not None]
        all_scores, all_targets = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return {"loss": loss / n, "prec1": top1 / n, "map": mean_average_precision(all_scores, all_targets),
                "n": int(n)}


# ----------------------------------------------------------------------------- the command
def _recipe(cfg: PretrainConfig) -> tuple[float, tuple[float, ...]]:
    """(epochs, decay epochs): the preset's unless overridden."""
    epochs, decays = PRESETS[cfg.preset]
    epochs = cfg.epochs if cfg.epochs is not None else epochs
    if cfg.decay_epochs is not None:
        decays = tuple(cfg.decay_epochs)
    elif cfg.epochs is not None:  # a shorter or longer run keeps the preset's decays at the same fractions
        decays = tuple(d * epochs / PRESETS[cfg.preset][0] for d in decays)
    return epochs, decays


def _schedule(cfg: PretrainConfig, num_examples: int) -> UpstreamSchedule:
    epochs, decays = _recipe(cfg)
    return make_schedule(num_examples, cfg.batch_size, epochs=epochs, decay_epochs=decays,
                         warmup_steps=cfg.warmup_steps, base_lr=cfg.base_lr)


def _previous_plan(cfg: PretrainConfig, run_dir: Path, data: UpstreamData) -> dict | None:
    """The plan of the run this one continues (None for a fresh run); other settings, or data that
    changed under the same path, are refused."""
    return check_resume_settings(run_dir, cfg, _RESUME_KEYS, resume=cfg.resume,
                                 counts={"num_examples": len(data.train), "num_classes": data.num_classes})


def pretrain(cfg: PretrainConfig, dist: D.DistInfo | None = None) -> PretrainResult:
    """Pre-train `cfg.model` on `cfg.data`; writes the run directory `cfg.out` (with the reason
    when the run dies: `loop.RunRecord`).

    Under torchrun every rank calls this; `dist` (from `distributed.setup`) is set up and torn
    down here when not given."""
    with D.session(cfg.device, dist) as dist, RunRecord(cfg.out, dist) as record:
        return _pretrain(cfg, Path(cfg.out), dist, record)


def _pretrain(cfg: PretrainConfig, run_dir: Path, dist: D.DistInfo, record: RunRecord) -> PretrainResult:
    precision, channels_last = device_defaults(dist.device, cfg.precision, cfg.channels_last)
    workers = datasets.default_workers() if cfg.workers is None else cfg.workers
    micro_steps = micro_batches(cfg.batch_size, dist.world_size, cfg.batch_split, cfg.device_batch)
    micro = D.per_rank_batch(cfg.batch_size, micro_steps, dist)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart:
        log.info("torchrun restart %d: continuing from %s if it holds a checkpoint", restart, run_dir)

    data = load_data(cfg)
    for note in data.notes:
        log.info(note)
    if cfg.head_bias is not None and not data.multi_label:
        raise BitlabError(f"--head-bias sets the multi-label head's bias, but {cfg.data} is single-label "
                          "(softmax, whose head starts at zero): leave --head-bias out")
    schedule = _schedule(cfg, len(data.train))
    aug = InceptionAugment(crop=cfg.crop, area=(cfg.crop_area_min, 1.0), flip=cfg.flip)
    torch.manual_seed(cfg.seed)  # the random initialisation is seeded
    model = build_model(cfg.model, data.num_classes, multi_label=data.multi_label, head_bias=cfg.head_bias)
    data_cfg = getattr(model, "data_config", None)
    mean, std = (data_cfg.mean, data_cfg.std) if data_cfg else ((0.5,) * 3, (0.5,) * 3)

    # rank 0 reads the run directory; a refusal stops every rank (none is left waiting below)
    previous = D.main_rank_call(lambda: _previous_plan(cfg, run_dir, data), dist)
    record.claim()  # the run directory is this run's now: a failure below goes into its summary.json
    train_data = TrainData(data.train, aug, batch_size=cfg.batch_size, micro_steps=micro_steps, seed=cfg.seed,
                           num_classes=data.num_classes, multi=data.multi_label, mean=mean, std=std, dist=dist,
                           workers=workers, skip_bad=cfg.skip_bad_images,
                           previous_layout=(previous or {}).get("shard_layout"))
    plan = {"num_examples": len(data.train), "num_classes": data.num_classes, "multi_label": data.multi_label,
            "loss": "sigmoid_xent" if data.multi_label else "softmax_xent",
            "head_bias": (default_head_bias(data.num_classes) if cfg.head_bias is None else cfg.head_bias)
            if data.multi_label else None,
            "val_size": len(data.val) if data.val is not None else 0, "schedule": schedule.to_dict(),
            "world_size": dist.world_size, "micro_steps": micro_steps, "micro_batch": micro,
            "workers": train_data.workers, "shard_layout": train_data.layout, "augment": aug.to_dict(),
            "precision": precision, "channels_last": channels_last,
            "data": "shards" if isinstance(data.train, ShardIndex) else "files"}
    if dist.is_main:
        write_config(run_dir, cfg)
        io.write_json(run_dir / "plan.json", plan)
        log.info("pre-training %s on %d images, %d classes (%s): %d steps (%.1f epochs), global batch %d = "
                 "%d process(es) x %d micro-step(s) x %d, peak lr %.3g, warm-up %d, decays at steps %s",
                 cfg.model, len(data.train), data.num_classes, plan["loss"], schedule.total_steps,
                 schedule.total_steps / schedule.steps_per_epoch, cfg.batch_size, dist.world_size, micro_steps, micro,
                 schedule.peak_lr, schedule.warmup_steps, list(schedule.decay_steps))

    evaluator = None
    if data.val is not None:
        evaluator = Evaluator(data.val, cfg.crop, multi=data.multi_label, num_classes=data.num_classes,
                              batch_size=cfg.eval_batch_size or micro, mean=mean, std=std, dist=dist, workers=workers,
                              skip_bad=cfg.skip_bad_images, precision=precision, channels_last=channels_last)
    loop_cfg = LoopConfig(total_steps=schedule.total_steps, eval_every=cfg.eval_every,
                          checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, precision=precision,
                          channels_last=channels_last, compile=cfg.compile, stop_after=cfg.stop_after,
                          progress=cfg.progress)
    result: LoopResult = run(
        model,
        make_optimizer=lambda m: torch.optim.SGD(param_groups(m, cfg.weight_decay, cfg.decay_all),
                                                 lr=schedule.peak_lr, momentum=MOMENTUM),
        data=train_data, lr_at=schedule.lr, loss_fn=sigmoid_xent if data.multi_label else softmax_xent,
        run_dir=run_dir, config=loop_cfg, dist=dist, evaluate=evaluator, resume=cfg.resume, model_name=cfg.model)
    bad = sorted(set().union(*D.all_gather_object(train_data.bad | (evaluator.bad if evaluator else set()), dist)))
    if dist.is_main:
        io.write_json(run_dir / "summary.json", {
            "completed": result.completed, "step": result.step, "total_steps": schedule.total_steps,
            "model": cfg.model, "num_examples": len(data.train), "num_classes": data.num_classes,
            "multi_label": data.multi_label, "world_size": dist.world_size, **result.final_metrics,
            "train_images_per_s": result.images_per_s, "bad_images": len(bad), "bad_image_messages": bad})
    return PretrainResult(run_dir=run_dir, completed=result.completed, step=result.step,
                          total_steps=schedule.total_steps, metrics=result.final_metrics, plan=plan,
                          stopped_by=result.stopped_by, bad_images=bad)


# ----------------------------------------------------------------------------- launching
def torchrun_command(argv: Sequence[str], nproc: int, *, max_restarts: int = 0,
                     python: str | None = None) -> list[str]:
    """The torchrun command line equivalent to `bitlab <argv>` with `--nproc`/`--max-restarts`
    removed: `python -m torch.distributed.run --standalone --nproc-per-node N -m bitlab ...`."""
    import sys

    if nproc < 1:
        raise BitlabError(f"--nproc must be at least 1, got {nproc}")
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--nproc", "--max-restarts"):
            skip = "=" not in arg
            continue
        rest.append(arg)
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "bitlab", *rest]
