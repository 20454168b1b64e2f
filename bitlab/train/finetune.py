"""`bitlab finetune` and `bitlab fewshot`: BiT-HyperRule transfer on any labelled image set.

The official recipe (bit_pytorch/train.py with bit_hyperrule.py) with its defects fixed: seeded
few-shot subsets, exact resume, MixUp pairs that do not depend on `--batch-split`, no partial
batches (epochs run into each other). The seed drives the few-shot subset, the data order,
augmentation, MixUp and any random initialisation; the rest of the command is `command.train`'s.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from bitlab import hyperrule, fileio
from bitlab.data import datasets
from bitlab.data.datasets import Splits
from bitlab.data.loader import TrainFiles, default_workers, make_loader
from bitlab.data.mixup import MixedTargets, mix, mixup_cross_entropy, step_mixup
from bitlab.data.transforms import DataConfig, TrainAugment, normalize, square_eval_image, train_image
from bitlab.errors import BitlabError, ConfigError
from bitlab.models import checkpoints, registry
from bitlab.train import distributed as D
from bitlab.train.checkpoint import CHECKPOINT
from bitlab.train.command import Env, LoaderSteps, Parts, train, train_side_by_side
from bitlab.train.config import FewShotConfig, FinetuneConfig
from bitlab.train.evaluators import Evaluator
from bitlab.train.loop import MicroBatches, TrainResult
from bitlab.train.rundir import check_resume_settings, check_settings, lock_run_folder, write_config, write_csv

log = logging.getLogger(__name__)

# What a resumed run must share with the run that wrote the checkpoint (else the data differ).
_RESUME_KEYS = ("model", "data", "val_data", "val_split", "val_fraction", "split_seed", "examples_per_class",
                "seed", "batch_size", "schedule", "scale_schedule", "image_size", "resolution", "mixup",
                "square_resize", "random_crop", "flip")
# What a finished few-shot run must share with the sweep that finds it, to be reused: the data and
# everything else that changes the result (a resumed run may change its lr, say after a NaN).
_REUSE_KEYS = (*_RESUME_KEYS, "pretrained", "random_init", "base_lr")
_AUG_STREAM = 0x617567  # keeps augmentation randomness apart from other streams of the same seed


# ----------------------------------------------------------------------------- model
def build_model(name: str, num_classes: int, pretrained: str | bool = True) -> nn.Module:
    """`name` with a new zero-initialised `num_classes` head (BiT-HyperRule), its other weights from
    `pretrained`: True, those the name stands for (`registry.create_model`); a file; False, random.

    bitlab names load official npz, bitlab and timm files strictly (the file's head is dropped);
    other (timm) models load every tensor but the classifier, strictly, then get a new head.
    """
    if registry.resolve(name) is not None:
        try:
            return registry.create_model(name, num_classes=num_classes, pretrained=pretrained, zero_head=True)
        except checkpoints.CheckpointMismatch as e:
            raise checkpoints.CheckpointMismatch(
                f"{e} (is it a checkpoint for another architecture than {name}?)") from None
    from_file = not registry.own_weights(pretrained) and pretrained is not False
    model = registry.create_model(name, pretrained=False if from_file else pretrained)
    if from_file:
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
    state = fileio.torch_load(path)
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


def batch_norm_warning(model: nn.Module, batch_size: int, micro: int) -> str | None:
    """Micro-batches give the same result as one batch only without BatchNorm, whose statistics
    come from each micro-batch (the official trainer had the same property)."""
    if micro >= batch_size or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None
    return (f"the model has BatchNorm, which normalises over each micro-batch of {micro} images rather than "
            f"the batch of {batch_size}: --batch-split (and the process count) change the results, not only memory")


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


def load_data(cfg: FinetuneConfig) -> Splits:
    """The run's training and validation sets. A --val-fraction hold-out is drawn with
    --split-seed, not --seed, so every seed of a few-shot sweep is scored on the same images and
    draws its K per class from the same pool; --examples-per-class then picks by --seed."""
    splits = datasets.load_splits(cfg.data, val_data=cfg.val_data, val_split=cfg.val_split,
                                  val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    if cfg.examples_per_class is not None:  # 0 too: few_shot refuses it
        splits = Splits(datasets.few_shot(splits.train, cfg.examples_per_class, cfg.seed), splits.val, splits.notes)
    return splits


# ----------------------------------------------------------------------------- the task
@dataclass
class FinetunePlan:
    """What BiT-HyperRule chooses for this data, with the user's overrides applied (plan.json)."""

    hyperrule: dict  # the rule's own choice
    dataset_size: int
    num_classes: int
    val_size: int
    image_size: list[int]
    supports: list[int]  # warm-up, decays, total
    total_steps: int
    resize: int
    crop: int
    base_lr: float
    mixup_alpha: float
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"dataset_size": self.dataset_size, "num_classes": self.num_classes}

    def to_dict(self) -> dict:
        return asdict(self)


def plan(cfg: FinetuneConfig, splits: Splits) -> FinetunePlan:
    image_size = tuple(cfg.image_size) if cfg.image_size else datasets.typical_image_size(splits.train)
    rule = hyperrule.hyperrule(len(splits.train), image_size, batch_size=cfg.batch_size, base_lr=cfg.base_lr,
                               scale_with_batch=cfg.scale_schedule)
    supports = tuple(cfg.schedule) if cfg.schedule else rule.supports
    resize, crop = cfg.resolution or (rule.resize, rule.crop)
    return FinetunePlan(rule.to_dict(), len(splits.train), len(splits.classes), len(splits.val), list(image_size),
                        list(supports), supports[-1], resize, crop, cfg.base_lr,
                        rule.mixup_alpha if cfg.mixup is None else cfg.mixup)


class Finetune:
    """BiT-HyperRule fine-tuning as a `command.Task`."""

    name = "finetune"
    resume_keys = _RESUME_KEYS

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg

    def load(self) -> Splits:
        return load_data(self.cfg)

    def build_model(self, splits: Splits) -> nn.Module:
        return build_model(self.cfg.model, len(splits.classes), self.cfg.weights)

    def plan(self, splits: Splits, model: nn.Module, env: Env) -> FinetunePlan:
        micro = D.per_rank_batch(self.cfg.batch_size, self.cfg.batch_split, env.dist)
        p = plan(self.cfg, splits)
        p.warnings = [w for w in (batch_norm_warning(model, self.cfg.batch_size, micro),
                                  datasets.validation_leak(splits.train, splits.val)) if w]
        return p

    def record(self, splits: Splits, p: FinetunePlan, run_dir: Path) -> None:
        for warning in p.warnings:
            log.warning(warning)
        if self.cfg.random_init:
            log.warning("%s starts from random weights (--random-init): no transfer", self.cfg.model)
        if self.cfg.examples_per_class is not None:  # the picked files, to see (and check) what a seed chose
            fileio.write_text(run_dir / "fewshot_files.txt", "".join(
                f"{path}\t{splits.classes[label]}\n" for path, label in zip(splits.train.paths, splits.train.labels)))
        log.info("BiT-HyperRule: %d training images, %d classes, image %sx%s -> resize %d, crop %d; steps %s; "
                 "mixup %.2g; lr %.3g at batch %d", p.dataset_size, p.num_classes, *p.image_size, p.resize, p.crop,
                 p.supports, p.mixup_alpha, self.cfg.base_lr, self.cfg.batch_size)

    def parts(self, splits: Splits, p: FinetunePlan, env: Env, previous: dict | None) -> Parts:
        cfg, dist = self.cfg, env.dist
        micro = D.per_rank_batch(cfg.batch_size, cfg.batch_split, dist)
        aug = TrainAugment(p.resize, p.crop, cfg.square_resize, cfg.random_crop, cfg.flip)
        dataset = TrainFiles(splits.train, functools.partial(train_image, aug=aug), seed=cfg.seed, stream=_AUG_STREAM,
                             skip_bad=cfg.skip_bad_images, decode_side=aug.resize)

        def loader_from(start: int):
            sampler = D.StepSampler(len(dataset), cfg.batch_size, seed=cfg.seed, start_step=start, info=dist)
            return make_loader(dataset, micro, sampler=sampler, workers=env.workers,
                               pin_memory=dist.device.type == "cuda")

        def mixed(step: int, images: torch.Tensor, labels: torch.Tensor) -> MicroBatches:
            lam, perm = step_mixup(p.mixup_alpha, cfg.seed, step, len(images))
            return (MicroBatches(images, labels, cfg.batch_split, env.mean, env.std) if perm is None
                    else _MixedMicroBatches(images, labels, cfg.batch_split, lam, perm, env.mean, env.std))

        steps = LoaderSteps(loader_from, cfg.batch_split, env, skip_bad=cfg.skip_bad_images, micro_batches=mixed)
        evaluator = Evaluator(splits.val, functools.partial(square_eval_image, crop=p.crop), env, decode_side=p.crop,
                              batch_size=cfg.eval_batch_size or micro, skip_bad=cfg.skip_bad_images)
        supports = tuple(p.supports)
        return Parts(steps, evaluator,
                     # paper §3.3: no weight decay in transfer
                     lambda m: torch.optim.SGD(m.parameters(), lr=cfg.base_lr, momentum=hyperrule.MOMENTUM,
                                               weight_decay=0.0),
                     lambda step: hyperrule.lr_at(step, supports, cfg.base_lr), mixup_cross_entropy)

    def summary(self, p: FinetunePlan) -> dict:
        cfg = self.cfg
        return {"examples_per_class": cfg.examples_per_class, "seed": cfg.seed,
                "dataset_size": p.dataset_size, "num_classes": p.num_classes, "warnings": p.warnings,
                "weights": _start_weights(asdict(cfg)) or "random (--random-init)",
                "random_init": cfg.random_init}

    def model_record(self, splits: Splits, p: FinetunePlan, env: Env) -> dict:
        """The classes in head order, the validation view (`square_eval_image`: the whole image squashed
        to crop x crop, which `DataConfig`'s crop_pct 1.0 is) and what the weights were pre-trained on."""
        cfg = self.cfg
        return {"classes": list(splits.classes),
                "data_config": DataConfig(input_size=p.crop, mean=env.mean, std=env.std, crop_pct=1.0).to_dict(),
                "pretraining_data": "none (trained from scratch)" if cfg.weights is False
                else registry.pretraining_data(cfg.model, cfg.weights)}


def finetune(cfg: FinetuneConfig, dist: D.DistInfo | None = None) -> TrainResult:
    """Fine-tune `cfg.model` on `cfg.data` by BiT-HyperRule into the run directory `cfg.out` (`command.train`)."""
    return train(Finetune(cfg), cfg, dist)


# ----------------------------------------------------------------------------- few-shot
FEWSHOT_COLUMNS = ("k", "seed", "top1", "top5", "loss", "train_size", "steps", "run_dir")
SUMMARY_COLUMNS = ("k", "runs", "top1_median", "top1_min", "top1_max", "top1_std", "top5_median", "loss_median")


@dataclass
class FewShotResult:
    runs: list[dict]  # one FEWSHOT_COLUMNS row per finished run
    stopped: TrainResult | None = None  # the run that stopped early (then nothing more ran)
    summary: list[dict] = field(default_factory=list)  # per K (SUMMARY_COLUMNS); empty when stopped
    csv: Path | None = None
    summary_csv: Path | None = None


def fewshot(cfg: FewShotConfig) -> FewShotResult:
    """Run every (K, seed) under `cfg.out/k{K}_seed{S}` (finished runs kept, interrupted ones resumed,
    either only if made with the same settings; finished ones drop checkpoint.pt), `cfg.jobs` of them
    side by side on the CPU, then write `fewshot.csv` (per run) and `fewshot_summary.csv` (per K:
    top-1 median, min, max, std): Fig. 2/5."""
    base = {k: v for k, v in asdict(cfg).items() if k not in ("shots", "seeds", "jobs")}
    with D.session(cfg.device) as dist, lock_run_folder(cfg.out, dist, "fewshot"):
        return _fewshot(cfg, Path(cfg.out), base, dist)


def _fewshot(cfg: FewShotConfig, out: Path, base: dict, dist: D.DistInfo) -> FewShotResult:
    on_cpu = dist.device.type == "cpu" and not dist.distributed
    if cfg.jobs > 1 and not on_cpu:
        raise ConfigError("jobs", "{setting} > 1 runs side by side on the CPU only (on a GPU or under torchrun, "
                                  f"one run at a time uses the device), not on {dist.device}"
                                  + (f" with {dist.world_size} processes" if dist.distributed else ""))
    jobs = cfg.jobs or (default_workers() if on_cpu else 1)  # default_workers: this process's CPU cores
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
    pending = [c for c in runs.values() if _read_summary(Path(c.out)) is None]
    ran = {}
    if jobs > 1 and len(pending) > 1:  # one bar counts the runs; a run's images load in its own process
        quiet = [replace(c, progress=False, workers=0 if c.workers is None else c.workers) for c in pending]
        ran = train_side_by_side(finetune, quiet, jobs, cfg.progress)
    rows = []
    for (k, seed), run_cfg in runs.items():
        run_dir = Path(run_cfg.out)
        summary = _read_summary(run_dir)  # None until the run finished (and was scored)
        if summary is None:
            log.info("few-shot run: %d per class, seed %d -> %s", k, seed, run_dir)
            result = ran[run_cfg.out] if run_cfg.out in ran else finetune(run_cfg, dist)
            if not result.completed:
                return FewShotResult(rows, stopped=result)
            summary = {**result.metrics, "dataset_size": result.plan.dataset_size, "step": result.step}
        if dist.is_main and _read_summary(run_dir) is not None:
            # Finished and summarised: the resume state (optimizer, RNG) is dead weight beside final.pt.
            (run_dir / CHECKPOINT).unlink(missing_ok=True)
        rows.append({"k": k, "seed": seed, "top1": summary["top1"], "top5": summary["top5"],
                     "loss": summary["loss"], "train_size": summary["dataset_size"], "steps": summary["step"],
                     "run_dir": run_dir.name})
    summary_rows = summarize_fewshot(rows)
    if dist.is_main:
        write_csv(out / "fewshot.csv", FEWSHOT_COLUMNS, rows)
        write_csv(out / "fewshot_summary.csv", SUMMARY_COLUMNS, summary_rows)
    return FewShotResult(rows, None, summary_rows, out / "fewshot.csv", out / "fewshot_summary.csv")


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
    """`fewshot.csv` of a `bitlab fewshot` folder as a DataFrame (a row per K and seed), with each run's
    `num_classes` (its summary.json: chance level) and the sweep's `pretrained` weights (config.json:
    the file, or the model's own pretrained weights; None: from scratch; "unknown" without one)."""
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
    runs["pretrained"] = _start_weights(json.loads(config.read_text())) if config.is_file() else "unknown"
    return runs


def _start_weights(config: dict) -> str | None:
    """What a sweep's runs started from, by its config.json: the weights file, the model's own pretrained
    weights, or None (random weights; sweeps recorded before `random_init` without a file were random)."""
    if config.get("pretrained"):
        return config["pretrained"]
    if config.get("random_init", True):
        return None
    return f"{config.get('model')} (pretrained)"


def _read_summary(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("completed") and not math.isnan(summary.get("top1", math.nan)) else None
