"""`bitlab pretrain`: BiT upstream pre-training, from one CPU process to many GPU nodes (torchrun / DDP).

The recipe (`upstream.py`, paper §3.3): SGD with momentum, lr 0.03 x global batch / 256 after a
linear warm-up, weight decay 1e-4 (not on normalisation parameters and biases, as is usual for
ResNets; `decay_all` to include them), lr / 10 at the preset's epochs; Inception crop + random
horizontal flip, inputs in [-1, 1] (OpenCV, in the workers). What this task adds to the shared
command (`command.train`):

- Softmax cross-entropy for single-label data; sigmoid cross-entropy (summed over classes, mean
  over images, as big_vision's `sigmoid_xent`) for multi-label data, with the head bias at
  `upstream.default_head_bias` (-log C: every class starts at about its prior) unless given.
- The global batch is fixed: each of W processes runs micro-batches of global / (W x micro-steps),
  the micro-steps raised to fit `device_batch`. With GroupNorm the result does not depend on W or
  the split; BatchNorm ablations normalise over each micro-batch, so their runs differ by design.
- Data: an ImageFolder tree, a single-label CSV, a multi-label CSV or JSON lines
  (`bitlab.data.multilabel`), or a shard set written by `bitlab shards` (`bitlab.data.shards`).
  File sets are sampled by `StepSampler` (the same data order on any number of processes); shard
  sets stream per reader (`ShardStream`), whose layout (processes x workers) `plan.json` records:
  a resume on another layout restarts the stream at the next epoch, with a warning.

Faults are the engine's (`loop.py`): a bad image or shard stops every rank, named, after a
checkpoint; a NaN stops before the update. With `torchrun --max-restarts N` a dead worker restarts
the job, which resumes from `checkpoint.pt`; a SIGTERM stop exits 0 on every rank
(`cli.train.report_unfinished`), so it is not restarted.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bitlab.data import datasets, shards
from bitlab.data.datasets import ImageSet
from bitlab.data.loader import ShardTrainViews, TrainFiles, make_loader
from bitlab.data.multilabel import MultiLabelSet, load_labelled, random_holdout, read_classes, relabel
from bitlab.data.shards import ShardIndex
from bitlab.data.transforms import InceptionAugment, inception_image, upstream_eval_image
from bitlab.errors import BitlabError, ConfigError
from bitlab.models import ResNetV2, registry
from bitlab.train import distributed as D
from bitlab.train.command import Env, LoaderSteps, Parts, TrainResult, train
from bitlab.train.config import PretrainConfig
from bitlab.train.evaluators import Evaluator
from bitlab.train.upstream import MOMENTUM, UpstreamSchedule, default_head_bias, micro_batches

log = logging.getLogger(__name__)

# Keeps upstream augmentation randomness apart from other streams of the same seed.
_AUG_STREAM = 0x757073
# What a resumed run must share with the run that wrote the checkpoint (else data or schedule differ).
_RESUME_KEYS = ("model", "data", "classes", "label_sep", "val_fraction", "preset", "epochs", "decay_epochs",
                "warmup_steps", "batch_size", "base_lr", "weight_decay", "decay_all", "crop", "crop_area_min",
                "flip", "head_bias", "seed")

Source = ImageSet | MultiLabelSet | ShardIndex


# ----------------------------------------------------------------------------- model and loss
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


# ----------------------------------------------------------------------------- data
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


def _validation(cfg: PretrainConfig, splits: dict[str, Source], train: Source, classes: list[str]
                ) -> tuple[Source, Source | None, list[str]]:
    """(train, validation or None, notes): from `val_data`, the source's own split, or a held-out fraction."""
    if cfg.val_data:
        other = _open(cfg.val_data, cfg.label_sep, classes)
        pick = next((n for n in (*datasets.VAL_SPLIT_NAMES, "all") if n in other), None)
        if pick is None:
            raise BitlabError(f"{cfg.val_data}: no validation split (found: {', '.join(sorted(other))})")
        return train, other[pick], []
    if found := next((n for n in datasets.VAL_SPLIT_NAMES if n in splits), None):
        return train, splits[found], []
    if cfg.val_fraction <= 0:
        return train, None, []
    if isinstance(train, ShardIndex):
        raise ConfigError("val_fraction", "{setting} needs a file data set; for shards write a validation shard set "
                                          "and pass it as the validation data")
    held = random_holdout if isinstance(train, MultiLabelSet) else datasets.stratified_holdout
    train, val = held(train, cfg.val_fraction, cfg.seed)
    return train, val, [f"validation: {len(val)} images held out of {cfg.data} ({cfg.val_fraction:.0%}, "
                        f"seed {cfg.seed})"]


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
    train, val, notes = _validation(cfg, splits, train, classes)
    where = cfg.val_data or cfg.data
    if val is not None and _is_multi(val) != _is_multi(train):
        raise BitlabError(f"{where}: validation and training data must both be single-label or both multi-label")
    if isinstance(val, ImageSet):
        val = relabel(val, classes)
    elif val is not None and list(val.classes) != classes:
        raise BitlabError(f"{where}: its {len(val.classes)} classes are not the training set's {len(classes)} "
                          "(same names in the same order); write both with the same class list")
    if len(classes) < 2 and not _is_multi(train):
        raise BitlabError(f"{cfg.data}: single-label training needs at least 2 classes, found {len(classes)}")
    return UpstreamData(train, val, classes, _is_multi(train), notes)


class TrainData(LoaderSteps):
    """The pre-training stream for `loop.run`: this rank's micro-batches of every step from `start` on."""

    def __init__(self, source: Source, aug: InceptionAugment, plan: PretrainPlan, cfg: PretrainConfig, env: Env,
                 previous_layout: dict | None) -> None:
        super().__init__(self._loader, plan.micro_steps, mean=env.mean, std=env.std, dist=env.dist,
                         skip_bad=cfg.skip_bad_images)
        self.source, self.plan, self.cfg, self.previous_layout = source, plan, cfg, previous_layout
        self.view = functools.partial(inception_image, aug=aug)

    def _loader(self, start: int):
        cfg, plan, dist = self.cfg, self.plan, self.dist
        pin = dist.device.type == "cuda"
        if not isinstance(self.source, ShardIndex):
            dataset = TrainFiles(self.source, self.view, seed=cfg.seed, stream=_AUG_STREAM, skip_bad=self.skip_bad)
            sampler = D.StepSampler(len(dataset), cfg.batch_size, seed=cfg.seed, start_step=start, info=dist)
            return make_loader(dataset, plan.micro_batch, sampler=sampler, workers=plan.workers, pin_memory=pin)
        start_step, start_epoch = start, 0
        if start and self.previous_layout and self.previous_layout != plan.shard_layout:
            # The per-reader streams depend on the layout: the consumed samples cannot be
            # skipped exactly, so a fresh pass starts at the next epoch boundary.
            start_step, start_epoch = 0, math.ceil(start * cfg.batch_size / self.source.num_samples)
            log.warning("the shard stream was read as %s and is now read as %s: resuming at the start of "
                        "epoch %d instead of the exact sample", self.previous_layout, plan.shard_layout, start_epoch)
        views = ShardTrainViews(self.view, num_classes=plan.num_classes, multi=plan.multi_label, seed=cfg.seed,
                                stream=_AUG_STREAM, skip_bad=self.skip_bad)
        stream = shards.ShardStream(self.source, views, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                                    workers=plan.workers, micro_batch=plan.micro_batch, micro_steps=plan.micro_steps,
                                    start_step=start_step, start_epoch=start_epoch, on_error=views.error)
        return make_loader(stream, plan.micro_batch, workers=plan.workers, pin_memory=pin)


# ----------------------------------------------------------------------------- the task
@dataclass
class PretrainPlan:
    """What the run does with this data on these processes (plan.json)."""

    num_examples: int
    num_classes: int
    multi_label: bool
    loss: str  # softmax_xent | sigmoid_xent
    head_bias: float | None  # multi-label only
    val_size: int
    schedule: UpstreamSchedule
    world_size: int
    micro_steps: int
    micro_batch: int
    workers: int
    # Shard sets: what each reader's stream and its resume position depend on.
    shard_layout: dict | None
    augment: InceptionAugment
    precision: str
    channels_last: bool
    data: str  # shards | files

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    def counts(self) -> dict[str, int]:
        """What a resumed run's data must still count."""
        return {"num_examples": self.num_examples, "num_classes": self.num_classes}

    def to_dict(self) -> dict:
        return asdict(self)


class Pretrain:
    """Upstream pre-training as a `command.Task`."""

    resume_keys = _RESUME_KEYS

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.aug = InceptionAugment(crop=cfg.crop, area=(cfg.crop_area_min, 1.0), flip=cfg.flip)

    def load(self) -> UpstreamData:
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if restart:
            log.info("torchrun restart %d: continuing from %s if it holds a checkpoint", restart, self.cfg.out)
        data = load_data(self.cfg)
        if self.cfg.head_bias is not None and not data.multi_label:
            raise ConfigError("head_bias", f"{{setting}} sets the multi-label head's bias, but {self.cfg.data} is "
                                           "single-label (softmax, whose head starts at zero): leave {setting} out")
        return data

    def build_model(self, data: UpstreamData) -> nn.Module:
        return build_model(self.cfg.model, data.num_classes, multi_label=data.multi_label, head_bias=self.cfg.head_bias)

    def plan(self, data: UpstreamData, model: nn.Module, env: Env) -> PretrainPlan:
        cfg, dist = self.cfg, env.dist
        micro_steps = micro_batches(cfg.batch_size, dist.world_size, cfg.batch_split, cfg.device_batch)
        micro = D.per_rank_batch(cfg.batch_size, micro_steps, dist)
        workers, layout = env.workers, None
        if isinstance(data.train, ShardIndex):  # every reader (rank x worker) needs a shard per epoch
            workers = shards.reader_layout(len(data.train.shards), dist.world_size, env.workers)
            layout = {"readers": dist.world_size * max(workers, 1), "micro_batch": micro, "micro_steps": micro_steps}
        head_bias = (default_head_bias(data.num_classes) if cfg.head_bias is None else cfg.head_bias) \
            if data.multi_label else None
        return PretrainPlan(
            num_examples=len(data.train), num_classes=data.num_classes, multi_label=data.multi_label,
            loss="sigmoid_xent" if data.multi_label else "softmax_xent", head_bias=head_bias,
            val_size=len(data.val) if data.val is not None else 0, schedule=cfg.schedule(len(data.train)),
            world_size=dist.world_size, micro_steps=micro_steps, micro_batch=micro, workers=workers,
            shard_layout=layout, augment=self.aug, precision=env.precision, channels_last=env.channels_last,
            data="shards" if isinstance(data.train, ShardIndex) else "files")

    def record(self, data: UpstreamData, plan: PretrainPlan, run_dir: Path) -> None:
        s = plan.schedule
        log.info("pre-training %s on %d images, %d classes (%s): %d steps (%.1f epochs), global batch %d = "
                 "%d process(es) x %d micro-step(s) x %d, peak lr %.3g, warm-up %d, decays at steps %s",
                 self.cfg.model, plan.num_examples, plan.num_classes, plan.loss, s.total_steps,
                 s.total_steps / s.steps_per_epoch, self.cfg.batch_size, plan.world_size, plan.micro_steps,
                 plan.micro_batch, s.peak_lr, s.warmup_steps, list(s.decay_steps))

    def parts(self, data: UpstreamData, plan: PretrainPlan, env: Env, previous: dict | None) -> Parts:
        cfg = self.cfg
        evaluator = None
        if data.val is not None:
            evaluator = Evaluator(data.val, functools.partial(upstream_eval_image, crop=cfg.crop),
                                  batch_size=cfg.eval_batch_size or plan.micro_batch, mean=env.mean, std=env.std,
                                  dist=env.dist, workers=env.workers, skip_bad=cfg.skip_bad_images,
                                  precision=env.precision, channels_last=env.channels_last)
        return Parts(TrainData(data.train, self.aug, plan, cfg, env, (previous or {}).get("shard_layout")), evaluator,
                     lambda m: torch.optim.SGD(param_groups(m, cfg.weight_decay, cfg.decay_all),
                                               lr=plan.schedule.peak_lr, momentum=MOMENTUM),
                     plan.schedule.lr, sigmoid_xent if data.multi_label else softmax_xent)

    def summary(self, plan: PretrainPlan) -> dict:
        return {"num_examples": plan.num_examples, "num_classes": plan.num_classes, "multi_label": plan.multi_label,
                "world_size": plan.world_size}


def pretrain(cfg: PretrainConfig, dist: D.DistInfo | None = None) -> TrainResult:
    """Pre-train `cfg.model` on `cfg.data`; writes the run directory `cfg.out` (with the reason
    when the run dies: `rundir.RunRecord`).

    Under torchrun every rank calls this; `dist` (from `distributed.setup`) is set up and torn
    down here when not given."""
    return train(Pretrain(cfg), cfg, dist)
