"""`bitlab pretrain`: BiT upstream pre-training, from one CPU process to many GPU nodes (torchrun / DDP).

The recipe is `upstream.py`'s, the command `command.train`'s. This task adds: softmax cross-entropy
(single-label) or sigmoid cross-entropy summed over classes (multi-label, as big_vision's, head
bias `upstream.default_head_bias`); no weight decay on norm parameters and biases unless
`decay_all`; a global batch fixed over W processes x micro-steps (the same result with GroupNorm;
BatchNorm ablations normalise per micro-batch, by design); file sets by `StepSampler` (the same
order on any W) or shard sets by `ShardStream` per reader (a resume on another reader layout
restarts at the next epoch). A SIGTERM stop exits 0 (`cli.train.report_unfinished`), so `torchrun
--max-restarts` restarts only dead workers, which resume from checkpoint.pt.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bitlab.data import datasets, shards
from bitlab.data.datasets import ImageSet, Splits
from bitlab.data.loader import ShardViews, TrainFiles, make_loader
from bitlab.data.multilabel import MultiLabelSet, load_labelled, random_holdout, read_classes, relabel
from bitlab.data.shards import ShardIndex
from bitlab.data.transforms import (UPSTREAM_EVAL_CROP_PCT, DataConfig, InceptionAugment, inception_image,
                                    upstream_eval_image)
from bitlab.errors import BitlabError, ConfigError
from bitlab.models import registry
from bitlab.train import distributed as D
from bitlab.train.command import Env, LoaderSteps, Parts, train
from bitlab.train.loop import TrainResult
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
    head = getattr(model, "get_classifier", lambda: None)()
    if not isinstance(head, (nn.Linear, nn.Conv2d)):
        raise BitlabError(f"{type(model).__name__}: cannot find a linear classifier to initialise")
    return head


def build_model(name: str, num_classes: int, *, multi_label: bool, head_bias: float | None = None) -> nn.Module:
    """A randomly initialised registry model (pre-training starts from scratch by design) with a
    `num_classes` head; multi-label heads get the rare-positive bias."""
    model = registry.create_model(name, num_classes=num_classes, pretrained=False)
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


def _holdout(train: Source, fraction: float, seed: int) -> tuple[Source, Source]:
    if isinstance(train, ShardIndex):
        raise ConfigError("val_fraction", "{setting} needs a file data set; for shards write a validation shard set "
                                          "and pass it as the validation data")
    return (random_holdout if train.multi_label else datasets.stratified_holdout)(train, fraction, seed)


def load_data(cfg: PretrainConfig) -> Splits:
    """Training and (optional) validation sources from `cfg.data` / `cfg.val_data`."""
    classes = read_classes(cfg.classes) if cfg.classes else None
    splits = _open(cfg.data, cfg.label_sep, classes)
    train = splits.get("train") or splits.get("all")
    if train is None:
        raise BitlabError(f"{cfg.data}: no training split (found: {', '.join(sorted(splits))})")
    if classes is not None and list(train.classes) != classes:
        raise BitlabError(f"{cfg.data}: its classes differ from {cfg.classes}")
    classes = list(train.classes)
    train, val, notes = datasets.split_off_validation(
        splits, cfg.data, open_source=lambda spec: _open(spec, cfg.label_sep, classes), val_data=cfg.val_data,
        val_fraction=cfg.val_fraction, seed=cfg.seed, holdout=_holdout)
    where = cfg.val_data or cfg.data
    if val is not None and val.multi_label != train.multi_label:
        raise BitlabError(f"{where}: validation and training data must both be single-label or both multi-label")
    if isinstance(val, ImageSet):
        val = relabel(val, classes)
    elif val is not None and list(val.classes) != classes:
        raise BitlabError(f"{where}: its {len(val.classes)} classes are not the training set's {len(classes)} "
                          "(same names in the same order); write both with the same class list")
    if len(classes) < 2 and not train.multi_label:
        raise BitlabError(f"{cfg.data}: single-label training needs at least 2 classes, found {len(classes)}")
    return Splits(train, val, notes)


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
    shard_layout: dict | None  # shard sets: what each reader's stream and its resume position depend on
    augment: InceptionAugment
    precision: str
    channels_last: bool
    data: str  # shards | files

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    def counts(self) -> dict[str, int]:
        return {"num_examples": self.num_examples, "num_classes": self.num_classes}

    def to_dict(self) -> dict:
        return asdict(self)


class Pretrain:
    """Upstream pre-training as a `command.Task`."""

    name = "pretrain"
    resume_keys = _RESUME_KEYS

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.aug = InceptionAugment(crop=cfg.crop, area=(cfg.crop_area_min, 1.0), flip=cfg.flip)

    def load(self) -> Splits:
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if restart:
            log.info("torchrun restart %d: continuing from %s if it holds a checkpoint", restart, self.cfg.out)
        data = load_data(self.cfg)
        if self.cfg.head_bias is not None and not data.multi_label:
            raise ConfigError("head_bias", f"{{setting}} sets the multi-label head's bias, but {self.cfg.data} is "
                                           "single-label (softmax, whose head starts at zero): leave {setting} out")
        return data

    def build_model(self, data: Splits) -> nn.Module:
        return build_model(self.cfg.model, len(data.classes), multi_label=data.multi_label,
                           head_bias=self.cfg.head_bias)

    def plan(self, data: Splits, model: nn.Module, env: Env) -> PretrainPlan:
        cfg, dist = self.cfg, env.dist
        micro_steps = micro_batches(cfg.batch_size, dist.world_size, cfg.batch_split, cfg.device_batch)
        micro = D.per_rank_batch(cfg.batch_size, micro_steps, dist)
        workers, layout = env.workers, None
        if isinstance(data.train, ShardIndex):  # every reader (rank x worker) needs a shard per epoch
            workers = shards.reader_layout(len(data.train.shards), dist.world_size, env.workers)
            layout = {"readers": dist.world_size * max(workers, 1), "micro_batch": micro, "micro_steps": micro_steps}
        head_bias = (default_head_bias(len(data.classes)) if cfg.head_bias is None else cfg.head_bias) \
            if data.multi_label else None
        return PretrainPlan(
            num_examples=len(data.train), num_classes=len(data.classes), multi_label=data.multi_label,
            loss="sigmoid_xent" if data.multi_label else "softmax_xent", head_bias=head_bias,
            val_size=len(data.val) if data.val is not None else 0, schedule=cfg.schedule(len(data.train)),
            world_size=dist.world_size, micro_steps=micro_steps, micro_batch=micro, workers=workers,
            shard_layout=layout, augment=self.aug, precision=env.precision, channels_last=env.channels_last,
            data="shards" if isinstance(data.train, ShardIndex) else "files")

    def record(self, data: Splits, plan: PretrainPlan, run_dir: Path) -> None:
        s = plan.schedule
        log.info("pre-training %s on %d images, %d classes (%s): %d steps (%.1f epochs), global batch %d = "
                 "%d process(es) x %d micro-step(s) x %d, peak lr %.3g, warm-up %d, decays at steps %s",
                 self.cfg.model, plan.num_examples, plan.num_classes, plan.loss, s.total_steps,
                 s.total_steps / s.steps_per_epoch, self.cfg.batch_size, plan.world_size, plan.micro_steps,
                 plan.micro_batch, s.peak_lr, s.warmup_steps, list(s.decay_steps))

    def parts(self, data: Splits, plan: PretrainPlan, env: Env, previous: dict | None) -> Parts:
        cfg = self.cfg
        evaluator = None
        if data.val is not None:
            evaluator = Evaluator(data.val, functools.partial(upstream_eval_image, crop=cfg.crop), env,
                                  batch_size=cfg.eval_batch_size or plan.micro_batch, skip_bad=cfg.skip_bad_images)
        loaders = functools.partial(self._loader, data.train, plan, env, (previous or {}).get("shard_layout"))
        return Parts(LoaderSteps(loaders, plan.micro_steps, env, skip_bad=cfg.skip_bad_images), evaluator,
                     lambda m: torch.optim.SGD(param_groups(m, cfg.weight_decay, cfg.decay_all),
                                               lr=plan.schedule.peak_lr, momentum=MOMENTUM),
                     plan.schedule.lr, sigmoid_xent if data.multi_label else softmax_xent)

    def _loader(self, source: Source, plan: PretrainPlan, env: Env, previous_layout: dict | None, start: int):
        """The training loader from step `start` on: a file set's, or a shard set's stream."""
        cfg, dist, view = self.cfg, env.dist, functools.partial(inception_image, aug=self.aug)
        pin = dist.device.type == "cuda"
        if not isinstance(source, ShardIndex):
            dataset = TrainFiles(source, view, seed=cfg.seed, stream=_AUG_STREAM, skip_bad=cfg.skip_bad_images)
            sampler = D.StepSampler(len(dataset), cfg.batch_size, seed=cfg.seed, start_step=start, info=dist)
            return make_loader(dataset, plan.micro_batch, sampler=sampler, workers=plan.workers, pin_memory=pin)
        start_step, start_epoch = start, 0
        if start and previous_layout and previous_layout != plan.shard_layout:
            # The per-reader streams depend on the layout: the consumed samples cannot be
            # skipped exactly, so a fresh pass starts at the next epoch boundary.
            start_step, start_epoch = 0, math.ceil(start * cfg.batch_size / source.num_samples)
            log.warning("the shard stream was read as %s and is now read as %s: resuming at the start of "
                        "epoch %d instead of the exact sample", previous_layout, plan.shard_layout, start_epoch)
        views = ShardViews(view, num_classes=plan.num_classes, multi=plan.multi_label, seed=cfg.seed,
                           stream=_AUG_STREAM, skip_bad=cfg.skip_bad_images)
        stream = shards.ShardStream(source, views, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                                    workers=plan.workers, micro_batch=plan.micro_batch, micro_steps=plan.micro_steps,
                                    start_step=start_step, start_epoch=start_epoch, on_error=views.error)
        return make_loader(stream, plan.micro_batch, workers=plan.workers, pin_memory=pin)

    def summary(self, plan: PretrainPlan) -> dict:
        return {"num_examples": plan.num_examples, "num_classes": plan.num_classes, "multi_label": plan.multi_label,
                "world_size": plan.world_size}

    def model_record(self, data: Splits, plan: PretrainPlan, env: Env) -> dict:
        """The classes in head order, the validation view (`upstream_eval_image`) and the data itself."""
        view = DataConfig(input_size=self.cfg.crop, mean=env.mean, std=env.std, crop_pct=UPSTREAM_EVAL_CROP_PCT)
        return {"classes": list(data.classes), "data_config": view.to_dict(),
                "pretraining_data": f"{Path(self.cfg.data).name or self.cfg.data} (bitlab pretrain)"}


def pretrain(cfg: PretrainConfig, dist: D.DistInfo | None = None) -> TrainResult:
    """Pre-train `cfg.model` on `cfg.data` into the run directory `cfg.out` (`command.train`)."""
    return train(Pretrain(cfg), cfg, dist)
