"""What every training command does around `loop.run`, once: `train(task, settings)`.

A task (`finetune.Finetune`, `pretrain.Pretrain`) supplies what differs: its data, model, plan and
the loop's parts. `train` does the rest, in this order, so that a command refused before it starts
leaves no run folder behind (`rundir.RunRecord`) and a resumed run is the uninterrupted one:

1. device defaults (bf16 and channels-last on GPUs), the task's data, the seeded model and its
   input normalisation (the model's `data_config`, else BiT's [-1, 1]), the loader workers;
2. the task's plan; rank 0 checks that a checkpoint in the run folder was written with the same
   settings and for the same data (`rundir.check_resume_settings`), and every rank stops if not;
3. the run folder is claimed: `config.json`, `plan.json`, the task's records;
4. `loop.run` with the task's parts, then the bad images of every rank gathered and `summary.json`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from bitlab import io
from bitlab.data.loader import Batch, default_workers
from bitlab.data.transforms import BIT_MEAN, BIT_STD
from bitlab.train import distributed as D
from bitlab.train.config import LoopConfig, TrainSettings
from bitlab.train.evaluators import Evaluator
from bitlab.train.loop import MicroBatches, device_defaults, run
from bitlab.train.rundir import RunRecord, check_resume_settings, write_config

log = logging.getLogger(__name__)


class LoaderSteps:
    """A task's `StepData`: this rank's micro-batches of every step from `start` on, `split` loader
    batches per step. Bad images (`bitlab.data.loader`'s policy): a step with an image that nothing
    replaced stops every rank, naming it; a replaced one is warned about once and kept in `bad`.
    `micro_batches(step, images, targets)` wraps a step's batch (default: `MicroBatches`)."""

    def __init__(self, loader_from: Callable[[int], DataLoader], split: int, *, mean, std, dist: D.DistInfo,
                 skip_bad: bool, micro_batches: Callable[[int, torch.Tensor, torch.Tensor], MicroBatches] | None = None
                 ) -> None:
        self.loader_from, self.split, self.mean, self.std, self.dist = loader_from, split, mean, std, dist
        self.skip_bad, self.wrap = skip_bad, micro_batches or self._plain
        self.group = D.control_group(dist)
        self.bad: set[str] = set()

    def _plain(self, step: int, images: torch.Tensor, targets: torch.Tensor) -> MicroBatches:
        return MicroBatches(images, targets, self.split, self.mean, self.std)

    def steps(self, start: int) -> Iterator[MicroBatches]:
        it, step, dev = iter(self.loader_from(start)), start, self.dist.device
        while True:
            parts: list[Batch] = [next(it) for _ in range(self.split)]
            D.stop_on_errors([e for b in parts for e in b.errors], self.dist, "training", hint=not self.skip_bad,
                             group=self.group)
            for message in (m for b in parts for m in b.replaced):
                if message not in self.bad:
                    log.warning("skipped: %s", message)
                    self.bad.add(message)
            images = torch.cat([b.images for b in parts]).to(dev, non_blocking=True)
            targets = torch.cat([b.targets for b in parts]).to(dev, non_blocking=True)
            yield self.wrap(step, images, targets)
            step += 1


@dataclass
class Env:
    """What `train` settles for the task: the process, the device defaults, the loader workers and
    the model's input normalisation."""

    dist: D.DistInfo
    precision: str
    channels_last: bool
    workers: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Parts:
    """The task's pieces for `loop.run`."""

    data: LoaderSteps
    evaluate: Evaluator | None
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    lr_at: Callable[[int], float | None]
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor]


class Plan(Protocol):
    total_steps: int

    def counts(self) -> dict[str, int]: ...  # what a resumed run's data must still count

    def to_dict(self) -> dict: ...  # plan.json


class Task(Protocol):
    resume_keys: tuple[str, ...]  # the settings a resumed run must share with its checkpoint

    def load(self) -> Any: ...  # the data, with `notes` to log

    def build_model(self, data: Any) -> nn.Module: ...  # under the seeded global RNG

    def plan(self, data: Any, model: nn.Module, env: Env) -> Plan: ...  # may refuse: nothing is written yet

    def record(self, data: Any, plan: Plan, run_dir: Path) -> None: ...  # rank 0: the plan's log line, extra files

    def parts(self, data: Any, plan: Plan, env: Env, previous: dict | None) -> Parts: ...

    def summary(self, plan: Plan) -> dict: ...  # the task's fields of summary.json


@dataclass
class TrainResult:
    run_dir: Path
    completed: bool
    step: int
    total_steps: int
    metrics: dict
    plan: Any  # the task's plan (plan.json)
    bad_images: list[str] = field(default_factory=list)
    stopped_by: str | None = None


def train(task: Task, cfg: TrainSettings, dist: D.DistInfo | None = None) -> TrainResult:
    """Run `task` with `cfg` (module docs). Under torchrun every rank calls this; `dist` (from
    `distributed.setup`) is set up here when not given, and then also torn down here."""
    with D.session(cfg.device, dist) as dist, RunRecord(cfg.out, dist) as record:
        return _train(task, cfg, dist, record)


def input_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the model's inputs are normalised with: its `data_config`'s, else BiT's."""
    data_cfg = getattr(model, "data_config", None)
    return (tuple(data_cfg.mean), tuple(data_cfg.std)) if data_cfg else (BIT_MEAN, BIT_STD)


def _train(task: Task, cfg: TrainSettings, dist: D.DistInfo, record: RunRecord) -> TrainResult:
    run_dir = Path(cfg.out)
    precision, channels_last = device_defaults(dist.device, cfg.precision, cfg.channels_last)
    data = task.load()
    for note in data.notes:
        log.info(note)
    # The model before the claim: an unknown name or unusable weights file leaves no run folder behind.
    torch.manual_seed(cfg.seed)  # random initialisation (models trained from scratch) is seeded too
    model = task.build_model(data)
    env = Env(dist, precision, channels_last, default_workers() if cfg.workers is None else cfg.workers,
              *input_normalization(model))
    plan = task.plan(data, model, env)
    # rank 0 reads the run directory; a refusal stops every rank (none is left waiting below)
    previous = D.main_rank_call(lambda: check_resume_settings(run_dir, cfg, task.resume_keys, resume=cfg.resume,
                                                              counts=plan.counts()), dist)
    record.claim()  # the run directory is this run's now: a failure below goes into its summary.json
    if dist.is_main:
        write_config(run_dir, cfg)
        io.write_json(run_dir / "plan.json", plan.to_dict())
        task.record(data, plan, run_dir)
    parts = task.parts(data, plan, env, previous)
    result = run(model, make_optimizer=parts.make_optimizer, data=parts.data, lr_at=parts.lr_at, loss_fn=parts.loss_fn,
                 run_dir=run_dir, config=LoopConfig.of(cfg, plan.total_steps, precision, channels_last), dist=dist,
                 evaluate=parts.evaluate, resume=cfg.resume, model_name=cfg.model)
    mine = parts.data.bad | (parts.evaluate.bad if parts.evaluate else set())
    bad = sorted(set().union(*D.all_gather_object(mine, dist)))
    if dist.is_main:
        io.write_json(run_dir / "summary.json", {
            "completed": result.completed, "step": result.step, "total_steps": plan.total_steps, "model": cfg.model,
            **task.summary(plan), **result.final_metrics, "train_images_per_s": result.images_per_s,
            "bad_images": len(bad), "bad_image_messages": bad})
    return TrainResult(run_dir, result.completed, result.step, plan.total_steps, result.final_metrics, plan, bad,
                       result.stopped_by)
