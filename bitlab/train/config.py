"""The training commands' settings, each declared once (no torch import: `bitlab.cli` builds the flags
from these fields). `Running`: the step loop's (`LoopConfig` adds the step count); `TrainSettings`:
every command's; the command classes their own. Saved as config.json, which `--config` reads back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from bitlab import hyperrule
from bitlab.errors import BitlabError, ConfigError
from bitlab.settings import (FINITE, FRACTION, NOT_NEGATIVE, POSITIVE_NUMBER, Check, at_least, setting, validate)
from bitlab.train import upstream

PRECISIONS = ("fp32", "bf16", "fp16")
EVERY = Check(lambda v: v >= 0, "0 (only at the end) or a positive step count")
WORKERS = at_least(0, "0 (load in the main process) or more")
PAIR = Check(lambda v: len(v) == 2 and min(v) > 0, "two positive numbers H W")
RESUME_HELP = "continue from RUN_DIR/checkpoint.pt (--no-resume refuses a folder that holds one)"


@dataclass(kw_only=True)
class Running:
    """How the step loop runs."""

    eval_every: int = setting(0, "evaluate every N steps and at the end (0: only at the end)", check=EVERY,
                              metavar="STEPS")
    checkpoint_every: int = setting(100, "checkpoint every N steps (0: only at the end and on signals)", check=EVERY,
                                    metavar="STEPS")
    log_every: int = setting(10, "training metrics every N steps", check=at_least(1), metavar="STEPS")
    precision: str | None = setting(None, "autocast (default: bf16 on GPU, fp32 on CPU)", choices=PRECISIONS)
    channels_last: bool | None = setting(None, "channels-last memory format (default: on for GPU)")
    compile: bool = setting(False, "torch.compile the model")
    stop_after: int | None = setting(None, "stop with a checkpoint after N steps of this invocation (a resumed run "
                                     "goes N steps further)", check=at_least(1, "at least 1 step"), metavar="STEPS")
    progress: bool = setting(True, "progress bar")

    def __post_init__(self) -> None:
        validate(self)


@dataclass(kw_only=True)
class LoopConfig(Running):
    """`loop.run`'s settings: `Running`'s, resolved for the device, and the schedule's length."""

    total_steps: int
    precision: str = setting("fp32", choices=PRECISIONS)
    channels_last: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.total_steps <= 0:
            raise BitlabError(f"the schedule has no steps (total {self.total_steps})")

    @classmethod
    def of(cls, settings: Running, total_steps: int, precision: str, channels_last: bool) -> "LoopConfig":
        shared = {name: getattr(settings, name) for name in Running.__dataclass_fields__}
        return cls(**{**shared, "precision": precision, "channels_last": channels_last}, total_steps=total_steps)


@dataclass(kw_only=True)
class TrainSettings(Running):
    """What every training command takes (`model`, `data`: their help is the command's)."""

    model: str
    data: str
    out: str = setting(help="run directory", metavar="RUN_DIR")
    val_data: str | None = setting(None, "validation data from elsewhere (same forms as --data)")
    val_fraction: float = setting(0.0, "hold out this fraction for validation (per class if single-label)",
                                  check=FRACTION)
    seed: int = setting(0, "data order, augmentation and initialisation", check=NOT_NEGATIVE)
    batch_split: int = setting(1, "micro-batches per step: less memory, the same result (BatchNorm aside)",
                               check=at_least(1))
    eval_batch_size: int | None = setting(None, "evaluation batch per process (default: the micro-batch)",
                                          check=at_least(1))
    flip: bool = setting(True, "random horizontal flips (--no-flip for e.g. text, digits)")
    workers: int | None = setting(None, "loader processes per process (default: its CPU cores / processes on the "
                                        "node)", check=WORKERS)
    device: str | None = setting(None, "cpu, cuda, cuda:1 (default: cuda if available; torchrun: the local GPU)")
    skip_bad_images: bool = setting(False, "replace unreadable training images (by their class's or shard's next), "
                                           "leave validation ones out; listed in summary.json (default: stop)")
    resume: bool = setting(False, RESUME_HELP)

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("data", "val_data")  # compared resolved on resume
    RESUME_HINT: ClassVar[str] = "pass --resume"  # how a refused rerun continues a checkpoint


# ----------------------------------------------------------------------------- finetune, fewshot
@dataclass(kw_only=True)
class FinetuneConfig(TrainSettings):
    """`bitlab finetune`: what to fine-tune on what, and how (saved as config.json)."""

    model: str = setting(help="bitlab name (BiT-M-R50x1, R50x1, R14x0.5, ...) or any timm name")
    data: str = setting(help="DIR with train/ and val/ (or test/) class folders, a folder of class folders, "
                             "make-ooc output (manifest.csv), a CSV of path,label[,split], or builtin:digits")
    pretrained: str | None = setting(None, "weights file: official .npz, bitlab or timm checkpoint (default: the "
                                           "weights the model name stands for: the official BiT .npz or timm's "
                                           "pretrained ones, fetched into the cache on first use)", metavar="PATH")
    random_init: bool = setting(False, "start from random weights, not pretrained ones (no transfer: names without "
                                       "released weights, such as R14x0.5, need this or --pretrained)")
    val_split: str | None = setting(None, "name of the validation split (default: val, validation, then test)")
    seed: int = setting(0, "few-shot subset, data order, augmentation, MixUp, init", check=NOT_NEGATIVE)
    split_seed: int = setting(0, "the --val-fraction hold-out's seed (not --seed, so few-shot seeds share it)",
                              check=NOT_NEGATIVE)
    examples_per_class: int | None = setting(None, "few-shot: K training images per class", metavar="K")
    batch_size: int = setting(hyperrule.REFERENCE_BATCH, "global batch", check=at_least(1))
    base_lr: float = setting(hyperrule.BASE_LR, "peak lr", check=POSITIVE_NUMBER)
    schedule: list[int] | None = setting(
        None, "override the steps: WARMUP DECAY1 DECAY2 DECAY3 TOTAL", metavar="STEP",
        check=Check(lambda s: len(s) >= 2 and min(s) >= 0 and list(s) == sorted(s) and s[-1] > 0,
                    "increasing step counts WARMUP DECAY... TOTAL with TOTAL > 0"))
    scale_schedule: bool = setting(False, "scale step counts by 512/batch (not official)")
    mixup: float | None = setting(None, "override MixUp alpha (0 turns it off)", metavar="ALPHA",
                                  check=Check(lambda v: math.isfinite(v) and v >= 0, "0 (off) or more"))
    image_size: list[int] | None = setting(None, "image size the resolution rule sees (default: the images' median)",
                                           nargs=2, metavar=("H", "W"), check=PAIR)
    resolution: list[int] | None = setting(
        None, "override resize and crop", nargs=2, metavar=("RESIZE", "CROP"),
        check=Check(lambda v: len(v) == 2 and 0 < v[1] <= v[0], "RESIZE CROP with 0 < CROP <= RESIZE"))
    square_resize: bool = setting(True, "squash to a square (--no-square-resize keeps the aspect ratio: shorter "
                                        "side to RESIZE)")
    random_crop: bool = setting(True, "random crops (--no-random-crop: the centre crop)")

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("data", "val_data", "pretrained")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pretrained is not None and not Path(self.pretrained).is_file():
            raise ConfigError("pretrained", f"{{setting}} {self.pretrained}: no such file")
        if self.pretrained is not None and self.random_init:
            raise ConfigError("random_init", f"{{setting}} asks for random weights, but a weights file is given too "
                                             f"({self.pretrained}): give one or the other")

    @property
    def weights(self) -> str | bool:
        """`create_model`'s `pretrained`: the file, False for random weights, else True (the name's own)."""
        return self.pretrained or not self.random_init


@dataclass(kw_only=True)
class FewShotConfig(FinetuneConfig):
    """`bitlab fewshot`: one fine-tuning run per (K, seed), then median and spread per K."""

    shots: list[int] = setting(help="K values", metavar="K", factory=lambda: [1, 5, 10],
                               check=Check(lambda k: k >= 1, "positive", each=True))
    seeds: list[int] = setting(help="seeds", metavar="S", factory=lambda: [0, 1, 2],
                               check=Check(lambda s: s >= 0, "0 or more", each=True))
    jobs: int = setting(1, "runs side by side on the CPU, each in its own process with one torch thread (each "
                           "run's numbers are those of a run alone); 0: one per CPU core (on a GPU, one at a time)",
                        check=at_least(0, "0 (one per CPU core) or more"), metavar="N")

    def __post_init__(self) -> None:
        super().__post_init__()
        # Set per run by the sweep: a value given here would be silently overwritten.
        if self.seed != 0:
            raise ConfigError("seed", f"{{setting}}={self.seed} is not used by fewshot: each run's seed comes from "
                                      "seeds")
        if self.resume:
            raise ConfigError("resume", "{setting} is not used by fewshot: a sweep resumes its stopped runs by itself")
        if not self.shots or not self.seeds:
            raise ConfigError("shots" if not self.shots else "seeds", "fewshot needs at least one value of {setting}")


# ----------------------------------------------------------------------------- pretrain
@dataclass(kw_only=True)
class PretrainConfig(TrainSettings):
    """`bitlab pretrain`: what to pre-train on what, and how (saved as config.json)."""

    model: str = setting(help="registry name: R50x1, R101x3, R14x0.5, ablations R50x1-bn, R50x1-plain, "
                              "R50x1-bn-plain, or any timm name")
    data: str = setting(help="ImageFolder DIR (train/<class>/, val/<class>/), a folder of class folders, a CSV of "
                             "path,label[,split], a multi-label CSV (path,labels[,split]) or JSON lines ({path, "
                             "labels, split}), a shard set (DIR/shards.json, or DIR/train/ and DIR/val/ shard sets "
                             "from `bitlab shards`), or builtin:digits")
    out: str = setting(help="run directory (resumed when it holds a checkpoint)", metavar="RUN_DIR")
    classes: str | None = setting(None, "class list, one per line: fixes the label order", metavar="FILE")
    label_sep: str | None = setting(None, "separator inside a multi-label CSV's labels cell (default: whitespace)")
    preset: str = setting("bit-m", "bit-s / bit-m: 90 epochs, lr/10 at 30, 60, 80; bit-l: 40 epochs, at 10, 23, 30, "
                                   "37", choices=tuple(upstream.PRESETS))
    epochs: float | None = setting(None, "override the preset's epochs (its decays scale along)")
    decay_epochs: list[float] | None = setting(None, "override the lr decay epochs", nargs="*", metavar="EPOCH")
    warmup_steps: int = setting(upstream.WARMUP_STEPS, "linear warm-up steps")
    batch_size: int = setting(upstream.GLOBAL_BATCH, "global batch over all processes", check=at_least(1))
    device_batch: int | None = setting(None, "at most N images per process per micro-step: --batch-split is raised "
                                             "to fit (elastic runs)", check=at_least(1), metavar="N")
    base_lr: float = setting(upstream.BASE_LR, "lr at batch 256, scaled by batch/256", check=POSITIVE_NUMBER)
    weight_decay: float = setting(upstream.WEIGHT_DECAY, "weight decay",
                                  check=Check(lambda v: math.isfinite(v) and v >= 0, "0 (none) or more"))
    decay_all: bool = setting(False, "weight decay on norm parameters and biases too")
    crop: int = setting(upstream.CROP, "training crop and validation size", check=at_least(1, "at least 1 pixel"))
    crop_area_min: float = setting(upstream.CROP_AREA_MIN, "Inception crop: smallest area fraction",
                                   check=Check(lambda v: 0 < v <= 1, "above 0 and at most 1"))
    head_bias: float | None = setting(None, "multi-label head bias (default -log(num_classes))", check=FINITE)
    # Continue from out/checkpoint.pt when there is one (torchrun restarts, requeues).
    resume: bool = setting(True, RESUME_HELP)
    checkpoint_every: int = setting(1000, "checkpoint every N steps (0: only at the end and on signals)",
                                    check=EVERY, metavar="STEPS")
    log_every: int = setting(50, "training metrics every N steps", check=at_least(1), metavar="STEPS")

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("data", "val_data", "classes")
    RESUME_HINT: ClassVar[str] = "leave out --no-resume"  # pretrain resumes by default

    def __post_init__(self) -> None:
        super().__post_init__()
        upstream.check_recipe(*upstream.recipe(self.preset, self.epochs, self.decay_epochs), self.warmup_steps)

    def schedule(self, num_examples: int) -> upstream.UpstreamSchedule:
        epochs, decays = upstream.recipe(self.preset, self.epochs, self.decay_epochs)
        return upstream.make_schedule(num_examples, self.batch_size, epochs=epochs, decay_epochs=decays,
                                      warmup_steps=self.warmup_steps, base_lr=self.base_lr)
