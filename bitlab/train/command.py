"""What every training command does around `loop.run`, once: `train(task, settings)`.

`train_side_by_side` runs several such runs at once on the CPU (`bitlab fewshot --jobs`).

A task (`finetune.Finetune`, `pretrain.Pretrain`) supplies its data, model, plan and the loop's
parts; `train` the rest, in an order where a refused command leaves no run folder behind: device
defaults, data, the seeded model, the plan, the resume check (`rundir.check_resume_settings`), then
the claimed folder's config.json and plan.json, `loop.run`, every rank's bad images, summary.json;
the folder locked throughout (`rundir.RunRecord`: one run writes a folder at a time).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from bitlab import fileio
from bitlab.data.loader import Batch, default_workers
from bitlab.errors import BitlabError
from bitlab.models.registry import data_config_of
from bitlab.train import distributed as D
from bitlab.train.config import LoopConfig, TrainSettings
from bitlab.train.loop import MicroBatches, TrainResult, device_defaults, run
from bitlab.train.rundir import RunRecord, check_resume_settings, write_config

log = logging.getLogger(__name__)


@dataclass
class Env:
    """What `train` settles for the task."""

    dist: D.DistInfo
    precision: str
    channels_last: bool
    workers: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class LoaderSteps:
    """A task's `StepData`: `split` loader batches per step, wrapped by `micro_batches(step, images,
    targets)` (default: `MicroBatches`). Bad images (`bitlab.data.loader`): an image nothing replaced
    stops every rank, named; a replaced one is warned about once and kept in `bad`."""

    def __init__(self, loader_from: Callable[[int], DataLoader], split: int, env: Env, *, skip_bad: bool,
                 micro_batches: Callable[[int, torch.Tensor, torch.Tensor], MicroBatches] | None = None) -> None:
        self.loader_from, self.split, self.env, self.dist = loader_from, split, env, env.dist
        self.skip_bad, self.wrap = skip_bad, micro_batches or self._plain
        self.group = D.control_group(env.dist)
        self.bad: set[str] = set()

    def _plain(self, step: int, images: torch.Tensor, targets: torch.Tensor) -> MicroBatches:
        return MicroBatches(images, targets, self.split, self.env.mean, self.env.std)

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
class Parts:
    """The task's pieces for `loop.run`."""

    data: LoaderSteps
    evaluate: Callable[[nn.Module, int], dict] | None  # an `evaluators.Evaluator`
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    lr_at: Callable[[int], float | None]
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor]


class Task(Protocol):
    """What differs between training commands. Its plan has `total_steps`, `counts()` (what a resumed
    run's data must still count) and `to_dict()` (plan.json)."""

    name: str  # the command, as the run folder's lock names it ("finetune")
    resume_keys: tuple[str, ...]  # the settings a resumed run must share with its checkpoint

    def load(self) -> Any: ...  # the data, with `notes` to log
    def build_model(self, data: Any) -> nn.Module: ...  # under the seeded global RNG
    def plan(self, data: Any, model: nn.Module, env: Env) -> Any: ...  # may refuse: nothing is written yet
    def record(self, data: Any, plan: Any, run_dir: Path) -> None: ...  # rank 0: the plan's log line, extra files
    def parts(self, data: Any, plan: Any, env: Env, previous: dict | None) -> Parts: ...
    def summary(self, plan: Any) -> dict: ...  # the task's fields of summary.json
    def model_record(self, data: Any, plan: Any, env: Env) -> dict: ...  # final.pt's `checkpoint.RECORD_KEYS`


def train(task: Task, cfg: TrainSettings, dist: D.DistInfo | None = None) -> TrainResult:
    """Run `task` with `cfg` on every rank; `dist` (`distributed.setup`) is set up and torn down here if not given."""
    with D.session(cfg.device, dist) as dist, RunRecord(cfg.out, dist, task.name) as record:
        return _train(task, cfg, dist, record)


def input_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the model's inputs are normalised with (its registry data config)."""
    data_cfg = data_config_of(model)
    return tuple(data_cfg.mean), tuple(data_cfg.std)


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
    previous = D.main_rank_call(lambda: check_resume_settings(run_dir, cfg, task.resume_keys, resume=cfg.resume,
                                                              counts=plan.counts()), dist)
    record.claim()  # a failure below goes into this run's summary.json
    if dist.is_main:
        write_config(run_dir, cfg)
        fileio.write_json(run_dir / "plan.json", plan.to_dict())
        task.record(data, plan, run_dir)
    parts = task.parts(data, plan, env, previous)
    result = run(model, make_optimizer=parts.make_optimizer, data=parts.data, lr_at=parts.lr_at, loss_fn=parts.loss_fn,
                 run_dir=run_dir, config=LoopConfig.of(cfg, plan.total_steps, precision, channels_last), dist=dist,
                 evaluate=parts.evaluate, resume=cfg.resume, model_name=cfg.model,
                 model_record=task.model_record(data, plan, env))
    mine = parts.data.bad | getattr(parts.evaluate, "bad", set())
    bad = sorted(set().union(*D.all_gather_object(mine, dist)))
    if dist.is_main:
        fileio.write_json(run_dir / "summary.json", {
            "completed": result.completed, "step": result.step, "total_steps": plan.total_steps, "model": cfg.model,
            **task.summary(plan), **result.metrics, "train_images_per_s": result.images_per_s,
            "bad_images": len(bad), "bad_image_messages": bad})
    result.plan, result.bad_images = plan, bad
    return result


def train_side_by_side(run: Callable[[Any], TrainResult], settings: list[Any], jobs: int,
                       progress: bool = True) -> dict[str, TrainResult]:
    """`run(s)` for each of `settings` (each run's own folder `s.out`), up to `jobs` at once, each in its
    own process on one torch thread; returns {s.out: result}. `run` is a module-level function
    (`finetune.finetune`) and `settings` are picklable, with `progress=False` (one bar here counts the
    runs) and their loader workers set (0: the runs already share the cores).

    Each run seeds everything it draws from its settings, so its numbers are those of a run alone.
    The processes come from a fork server started once per Python process with bitlab imported
    (`multiprocessing`'s forkserver; spawned where there is none): a spawned process imports torch
    again (~4 s, longer than a tiny run takes), and one forked from the caller inherits its OpenMP
    pool and autograd threads, which torch refuses to run a backward pass with. A script calling
    this needs `if __name__ == "__main__":`, as any multiprocessing does. A failure stops the runs
    not yet started and is raised; Ctrl-C reaches the whole process group, so each running run
    stops at a checkpoint, as alone."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from tqdm.auto import tqdm

    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # Imported once, in the server (later calls reuse it): `run`'s module, and torch._dynamo, which
        # torch.optim imports on a process's first optimiser (2 s).
        context.set_forkserver_preload([run.__module__, "torch._dynamo"])
    else:
        context = multiprocessing.get_context("spawn")
    results: dict[str, TrainResult] = {}
    with ProcessPoolExecutor(min(jobs, len(settings)), mp_context=context, initializer=torch.set_num_threads,
                             initargs=(1,)) as pool:
        futures = {pool.submit(run, s): s.out for s in settings}
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc="runs side by side", unit="run",
                               disable=not progress):
                results[futures[future]] = future.result()
        except BaseException as e:
            pool.shutdown(wait=True, cancel_futures=True)
            if isinstance(e, BrokenProcessPool):
                raise BitlabError("a process running training runs side by side ended abruptly (killed, out of "
                                  "memory, or started from a script whose code is not under "
                                  "`if __name__ == \"__main__\":`, which every process imports)") from e
            raise
    return results
