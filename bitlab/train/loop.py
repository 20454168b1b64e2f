"""The training engine: the step loop and the policies it calls (`command.py` runs the tasks on it).

The caller supplies (nothing here knows about HyperRule, MixUp or labels) `data`, a `StepData`
that must be a deterministic function of the step (what makes resume exact); `lr_at(step)`, None
when training is over (a param group's `lr_scale` scales it); `loss_fn(outputs, targets)`, a
micro-batch's mean loss; `make_optimizer(model)`; and optionally `evaluate(model, step)`, a dict
of metrics, called on every rank (it may use collectives).

The policies, each a small piece below:
- a step (`Stepper`): each micro-batch's loss is weighted by its share of the step's images and
  DDP all-reduces only on the last micro-step (`no_sync()`): the update of one big batch. It ends
  with one small all-reduce of the loss, the stop flag and the gradient norm: every rank decides alike;
- the NaN guard (`non_finite`): a non-finite loss or gradient norm stops *before* the update;
- checkpoints (`Checkpoints`): every `checkpoint_every` steps, before each evaluation (a failing
  evaluation loses no training), at the end (then `final.pt`, then the final evaluation), on a
  stop, and before a data error from `data.steps` when every rank can write it together;
- stopping (`StopSignals`, `stop_reason`): SIGINT/SIGTERM or `stop_after` finish the step and
  checkpoint (a second Ctrl-C aborts at once);
- metrics (`TrainWindow`): a training row per `log_every` steps (loss, lr, images/s, seconds per
  step and waiting for data) and one per evaluation (`rundir.MetricsWriter`), and the progress bar.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from bitlab.data.transforms import normalize
from bitlab.errors import BitlabError
from bitlab.train.checkpoint import CHECKPOINT, FINAL, load_checkpoint, save_checkpoint, save_model
from bitlab.train.config import LoopConfig
from bitlab.train.distributed import DistInfo, EveryRankError, all_reduce_sum, barrier, wrap_model
from bitlab.train.rundir import MetricsWriter, log_to_file, refuse_overwrite

log = logging.getLogger(__name__)

MicroBatch = tuple[torch.Tensor, Any]


class StepData(Protocol):
    def steps(self, start: int) -> Iterator[Sequence[MicroBatch]]:
        """Each step's micro-batches for this rank from step `start` on, on the device: a sequence
        that may be lazy (one float micro-batch in memory at a time; `num_images`: its image count)."""


class NonFiniteLossError(BitlabError):
    """The loss became NaN or infinite; the run stopped before applying that update."""


@dataclass
class TrainResult:
    """What a run did; `command.train` adds the task's plan and every rank's bad images."""

    run_dir: Path
    total_steps: int
    step: int  # optimiser steps done
    completed: bool = False  # reached the end of the schedule (False: interrupted / stopped early)
    metrics: dict = field(default_factory=dict)  # the last evaluation's
    checkpoint: Path | None = None
    final: Path | None = None
    images_per_s: float = 0.0
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" / "stop_after" when not completed
    plan: Any = None
    bad_images: list[str] = field(default_factory=list)


class MicroBatches(Sequence):
    """One step's micro-batches (uint8 on the device), normalised on access: one float micro-batch
    in memory at a time."""

    def __init__(self, images: torch.Tensor, targets: Any, split: int, mean, std) -> None:
        self.images, self.targets, self.split, self.mean, self.std = images, targets, split, mean, std
        self.num_images = len(images)
        self.size = self.num_images // split

    def __len__(self) -> int:
        return self.split

    def __getitem__(self, k: int) -> MicroBatch:
        if not 0 <= k < self.split:
            raise IndexError(k)
        sl = slice(k * self.size, (k + 1) * self.size)
        return normalize(self.images[sl], self.mean, self.std), self.targets[sl]


def device_defaults(device: torch.device, precision: str | None, channels_last: bool | None) -> tuple[str, bool]:
    """bf16 autocast and channels-last on a GPU, fp32 and the default layout on a CPU, unless asked."""
    on_gpu = device.type == "cuda"
    return precision or ("bf16" if on_gpu else "fp32"), on_gpu if channels_last is None else channels_last


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def eval_logits(model: nn.Module, images: torch.Tensor, *, mean: Sequence[float], std: Sequence[float],
                device: torch.device, precision: str, channels_last: bool) -> torch.Tensor:
    """float32 logits of a uint8 NCHW batch, prepared as in training (normalised on the device,
    channels-last and autocast when the run uses them)."""
    x = normalize(images.to(device, non_blocking=True), mean, std)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, precision):
        return model(x).float()


# ----------------------------------------------------------------------------- policies
class StopSignals:
    """SIGINT/SIGTERM -> finish the step, checkpoint, return. A second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("%s received: stopping after this step and writing a checkpoint (Ctrl-C again to abort)",
                    signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def stop_reason(any_rank_signalled: bool, signals: StopSignals, step: int, start: int,
                config: LoopConfig) -> str | None:
    """Why the run stops after `step` before the end ("SIGINT", "SIGTERM", "stop_after"), or None."""
    if step >= config.total_steps:
        return None
    if any_rank_signalled or (config.stop_after is not None and step >= start + config.stop_after):
        return signal.Signals(signals.signal).name if signals.signal else "stop_after"
    return None


def non_finite(mean_loss: float, grad_norm: float, step: int, checkpoint: str) -> NonFiniteLossError | None:
    """The NaN guard: the error when the loss or the gradient norm is not finite (a finite loss can
    still overflow the gradients, and that one update would put NaNs into the weights and the next
    checkpoint; fp16's scaler skips such steps itself)."""
    if math.isfinite(mean_loss) and math.isfinite(grad_norm):
        return None
    what = (f"loss is {mean_loss}" if not math.isfinite(mean_loss)
            else f"gradients are not finite (loss {mean_loss:.4g})")
    return NonFiniteLossError(f"{what} at step {step}: training stopped before that update; {checkpoint}. "
                              "Lower the learning rate or check the data.")


class TrainWindow:
    """Training metrics over the steps since the last log row, and images/s over the whole call."""

    def __init__(self) -> None:
        self.total_images, self.total_time = 0, 0.0
        self._reset()

    def _reset(self) -> None:
        self.loss, self.steps, self.images, self.data_s = 0.0, 0, 0, 0.0
        self.t0 = time.perf_counter()

    def add(self, loss: float, images: int, data_s: float, step_s: float) -> None:
        self.loss, self.steps, self.images, self.data_s = (self.loss + loss, self.steps + 1, self.images + images,
                                                           self.data_s + data_s)
        self.total_images, self.total_time = self.total_images + images, self.total_time + step_s

    def row(self, step: int, lr: float) -> dict:
        """The log row of the window, which starts anew."""
        elapsed = time.perf_counter() - self.t0
        row = {"step": step, "split": "train", "loss": self.loss / self.steps, "lr": lr,
               "images_per_s": self.images / max(elapsed, 1e-9), "step_s": elapsed / self.steps,
               "data_s": self.data_s / self.steps}
        self._reset()
        return row

    @property
    def images_per_s(self) -> float:
        return self.total_images / max(self.total_time, 1e-9)


class Checkpoints:
    """`checkpoint.pt` of this run: `saved` is the step it holds (None: none yet)."""

    def __init__(self, run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, dist: DistInfo, model_name: str | None,
                 model_record: dict | None = None) -> None:
        self.path, self.model, self.optimizer, self.scaler = run_dir / CHECKPOINT, model, optimizer, scaler
        self.dist, self.model_name, self.model_record = dist, model_name, model_record
        self.saved: int | None = None

    def restore(self, resume: bool) -> int:
        """The step to start from (a checkpoint without `resume` is refused)."""
        if resume and self.path.exists():
            ckpt = load_checkpoint(self.path, self.model, self.optimizer, self.scaler, self.dist)
            self.saved = int(ckpt["step"])
        elif resume:
            log.info("no checkpoint in %s yet: starting from step 0", self.path.parent)
        elif self.path.exists():
            refuse_overwrite(self.path.parent, "pass resume=True")
        return self.saved or 0

    def save(self, step: int) -> Path:
        """Collective (every rank calls it at the same step)."""
        if self.saved != step:
            save_checkpoint(self.path, step, self.model, self.optimizer, self.scaler, self.dist, self.model_name,
                            self.model_record)
            self.saved = step
        return self.path

    def due(self, step: int, config: LoopConfig) -> bool:
        """Mid-run: every `checkpoint_every` steps and before an evaluation."""
        every = config.checkpoint_every and step % config.checkpoint_every == 0
        return bool(every or eval_due(step, config)) and step < config.total_steps


def eval_due(step: int, config: LoopConfig) -> bool:
    """Mid-run evaluations (the final one is the end's)."""
    return bool(config.eval_every) and step % config.eval_every == 0 and step < config.total_steps


@dataclass
class Stepper:
    """One optimiser step from one step's micro-batches (module docs)."""

    net: nn.Module  # what runs forward (DDP and/or compiled)
    model: nn.Module  # the plain module (gradient norm)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor]
    config: LoopConfig
    dist: DistInfo

    def __call__(self, micro: Sequence[MicroBatch], stop_requested: bool, step: int,
                 checkpoints: Checkpoints) -> tuple[float, bool, int]:
        """(mean loss over ranks, whether any rank asks to stop, this rank's images)."""
        n_step = getattr(micro, "num_images", None) or sum(len(x) for x, _ in micro)
        step_loss = torch.zeros((), device=self.dist.device)
        for k, (x, y) in enumerate(micro):
            if self.config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            last = k == len(micro) - 1
            # DDP all-reduces gradients only on the last micro-step of an update.
            with contextlib.nullcontext() if last or not self.dist.distributed else self.net.no_sync():
                with autocast(self.dist.device, self.config.precision):
                    loss = self.loss_fn(self.net(x), y)
                weighted = loss * (len(x) / n_step)
                (self.scaler.scale(weighted) if self.scaler else weighted).backward()
            step_loss += weighted.detach().float()
        stop_flag = torch.tensor(float(stop_requested), device=self.dist.device)
        grad_norm = step_loss.new_zeros(()) if self.scaler else _grad_norm(self.model)
        shared = all_reduce_sum(torch.stack([step_loss, stop_flag, grad_norm]), self.dist)
        mean_loss, saved = shared[0].item() / self.dist.world_size, checkpoints.saved
        if error := non_finite(mean_loss, shared[2].item(), step, "no checkpoint had been written yet" if saved is None
                               else f"the last good checkpoint ({checkpoints.path}, step {saved}) is kept"):
            self.optimizer.zero_grad(set_to_none=True)
            raise error
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, shared[1].item() > 0, n_step


def _grad_norm(model: nn.Module) -> torch.Tensor:
    """L2 norm over all gradients (one fused pass); NaN/inf when any gradient is."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.nn.utils.get_total_norm(grads).float()


def _next_step(batches: Iterator, step: int, checkpoints: Checkpoints, dist: DistInfo) -> Sequence[MicroBatch]:
    """The step's micro-batches; on a data error, the completed step's checkpoint when every rank
    can write it together (else one would wait in a collective)."""
    try:
        return next(batches)
    except BitlabError as e:
        if step > (checkpoints.saved or 0) and (not dist.distributed or isinstance(e, EveryRankError)):
            checkpoints.save(step)
            log.info("checkpoint of step %d written before stopping on a data error", step)
        raise


# ----------------------------------------------------------------------------- the loop
def run(model: nn.Module, *, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], data: StepData,
        lr_at: Callable[[int], float | None], loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
        run_dir: str | Path, config: LoopConfig, dist: DistInfo = DistInfo(),
        evaluate: Callable[[nn.Module, int], dict] | None = None, resume: bool = False,
        model_name: str | None = None, model_record: dict | None = None) -> TrainResult:
    """Train `model` for `config.total_steps` optimiser steps (or until `lr_at` returns None).
    `model_name` and `model_record` (`checkpoint.save_model`) go into checkpoint.pt and final.pt."""
    run_dir = Path(run_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    raw = model.to(dist.device)
    if config.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(raw)
    scaler = torch.amp.GradScaler(dist.device.type) if config.precision == "fp16" else None
    checkpoints = Checkpoints(run_dir, raw, optimizer, scaler, dist, model_name, model_record)
    start = checkpoints.restore(resume)
    barrier(dist)
    net = wrap_model(raw, dist)
    if config.compile:
        net = torch.compile(net)
    metrics = MetricsWriter(run_dir) if dist.is_main else None
    if metrics is not None:
        metrics.truncate(start)

    def run_eval(step: int) -> dict:
        net.eval()
        try:
            out = evaluate(raw, step) if evaluate else {}
        finally:
            net.train()
        if out and metrics is not None:
            metrics.write({"step": step, "split": "val", **out})
            log.info("eval @ step %d: %s", step, ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in out.items()))
        return out

    stepper = Stepper(net, raw, optimizer, scaler, loss_fn, config, dist)
    try:
        with log_to_file(run_dir / "log.txt", dist.is_main), StopSignals() as signals, tqdm(
            total=config.total_steps, initial=start, unit="step", dynamic_ncols=True, desc="train",
            disable=not (dist.is_main and config.progress),
        ) as bar:
            if start:  # logged here, inside log.txt's handler, so that a run's history shows its resumes
                log.info("resumed from %s at step %d", checkpoints.path, start)
            net.train()
            return _steps(data.steps(start), start, stepper, lr_at, checkpoints, run_eval, metrics, signals, bar)
    finally:
        if metrics is not None:
            metrics.close()


def _steps(batches: Iterator, start: int, stepper: Stepper, lr_at: Callable[[int], float | None],
           checkpoints: Checkpoints, run_eval: Callable[[int], dict], metrics: MetricsWriter | None,
           signals: StopSignals, bar: tqdm) -> TrainResult:
    """The step loop from `start` to the end of the schedule or a stop."""
    config, dist = stepper.config, stepper.dist
    result = TrainResult(checkpoints.path.parent, config.total_steps, start,
                         checkpoint=checkpoints.path if checkpoints.saved is not None else None)
    window, step, last_eval = TrainWindow(), start, -1
    while step < config.total_steps:
        lr = lr_at(step)
        if lr is None:
            break
        for group in stepper.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        t0 = time.perf_counter()
        micro = _next_step(batches, step, checkpoints, dist)
        data_s = time.perf_counter() - t0  # waiting for the input pipeline
        loss, any_signal, images = stepper(micro, signals.signal is not None, step, checkpoints)
        step = result.step = step + 1
        window.add(loss, images * dist.world_size, data_s, time.perf_counter() - t0)
        bar.update(1)
        if step % config.log_every == 0 or step == config.total_steps:
            row = window.row(step, lr)
            if metrics is not None:
                metrics.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{row['images_per_s']:.1f}")
        if checkpoints.due(step, config):  # before evaluating: a failing evaluation loses no training
            result.checkpoint = checkpoints.save(step)
        if eval_due(step, config):
            result.metrics, last_eval = run_eval(step), step
        if reason := stop_reason(any_signal, signals, step, start, config):
            result.checkpoint, result.stopped_by = checkpoints.save(step), reason
            log.info("stopped at step %d (%s); checkpoint %s; a rerun that resumes it continues",
                     step, reason, checkpoints.path)
            result.images_per_s = window.images_per_s
            return result
    result.images_per_s = window.images_per_s
    # The weights first, then the final evaluation: a finished run keeps them even if it fails.
    result.checkpoint = checkpoints.save(step)
    if dist.is_main:
        result.final = save_model(checkpoints.model, checkpoints.path.parent / FINAL, checkpoints.model_name,
                                  checkpoints.model_record)
    barrier(dist)
    if last_eval != step:
        result.metrics = run_eval(step)
    result.completed = True
    log.info("done: %d steps, final model %s", step, checkpoints.path.parent / FINAL)
    return result
