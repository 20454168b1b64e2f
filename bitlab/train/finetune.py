"""`bitlab finetune` and `bitlab fewshot`: BiT-HyperRule transfer on any labelled image set.

The recipe is the official one (bit_pytorch/train.py with bit_hyperrule.py) with its defects
fixed: seeded few-shot subsets, a checkpoint at the end and on signals, exact resume (data order
and augmentation are functions of the step), DDP with `no_sync` micro-batches instead of
DataParallel, MixUp pairs that do not depend on `--batch-split`, and no partial batches (epochs
run into each other). The seed drives the few-shot subset, the data order, augmentation, MixUp
and any random initialisation.
"""
from __future__ import annotations

import csv
import functools
import io as _io
import json
import logging
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Sequence

import torch
from torch import nn

from bitlab import hyperrule, io
from bitlab.data import datasets
from bitlab.data.datasets import Batch, ImageSet, Splits
from bitlab.data.mixup import MixedTargets, mix, mixup_cross_entropy, step_mixup
from bitlab.data.transforms import TrainAugment, normalize
from bitlab.errors import BitlabError
from bitlab.models import checkpoints, registry
from bitlab.train import distributed as D
from bitlab.train.checkpoint import CHECKPOINT
from bitlab.train.config import LoopConfig, check_running, require
from bitlab.train.distributed import control_group, stop_on_errors
from bitlab.train.loop import LoopResult, MicroBatches, device_defaults, eval_logits, run
from bitlab.train.rundir import RunRecord, check_resume_settings, check_settings, write_config

log = logging.getLogger(__name__)

# What a resumed run must share with the run that wrote the checkpoint (else the data differ).
_RESUME_KEYS = ("model", "data", "val_data", "val_split", "val_fraction", "split_seed", "examples_per_class",
                "seed", "batch_size", "schedule", "scale_schedule", "image_size", "resolution", "mixup",
                "square_resize", "random_crop", "flip")
# What a finished few-shot run must share with the sweep that finds it, to be reused: the data and
# everything else that changes the result (a resumed run may change its lr, say after a NaN).
_REUSE_KEYS = (*_RESUME_KEYS, "pretrained", "base_lr")


@dataclass
class FinetuneConfig:
    """`bitlab finetune`: what to fine-tune on what, and how (saved as config.json)."""

    model: str
    data: str
    out: str
    pretrained: str | None = None
    val_data: str | None = None
    val_split: str | None = None
    val_fraction: float = 0.0
    examples_per_class: int | None = None
    seed: int = 0
    split_seed: int = 0  # the --val-fraction hold-out's, apart from --seed: a sweep's seeds share one
    batch_size: int = hyperrule.REFERENCE_BATCH
    batch_split: int = 1
    eval_batch_size: int | None = None  # default: the micro-batch size
    base_lr: float = hyperrule.BASE_LR
    schedule: list[int] | None = None  # [warm-up, decay1, decay2, decay3, total] instead of the rule's
    scale_schedule: bool = False
    mixup: float | None = None  # alpha instead of the rule's
    image_size: list[int] | None = None  # (H, W) the resolution rule sees; default: median of the data
    resolution: list[int] | None = None  # (resize, crop) instead of the rule's
    square_resize: bool = True
    random_crop: bool = True
    flip: bool = True
    eval_every: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    workers: int | None = None  # default: the CPU cores available
    device: str | None = None  # default: cuda if available
    precision: str | None = None  # default: bf16 on GPU, fp32 on CPU
    channels_last: bool | None = None  # default: on for GPU
    compile: bool = False
    skip_bad_images: bool = False
    resume: bool = False
    stop_after: int | None = None
    progress: bool = True

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("data", "val_data", "pretrained")  # compared resolved on resume
    RESUME_HINT: ClassVar[str] = "pass --resume"  # how a refused rerun continues a checkpoint

    def __post_init__(self) -> None:
        _validate(self)
        check_running(self)  # the loop's flags too, before any data is read


def _validate(cfg: FinetuneConfig) -> None:
    """Refuse values no run can use, naming the flag, before any data is read. (The loop's own
    knobs, --eval-every, --checkpoint-every, --log-every and --stop-after, are LoopConfig's.)"""
    need = functools.partial(require, cfg)

    def positive(values: Sequence[int] | None) -> bool:
        return values is None or (len(values) == 2 and min(values) > 0)

    need(cfg.batch_size >= 1, "batch_size", "at least 1")
    need(cfg.batch_split >= 1, "batch_split", "at least 1")
    need(cfg.eval_batch_size is None or cfg.eval_batch_size >= 1, "eval_batch_size", "at least 1")
    need(math.isfinite(cfg.base_lr) and cfg.base_lr > 0, "base_lr", "a positive number")
    need(cfg.mixup is None or (math.isfinite(cfg.mixup) and cfg.mixup >= 0), "mixup", "0 (off) or more")
    need(0 <= cfg.val_fraction < 1, "val_fraction", "at least 0 and below 1")
    need(cfg.seed >= 0, "seed", "0 or more")
    need(cfg.split_seed >= 0, "split_seed", "0 or more")
    need(cfg.workers is None or cfg.workers >= 0, "workers", "0 (load in the main process) or more")
    if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
        raise BitlabError(f"--pretrained {cfg.pretrained}: no such file")
    s = cfg.schedule
    need(s is None or (len(s) >= 2 and min(s) >= 0 and list(s) == sorted(s) and s[-1] > 0), "schedule",
         "increasing step counts WARMUP DECAY... TOTAL with TOTAL > 0")
    need(positive(cfg.image_size), "image_size", "two positive numbers H W")
    need(positive(cfg.resolution) and (cfg.resolution is None or cfg.resolution[1] <= cfg.resolution[0]),
         "resolution", "RESIZE CROP with 0 < CROP <= RESIZE")


@dataclass
class FinetuneResult:
    run_dir: Path
    completed: bool
    step: int
    metrics: dict
    plan: dict
    bad_images: list[str] = field(default_factory=list)
    stopped_by: str | None = None


# ----------------------------------------------------------------------------- model
def build_model(name: str, num_classes: int, pretrained: str | None) -> nn.Module:
    """`name` with a new zero-initialised `num_classes` head (BiT-HyperRule), weights from `pretrained`.

    bitlab names load official npz, bitlab and timm files strictly (the file's head is dropped);
    other (timm) models load every tensor but the classifier, strictly, then get a new head.
    """
    if registry.resolve(name) is not None:
        try:
            return registry.create_model(name, num_classes=num_classes, pretrained=pretrained, zero_head=True)
        except checkpoints.CheckpointMismatch as e:
            raise checkpoints.CheckpointMismatch(
                f"{e} (is it a checkpoint for another architecture than {name}?)") from None
    model = registry.create_model(name)
    if pretrained is not None:
        _load_backbone(model, pretrained)
    if not hasattr(model, "reset_classifier"):
        raise BitlabError(f"{name}: the model has no reset_classifier(); cannot give it a {num_classes}-class head")
    model.reset_classifier(num_classes)
    head = model.get_classifier()
    for p in head.parameters():
        nn.init.zeros_(p)
    return model


def _load_backbone(model: nn.Module, path: str) -> None:
    if checkpoints.is_timm_bit(model):  # takes official npz and bitlab files too, renamed for timm
        checkpoints.load_weights(model, path, keep_model_head=True)
        return
    state = io.torch_load(path)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise checkpoints.CheckpointError(f"{path}: not a state dict")
    head = {f"{n}.{k}" for n, m in model.named_modules() if m is model.get_classifier() for k in m.state_dict()}
    state = {k.removeprefix("module."): v for k, v in state.items() if k.removeprefix("module.") not in head}
    own = {k: v for k, v in model.state_dict().items() if k not in head}
    for key, ref in own.items():
        if key not in state:
            raise checkpoints.CheckpointError(f"{path}: missing key {key!r}: a checkpoint for another architecture?")
        if state[key].shape != ref.shape:
            raise checkpoints.CheckpointError(f"{path}: key {key!r} has shape {tuple(state[key].shape)}, "
                                              f"model expects {tuple(ref.shape)}")
    if extra := sorted(set(state) - set(own)):
        raise checkpoints.CheckpointError(
            f"{path}: unexpected key {extra[0]!r}: a checkpoint for another architecture?")
    model.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------- data
class _MixedMicroBatches(MicroBatches):
    """Micro-batches mixed on access with their partners in the whole step batch (one λ per step)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, split: int, lam: float,
                 perm: torch.Tensor, mean, std) -> None:
        super().__init__(images, labels, split, mean, std)
        self.lam, self.perm = lam, perm

    def __getitem__(self, k: int):
        x, labels = super().__getitem__(k)
        partner = self.perm[k * self.size:(k + 1) * self.size].to(self.images.device)
        x = mix(x, normalize(self.images[partner], self.mean, self.std), self.lam)
        return x, MixedTargets(labels, self.targets[partner], self.lam)


class TrainData:
    """The fine-tuning stream for `loop.run`: this rank's micro-batches of every step from `start` on."""

    def __init__(self, images: ImageSet, aug: TrainAugment, *, batch_size: int, batch_split: int, seed: int,
                 mixup_alpha: float, mean, std, dist: D.DistInfo, workers: int, skip_bad: bool) -> None:
        self.dataset = datasets.TrainImages(images, aug, seed=seed, skip_bad=skip_bad)
        self.micro = D.per_rank_batch(batch_size, batch_split, dist)
        self.batch_size, self.batch_split, self.seed = batch_size, batch_split, seed
        self.alpha, self.mean, self.std, self.dist = mixup_alpha, mean, std, dist
        self.workers, self.skip_bad = workers, skip_bad
        self.bad: set[str] = set()
        self.group = control_group(dist)

    def steps(self, start: int) -> Iterator[MicroBatches]:
        sampler = D.StepSampler(len(self.dataset), self.batch_size, seed=self.seed, start_step=start, info=self.dist)
        loader = datasets.make_loader(self.dataset, sampler, self.micro, workers=self.workers,
                                      pin_memory=self.dist.device.type == "cuda")
        it = iter(loader)
        step = start
        while True:
            parts: list[Batch] = [next(it) for _ in range(self.batch_split)]
            _check_bad([m for b in parts for m in b.bad], "training", self.skip_bad, self.bad, self.dist, self.group)
            images = torch.cat([b.images for b in parts]).to(self.dist.device, non_blocking=True)
            labels = torch.cat([b.labels for b in parts]).to(self.dist.device, non_blocking=True)
            lam, perm = step_mixup(self.alpha, self.seed, step, len(images))
            yield (MicroBatches(images, labels, self.batch_split, self.mean, self.std) if perm is None
                   else _MixedMicroBatches(images, labels, self.batch_split, lam, perm, self.mean, self.std))
            step += 1


def _check_bad(bad: Sequence[str], what: str, skip: bool, seen: set[str], dist: D.DistInfo, group=None) -> None:
    """Unreadable images: replaced and warned about once each with `skip`, else every rank stops
    together (a collective: every rank calls it at the same point)."""
    stop_on_errors([] if skip else list(bad), dist, what, group=group)
    for message in bad if skip else ():
        if message not in seen:
            log.warning("skipped: %s", message)
            seen.add(message)


class Evaluator:
    """Top-1, top-5 and mean cross-entropy over the validation set (sharded over ranks, summed)."""

    def __init__(self, images: ImageSet, crop: int, *, batch_size: int, mean, std, dist: D.DistInfo,
                 workers: int, skip_bad: bool, precision: str, channels_last: bool) -> None:
        self.loader = datasets.make_loader(
            datasets.EvalImages(images, crop), D.ShardSampler(len(images), dist), batch_size,
            workers=workers if len(images) > batch_size else 0, pin_memory=dist.device.type == "cuda", persistent=True)
        self.mean, self.std, self.dist, self.skip_bad = mean, std, dist, skip_bad
        self.precision, self.channels_last = precision, channels_last
        self.bad: set[str] = set()

    @torch.inference_mode()
    def __call__(self, model: nn.Module, step: int) -> dict:
        dev = self.dist.device
        sums = torch.zeros(4, dtype=torch.float64, device=dev)  # loss, top1, top5, n
        bad: list[str] = []
        for batch in self.loader:
            bad += batch.bad
            if not len(batch.images):
                continue
            logits = eval_logits(model, batch.images, mean=self.mean, std=self.std, device=dev,
                                 precision=self.precision, channels_last=self.channels_last)
            y = batch.labels.to(dev, non_blocking=True)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == y[:, None]
            sums += torch.stack([torch.nn.functional.cross_entropy(logits, y, reduction="sum").double(),
                                 hit[:, 0].sum().double(), hit.any(dim=1).sum().double(),
                                 torch.tensor(float(len(y)), dtype=torch.float64, device=dev)])
        # Every rank finishes its share first (no collective inside the loop: shares differ in size).
        _check_bad(bad, "validation", self.skip_bad, self.bad, self.dist)
        loss, top1, top5, n = D.all_reduce_sum(sums, self.dist).tolist()
        if n == 0:
            raise BitlabError("no readable validation images")
        return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "n": int(n)}


# ----------------------------------------------------------------------------- the command
def plan(cfg: FinetuneConfig, splits: Splits) -> dict:
    """What BiT-HyperRule chooses for this data, with the user's overrides applied."""
    image_size = tuple(cfg.image_size) if cfg.image_size else datasets.typical_image_size(splits.train)
    rule = hyperrule.hyperrule(len(splits.train), image_size, batch_size=cfg.batch_size, base_lr=cfg.base_lr,
                               scale_with_batch=cfg.scale_schedule)
    supports = tuple(cfg.schedule) if cfg.schedule else rule.supports
    resize, crop = cfg.resolution or (rule.resize, rule.crop)
    return {"hyperrule": rule.to_dict(), "dataset_size": len(splits.train), "num_classes": len(splits.classes),
            "val_size": len(splits.val), "image_size": list(image_size), "supports": list(supports),
            "total_steps": supports[-1], "resize": resize, "crop": crop, "base_lr": cfg.base_lr,
            "mixup_alpha": rule.mixup_alpha if cfg.mixup is None else cfg.mixup}


def load_data(cfg: FinetuneConfig) -> Splits:
    """The run's training and validation sets. A --val-fraction hold-out is drawn with
    --split-seed, not --seed, so every seed of a few-shot sweep is scored on the same images and
    draws its K per class from the same pool; --examples-per-class then picks by --seed."""
    splits = datasets.load_splits(cfg.data, val_data=cfg.val_data, val_split=cfg.val_split,
                                  val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    if cfg.examples_per_class is not None:  # 0 too: few_shot refuses it
        splits = Splits(datasets.few_shot(splits.train, cfg.examples_per_class, cfg.seed), splits.val, splits.notes)
    return splits


def batch_norm_warning(model: nn.Module, batch_size: int, micro: int) -> str | None:
    """Micro-batches give the same result as one batch only without BatchNorm, whose statistics
    come from each micro-batch (the official trainer had the same property)."""
    if micro >= batch_size or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None
    return (f"the model has BatchNorm, which normalises over each micro-batch of {micro} images rather than "
            f"the batch of {batch_size}: --batch-split (and the process count) change the results, not only memory")


def finetune(cfg: FinetuneConfig, dist: D.DistInfo | None = None) -> FinetuneResult:
    """Fine-tune `cfg.model` on `cfg.data` by BiT-HyperRule; writes the run directory `cfg.out`.

    Under torchrun every rank calls this; `dist` (from `distributed.setup`) is set up here when
    not given, and then also torn down here."""
    with D.session(cfg.device, dist) as dist, RunRecord(cfg.out, dist) as record:
        return _finetune(cfg, Path(cfg.out), dist, record)


def _finetune(cfg: FinetuneConfig, run_dir: Path, dist: D.DistInfo, record: RunRecord) -> FinetuneResult:
    precision, channels_last = device_defaults(dist.device, cfg.precision, cfg.channels_last)
    workers = datasets.default_workers() if cfg.workers is None else cfg.workers
    micro = D.per_rank_batch(cfg.batch_size, cfg.batch_split, dist)

    splits = load_data(cfg)
    for note in splits.notes:
        log.info(note)
    p = plan(cfg, splits)
    # The model before the claim: an unknown name or unusable weights file leaves no run folder behind.
    torch.manual_seed(cfg.seed)  # random initialisation (models trained from scratch) is seeded too
    model = build_model(cfg.model, len(splits.classes), cfg.pretrained)
    D.main_rank_call(lambda: check_resume_settings(run_dir, cfg, _RESUME_KEYS, resume=cfg.resume, counts={
        "dataset_size": p["dataset_size"], "num_classes": p["num_classes"]}), dist)
    record.claim()  # the run directory is this run's now: a failure below goes into its summary.json

    p["warnings"] = [w for w in (batch_norm_warning(model, cfg.batch_size, micro),) if w]
    if dist.is_main:
        for warning in p["warnings"]:
            log.warning(warning)
        write_config(run_dir, cfg)
        io.write_json(run_dir / "plan.json", p)
        if cfg.examples_per_class is not None:  # the picked files, to see (and check) what a seed chose
            io.write_text(run_dir / "fewshot_files.txt", "".join(
                f"{path}\t{splits.classes[label]}\n" for path, label in zip(splits.train.paths, splits.train.labels)))
    log.info("BiT-HyperRule: %d training images, %d classes, image %sx%s -> resize %d, crop %d; steps %s; "
             "mixup %.2g; lr %.3g at batch %d", p["dataset_size"], p["num_classes"], *p["image_size"], p["resize"],
             p["crop"], p["supports"], p["mixup_alpha"], cfg.base_lr, cfg.batch_size)

    data_cfg = getattr(model, "data_config", None)
    mean, std = (data_cfg.mean, data_cfg.std) if data_cfg else ((0.5,) * 3, (0.5,) * 3)
    aug = TrainAugment(p["resize"], p["crop"], cfg.square_resize, cfg.random_crop, cfg.flip)
    train_data = TrainData(splits.train, aug, batch_size=cfg.batch_size, batch_split=cfg.batch_split,
                           seed=cfg.seed, mixup_alpha=p["mixup_alpha"], mean=mean, std=std, dist=dist,
                           workers=workers, skip_bad=cfg.skip_bad_images)
    evaluator = Evaluator(splits.val, p["crop"], batch_size=cfg.eval_batch_size or micro, mean=mean, std=std,
                          dist=dist, workers=workers, skip_bad=cfg.skip_bad_images, precision=precision,
                          channels_last=channels_last)
    supports = tuple(p["supports"])
    loop_cfg = LoopConfig(total_steps=p["total_steps"], eval_every=cfg.eval_every,
                          checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, precision=precision,
                          channels_last=channels_last, compile=cfg.compile, stop_after=cfg.stop_after,
                          progress=cfg.progress)
    result: LoopResult = run(
        model,
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=cfg.base_lr, momentum=hyperrule.MOMENTUM,
                                                 weight_decay=0.0),  # paper §3.3: no weight decay in transfer
        data=train_data, lr_at=lambda step: hyperrule.lr_at(step, supports, cfg.base_lr),
        loss_fn=mixup_cross_entropy, run_dir=run_dir, config=loop_cfg, dist=dist, evaluate=evaluator,
        resume=cfg.resume, model_name=cfg.model)
    bad = sorted(set().union(*D.all_gather_object(train_data.bad | evaluator.bad, dist)))
    out = FinetuneResult(run_dir=run_dir, completed=result.completed, step=result.step,
                         metrics=result.final_metrics, plan=p, bad_images=bad,
                         stopped_by=result.stopped_by)
    if dist.is_main:
        io.write_json(run_dir / "summary.json", {
            "completed": result.completed, "step": result.step, "total_steps": p["total_steps"],
            "model": cfg.model, "examples_per_class": cfg.examples_per_class, "seed": cfg.seed,
            "dataset_size": p["dataset_size"], "num_classes": p["num_classes"], **result.final_metrics,
            "train_images_per_s": result.images_per_s, "bad_images": len(bad), "bad_image_messages": bad})
    return out


# ----------------------------------------------------------------------------- few-shot
@dataclass
class FewShotConfig(FinetuneConfig):
    """`bitlab fewshot`: one fine-tuning run per (K, seed), then median and spread per K."""

    shots: list[int] = field(default_factory=lambda: [1, 5, 10])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])

    def __post_init__(self) -> None:
        super().__post_init__()
        # Set per run by the sweep: a value given here would be silently overwritten.
        if self.seed != 0:
            raise BitlabError(f"fewshot: seed={self.seed} is not used; each run's seed comes from seeds (--seeds)")
        if self.resume:
            raise BitlabError("fewshot: resume=True is not used; a sweep resumes its stopped runs by itself")
        if bad := [k for k in self.shots if k < 1]:
            raise BitlabError(f"--shots must be positive, got {bad[0]}")
        if bad := [s for s in self.seeds if s < 0]:
            raise BitlabError(f"--seeds must be 0 or more, got {bad[0]}")


FEWSHOT_COLUMNS = ("k", "seed", "top1", "top5", "loss", "train_size", "steps", "run_dir")
SUMMARY_COLUMNS = ("k", "runs", "top1_median", "top1_min", "top1_max", "top1_std", "top5_median", "loss_median")


def fewshot(cfg: FewShotConfig) -> dict:
    """Run every (K, seed) under `cfg.out/k{K}_seed{S}` (finished runs are kept, interrupted ones
    resume; either only if made with the same settings; a finished run keeps final.pt, not its
    checkpoint.pt, which only resuming needs), then write `fewshot.csv` (one row per
    run) and `fewshot_summary.csv` (per K: median, min, max, std of top-1): the data of the paper's
    Fig. 2/5 few-shot curves."""
    out = Path(cfg.out)
    if not cfg.shots or not cfg.seeds:
        raise BitlabError("fewshot needs at least one --shots value and one --seeds value")
    base = {k: v for k, v in asdict(cfg).items() if k not in ("shots", "seeds")}
    with D.session(cfg.device) as dist:
        return _fewshot(cfg, out, base, dist)


def _fewshot(cfg: FewShotConfig, out: Path, base: dict, dist: D.DistInfo) -> dict:
    runs = {(k, seed): FinetuneConfig(**{**base, "out": str(out / f"k{k}_seed{seed}"), "examples_per_class": k,
                                         "seed": seed, "resume": (out / f"k{k}_seed{seed}" / CHECKPOINT).exists()})
            for k in cfg.shots for seed in cfg.seeds}

    def check(c: FinetuneConfig) -> None:
        run_dir = Path(c.out)
        if _read_summary(run_dir) is not None and not (run_dir / CHECKPOINT).exists():
            check_settings(run_dir, c, _REUSE_KEYS)  # finished, its checkpoint removed: config.json says how
        else:
            check_resume_settings(run_dir, c, _REUSE_KEYS)

    # Every earlier run (finished or interrupted) must have been made with these settings, checked
    # before anything is written: else its numbers would join the new ones.
    D.main_rank_call(lambda: [check(c) for c in runs.values()], dist)
    if dist.is_main:
        write_config(out, cfg)
    rows = []
    for (k, seed), run_cfg in runs.items():
        run_dir = Path(run_cfg.out)
        summary = _read_summary(run_dir)  # None until the run finished (and was scored)
        if summary is None:
            log.info("few-shot run: %d per class, seed %d -> %s", k, seed, run_dir)
            result = finetune(run_cfg, dist)
            if not result.completed:
                return {"runs": rows, "stopped": result}
            summary = {**result.metrics, "dataset_size": result.plan["dataset_size"], "step": result.step}
        if dist.is_main and _read_summary(run_dir) is not None:
            # Finished and summarised: the resume state (optimizer, RNG) is dead weight beside final.pt.
            (run_dir / CHECKPOINT).unlink(missing_ok=True)
        rows.append({"k": k, "seed": seed, "top1": summary["top1"], "top5": summary["top5"],
                     "loss": summary["loss"], "train_size": summary["dataset_size"], "steps": summary["step"],
                     "run_dir": run_dir.name})
    summary_rows = summarize_fewshot(rows)
    if dist.is_main:
        _write_csv(out / "fewshot.csv", FEWSHOT_COLUMNS, rows)
        _write_csv(out / "fewshot_summary.csv", SUMMARY_COLUMNS, summary_rows)
    return {"runs": rows, "summary": summary_rows, "csv": out / "fewshot.csv",
            "summary_csv": out / "fewshot_summary.csv", "stopped": None}


def summarize_fewshot(rows: list[dict]) -> list[dict]:
    """Per K: the median and spread of top-1 over seeds."""
    out = []
    for k in sorted({r["k"] for r in rows}):
        top1 = [r["top1"] for r in rows if r["k"] == k]
        out.append({"k": k, "runs": len(top1), "top1_median": statistics.median(top1), "top1_min": min(top1),
                    "top1_max": max(top1), "top1_std": statistics.pstdev(top1),
                    "top5_median": statistics.median(r["top5"] for r in rows if r["k"] == k),
                    "loss_median": statistics.median(r["loss"] for r in rows if r["k"] == k)})
    return out


def read_fewshot(out: str | Path):
    """`fewshot.csv` of a `bitlab fewshot` folder as a DataFrame (one row per K and seed), with the
    number of classes each run learnt (`num_classes`, from its summary.json) for chance level and
    the weights the sweep started from (`pretrained`, from its config.json; None: from scratch,
    "unknown" without a config.json)."""
    import pandas as pd

    out = Path(out)
    path = out / "fewshot.csv"
    if not path.is_file():
        raise BitlabError(f"{path}: no few-shot results (run `bitlab fewshot --out {out}` first)")
    runs = pd.read_csv(path)
    if missing := [c for c in ("k", "seed", "top1") if c not in runs.columns]:
        raise BitlabError(f"{path}: missing column(s) {', '.join(missing)}")
    runs["num_classes"] = [(_read_summary(out / d) or {}).get("num_classes") for d in runs["run_dir"]]
    config = out / "config.json"
    runs["pretrained"] = json.loads(config.read_text()).get("pretrained") if config.is_file() else "unknown"
    return runs


def _read_summary(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("completed") and not math.isnan(summary.get("top1", math.nan)) else None


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, columns)
    writer.writeheader()
    writer.writerows(rows)
    io.write_text(path, buf.getvalue())
