"""The shared training engine: optimiser steps from micro-batches, checkpoint/resume, signals,
NaN guard, metrics and progress. `bitlab finetune` and `bitlab pretrain` are thin layers on it.

What the caller supplies (nothing here knows about HyperRule, MixUp or labels):
- `data`: a `StepData` whose `steps(start)` yields, for every optimiser step from `start` on, this
  rank's micro-batches as `(inputs, targets)` already on the device. It must be a deterministic
  function of the step (seeded order and augmentation), which is what makes resume exact;
- `lr_at(step)`: the learning rate of step `step` (0-based), or None when training is over.
  A param group with `lr_scale` gets `lr * lr_scale`;
- `loss_fn(outputs, targets)`: the mean loss of one micro-batch;
- `make_optimizer(model)`: called after the model is on its device;
- `evaluate(model, step)`: optional, returns a dict of metrics (called every `eval_every` steps and
  at the end, on every rank: it may use collectives). It runs after that step's checkpoint (and, at
  the end, after `final.pt`), so a failing evaluation loses no training.

Run directory (rank 0 writes): `checkpoint.pt` (latest, atomic: model, optimiser, scaler, step,
RNG states), `final.pt` (the model alone), `metrics.jsonl` + `metrics.csv` (one row per log or
eval event; training rows carry loss, lr, images/s, seconds per step and seconds per step spent
waiting for data), `log.txt`, and TensorBoard events under `tb/` when tensorboard is installed.

Micro-batching: each micro-batch's loss is weighted by its share of the step's images, and DDP's
gradient all-reduce runs only on the last micro-step (`no_sync()` on the others), so a step is
the same update as one big batch. A non-finite loss stops the run *before* the update; the last
good checkpoint is left untouched. SIGINT/SIGTERM finish the current step, write a checkpoint and
return (a second Ctrl-C aborts at once). A data error raised by `data.steps` (an unreadable image)
first checkpoints the last completed step when that is safe: in one process, or when every rank
raises it at the same step (`EveryRankError`).

RNGs: each rank's global RNG states (torch, CUDA, numpy, random: what dropout or drop-path draw
from) are gathered into the checkpoint and each rank restores its own, so a resumed run draws what
an uninterrupted one would. On another number of processes the ranks the checkpoint has states for
restore theirs and the others start streams seeded by (step, rank), with a warning: such a run
continues correctly but not bit for bit.

`RunRecord` wraps a whole command (data loading included): `log.txt` from its first line, and when
the run dies, the error in `log.txt` and `summary.json` (`completed: false`).
"""
from __future__ import annotations

import contextlib
import csv
import io as _io
import json
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bitlab import io
from bitlab.data.transforms import BadImageError, normalize
from bitlab.errors import BitlabError
from bitlab.train.distributed import (DistInfo, all_gather_object, all_reduce_sum, barrier, unwrap_model,
                                      wrap_model)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
FINAL = "final.pt"
CHECKPOINT_FORMAT = "bitlab-train-checkpoint"
PRECISIONS = ("fp32", "bf16", "fp16")

MicroBatch = tuple[torch.Tensor, Any]


class StepData(Protocol):
    def steps(self, start: int) -> Iterator[Sequence[MicroBatch]]:
        """From optimiser step `start` on: each step's micro-batches for this rank, on the device.

        A step's sequence may be lazy (items built on access, to keep one micro-batch of floats in
        memory at a time); if it has `num_images`, that is the step's image count on this rank."""


class NonFiniteLossError(BitlabError):
    """The loss became NaN or infinite; the run stopped before applying that update."""


class EveryRankError(BitlabError):
    """A data error that `StepData.steps` raises on every rank at the same step (a collective
    decision): the ranks can still write a checkpoint together before stopping."""


def control_group(dist: DistInfo):
    """A Gloo group for the per-step error check of GPU runs (None: use the default group).

    An all-reduce on the NCCL group would make the host wait, every step, for the GPU work already
    queued (the optimiser step) before it can launch the next forward; on CPU tensors over Gloo the
    ranks agree on the host alone. CPU runs' default group is Gloo already."""
    if not dist.distributed or dist.device.type != "cuda":
        return None
    return torch.distributed.new_group(backend="gloo")


class UnreadableDataError(BadImageError, EveryRankError):
    """Raised by `stop_on_errors` on every rank at once (the loop may still checkpoint together)."""


def stop_on_errors(errors: Sequence[str], dist: DistInfo, what: str, hint: bool = True, group=None) -> None:
    """Collective: if any rank has errors, every rank raises the same UnreadableDataError naming the
    files (`hint`: mention --skip-bad-images; `group`: from `control_group`).

    One tiny all-reduce per call; every rank must call it at the same point (once per step)."""
    if dist.distributed:
        flag = torch.tensor([float(len(errors))], device="cpu" if group is not None else dist.device)
        torch.distributed.all_reduce(flag, group=group)
        if flag.item() == 0:
            return
        per_rank: list = [None] * dist.world_size
        torch.distributed.all_gather_object(per_rank, list(errors[:5]), group=group)
    elif not errors:
        return
    else:
        per_rank = [list(errors[:5])]
    lines = [(f"rank {r}: " if dist.distributed else "") + m for r, msgs in enumerate(per_rank) for m in msgs]
    raise UnreadableDataError(f"cannot read {what} data, stopping{' every rank' if dist.distributed else ''}: "
                              + "; ".join(lines) + (" (--skip-bad-images replaces unreadable images)" if hint else ""))


def require(cfg: Any, ok: bool, name: str, what: str) -> None:
    """Refuse `cfg.<name>` unless `ok`, naming it as its flag: "--base-lr must be ..., got -1"."""
    if not ok:
        raise BitlabError(f"--{name.replace('_', '-')} must be {what}, got {getattr(cfg, name)}")


def check_running(cfg: Any) -> None:
    """The loop's step counts as the flags of the same names (`cfg`: LoopConfig or a command's config)."""
    if cfg.log_every < 1:
        raise BitlabError(f"--log-every must be at least 1, got {cfg.log_every}")
    for flag, value in (("--checkpoint-every", cfg.checkpoint_every), ("--eval-every", cfg.eval_every)):
        if value < 0:
            raise BitlabError(f"{flag} must be 0 (only at the end) or a positive step count, got {value}")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise BitlabError(f"--stop-after must be at least 1 step, got {cfg.stop_after}")


@dataclass
class LoopConfig:
    """How the engine runs (the command's own dataclass holds what to train)."""

    total_steps: int
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 100  # 0: at the end (and on signals) only
    log_every: int = 10
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a gradient scaler)
    channels_last: bool = False
    compile: bool = False
    # stop with a checkpoint (as if interrupted) after this many steps of this call, counted from
    # the resumed step: the same --stop-after N advances any run by N steps (scripts training in chunks)
    stop_after: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BitlabError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.total_steps <= 0:
            raise BitlabError(f"the schedule has no steps (total {self.total_steps})")
        check_running(self)


@dataclass
class LoopResult:
    step: int  # optimiser steps done
    completed: bool  # reached the end of the schedule (False: interrupted / stopped early)
    final_metrics: dict = field(default_factory=dict)
    checkpoint: Path | None = None
    final: Path | None = None
    images_per_s: float = 0.0
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM" / "stop_after" when not completed


# ----------------------------------------------------------------------------- run directory
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


def _refuse_overwrite(run_dir: Path, how: str) -> None:
    raise BitlabError(f"{run_dir} already holds a training checkpoint; {how} to continue it or choose another --out")


def _resolved(value: Any) -> Any:
    """An existing path as an absolute one (the same data from another directory); else unchanged
    (builtin:digits, or a path that is gone and is compared as written)."""
    return str(Path(value).resolve()) if isinstance(value, str) and Path(value).exists() else value


def recorded_config(config: Any) -> dict:
    """The command's dataclass as config.json records it: the fields its class lists in
    `PATH_FIELDS` as absolute paths, so that a rerun from another directory compares equal."""
    out = asdict(config) if is_dataclass(config) else dict(config)
    for key in getattr(config, "PATH_FIELDS", ()):
        out[key] = _resolved(out.get(key))
    return out


def check_resume_settings(run_dir: Path, config: Any, keys: Sequence[str], *, resume: bool = True,
                          counts: dict[str, int] | None = None) -> dict | None:
    """The previous run's plan.json (`{}` if it has none) when `run_dir` holds a checkpoint to
    continue, None when there is none. Refuses a checkpoint without `resume` (saying how to resume
    by the config's `RESUME_HINT`: each command resumes by other flags), one written with
    other values of `keys` (what is trained; `PATH_FIELDS` compared as resolved paths), and one
    whose plan counted other `counts` (e.g. images added under the same --data folder: the
    schedule and data order would change under the checkpoint), naming each change."""
    if not (run_dir / CHECKPOINT).exists():
        return None
    if not resume:
        _refuse_overwrite(run_dir, getattr(config, "RESUME_HINT", "pass resume=True"))
    check_settings(run_dir, config, keys, what="a checkpoint", action="resume this checkpoint")
    plan_path = run_dir / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
    if changed := [k for k, v in (counts or {}).items() if k in plan and plan[k] != v]:
        what = ", ".join(f"{k}: {plan[k]} -> {counts[k]}" for k in changed)
        raise BitlabError(f"{plan_path}: the data changed since this checkpoint was written ({what}); its schedule "
                          "and data order no longer apply: restore the data or use another --out")
    return plan


def check_settings(run_dir: Path, config: Any, keys: Sequence[str], *, what: str = "a finished run",
                   action: str = "reuse this run") -> None:
    """Refuse `run_dir` when its config.json was written with other values of `keys` (`PATH_FIELDS`
    compared as resolved paths), naming each change; `what` and `action` word the error."""
    path = run_dir / "config.json"
    if not path.exists():
        raise BitlabError(f"{run_dir}: {what} without config.json (not a bitlab run?); use another --out")
    old, new = json.loads(path.read_text()), recorded_config(config)
    for key in getattr(config, "PATH_FIELDS", ()):  # older runs recorded paths as typed
        old[key] = _resolved(old.get(key))
    if changed := [k for k in keys if old.get(k) != new.get(k)]:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise BitlabError(f"{path}: cannot {action} with different settings ({diff}); "
                          "use the original settings or another --out")


def write_config(run_dir: str | Path, config: Any) -> Path:
    """The command's dataclass as `config.json` (atomic; see `recorded_config`)."""
    path = Path(run_dir) / "config.json"
    io.write_json(path, recorded_config(config))
    return path


class MetricsWriter:
    """`metrics.jsonl` (append) and `metrics.csv` (columns = union of keys; rewritten when a new
    key appears), plus TensorBoard scalars when `torch.utils.tensorboard` imports."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.jsonl, self.csv = run_dir / "metrics.jsonl", run_dir / "metrics.csv"
        self.rows = read_metrics(self.jsonl)
        self.columns = _columns(self.rows)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.tb = SummaryWriter(str(run_dir / "tb"))

    def truncate(self, after_step: int) -> None:
        """Drop rows logged after `after_step` (a resumed run redoes those steps)."""
        kept = [r for r in self.rows if r.get("step", 0) <= after_step]
        if len(kept) != len(self.rows):
            self.rows = kept
            io.write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        self._rewrite_csv()

    def write(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if set(row) - set(self.columns) or not self.csv.exists():
            self.columns = _columns(self.rows)
            self._rewrite_csv()
        else:
            with open(self.csv, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, self.columns).writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{row.get('split', 'train')}/{k}", v, row.get("step", 0))

    def _rewrite_csv(self) -> None:
        buf = _io.StringIO()
        writer = csv.DictWriter(buf, self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        io.write_text(self.csv, buf.getvalue())

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = ["step", "split"]
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


@contextlib.contextmanager
def _log_to_file(path: Path, enabled: bool) -> Iterator[logging.Handler | None]:
    """Mirror the `bitlab` loggers into `log.txt` (appending, so resumed runs keep their history).
    Yields the handler; when one for this file is attached already (a `RunRecord` around the
    loop), that one, and nothing is added."""
    logger = logging.getLogger("bitlab")
    if not enabled:
        yield None
        return
    if same := [h for h in logger.handlers if isinstance(h, logging.FileHandler)
                and h.baseFilename == os.path.abspath(path)]:  # how FileHandler names its file
        yield same[0]
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()


class RunRecord:
    """Around a whole command: `log.txt` from its first line (data loading, the plan), and when the
    run dies, the error in `log.txt` and in `summary.json` (`completed: false`, the error, the step
    `checkpoint.pt` holds). Rank 0 writes.

    `summary.json` is written only once `claim()` was called, i.e. once the command has checked the
    directory is its own to write (resume settings accepted): a refused rerun must not overwrite
    the summary of the run that is there. A command that fails before `claim()` (bad data, an
    unknown model, a refused resume) leaves nothing behind: its new `log.txt` and the folders it
    made are removed (the CLI prints the error); a log.txt or folder that was there stays."""

    def __init__(self, run_dir: str | Path, dist: DistInfo) -> None:
        self.run_dir, self.dist, self.claimed = Path(run_dir), dist, False
        self._stack = contextlib.ExitStack()
        self._handler: logging.Handler | None = None
        self._made: Path | None = None  # the topmost folder this command creates (None: run_dir exists)
        self._new_log = False

    def __enter__(self) -> "RunRecord":
        if self.dist.is_main:
            self._made = next((p for p in reversed([self.run_dir, *self.run_dir.parents])
                               if not p.exists()), None)
            self._new_log = not (self.run_dir / "log.txt").exists()
        self._handler = self._stack.enter_context(_log_to_file(self.run_dir / "log.txt", self.dist.is_main))
        return self

    def claim(self) -> None:
        """From now on a failure is this run's: record it in summary.json."""
        self.claimed = True

    def __exit__(self, kind, error, tb) -> None:
        try:
            if error is not None and isinstance(error, (Exception, KeyboardInterrupt)) and self.dist.is_main:
                message = str(error) or type(error).__name__
                if self._handler is not None:  # to the file only: the CLI prints the error on stderr itself
                    self._handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0,
                                                        "run stopped by an error: %s", (message,), None))
                if self.claimed:
                    ckpt = self.run_dir / CHECKPOINT
                    io.write_json(self.run_dir / "summary.json", {
                        "completed": False, "error": message, "error_type": type(error).__name__,
                        "checkpoint_step": _saved_step(ckpt) if ckpt.exists() else None})
        finally:
            self._stack.close()
            if error is not None and not self.claimed and self.dist.is_main:
                self._remove_own_traces()

    def _remove_own_traces(self) -> None:
        """log.txt if this command made it, then the folders it made, innermost first, while empty."""
        if self._new_log:
            (self.run_dir / "log.txt").unlink(missing_ok=True)
        if self._made is None:
            return
        folder = self.run_dir
        while True:
            try:
                folder.rmdir()  # only an empty folder: never what someone else put there
            except OSError:
                return
            if folder == self._made:
                return
            folder = folder.parent


class _StopFlag:
    """SIGINT/SIGTERM -> finish the step, checkpoint, return. A second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
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


# ----------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate()),
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_lists(obj):
    return [_to_lists(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _to_tuples(obj):
    return tuple(_to_tuples(o) for o in obj) if isinstance(obj, list) else obj


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _restore_rng(saved: list[dict] | dict, dist: DistInfo, step: int) -> None:
    """This rank's own RNG states from a checkpoint (module docs: other process counts). A single
    dict is an older checkpoint's rank-0 state."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) != dist.world_size and dist.is_main:
        log.warning("the checkpoint holds the RNG states of %d process(es), this run has %d: %s; global-RNG "
                    "randomness (dropout, drop-path) will differ from an uninterrupted run", len(states),
                    dist.world_size, "ranks %d and up start streams seeded by (step, rank)" % len(states)
                    if dist.world_size > len(states) else "the extra states are left unused")
    if dist.rank < len(states):
        _set_rng_state(states[dist.rank])
        return
    seed = int(np.random.SeedSequence((step, dist.rank)).generate_state(1)[0])
    torch.manual_seed(seed)  # CUDA generators too
    random.seed(seed)
    np.random.seed(seed)


def model_signature(model: nn.Module) -> dict[str, list[int]]:
    """Parameter/buffer names and shapes: what a checkpoint must match to be resumed into `model`."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def save_model(model: nn.Module, path: str | Path, name: str | None = None) -> Path:
    """The trained model alone: a bitlab model file for ResNetV2 (architecture included, loads with
    `create_model(name, num_classes=..., pretrained=path)`), a plain state dict otherwise (timm)."""
    from bitlab.models import ResNetV2, save_bitlab

    model = unwrap_model(model)
    if isinstance(model, ResNetV2):
        return save_bitlab(model, path, name=name)
    io.torch_save(model.state_dict(), path)
    return Path(path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, dist: DistInfo = DistInfo()) -> dict:
    """Restore model, optimiser, scaler and this rank's RNG states from a training checkpoint; returns it."""
    ckpt = io.torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise BitlabError(f"{path}: not a bitlab training checkpoint")
    own = model_signature(model)
    saved = {k: list(v.shape) for k, v in ckpt["model"].items()}
    if saved != own:
        diff = sorted(set(saved) ^ set(own)) or [k for k in own if saved[k] != own[k]]
        where = f" (first difference: {diff[0]!r})" if diff else ""
        raise BitlabError(f"{path}: checkpoint is for another architecture ({ckpt.get('model_name') or 'unknown'}, "
                          f"{len(saved)} tensors) than this run's model ({len(own)} tensors){where}; "
                          "use the same --model and classes, or another --out")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    _restore_rng(ckpt["rng"], dist, int(ckpt["step"]))
    return ckpt


# ----------------------------------------------------------------------------- the loop
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


def run(
    model: nn.Module,
    *,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    data: StepData,
    lr_at: Callable[[int], float | None],
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    run_dir: str | Path,
    config: LoopConfig,
    dist: DistInfo = DistInfo(),
    evaluate: Callable[[nn.Module, int], dict] | None = None,
    resume: bool = False,
    model_name: str | None = None,
) -> LoopResult:
    """Train `model` for `config.total_steps` optimiser steps (or until `lr_at` returns None)."""
    run_dir = Path(run_dir)
    ckpt_path, final_path = run_dir / CHECKPOINT, run_dir / FINAL
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    raw = model.to(dist.device)
    if config.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(raw)
    scaler = torch.amp.GradScaler(dist.device.type) if config.precision == "fp16" else None

    start, saved = 0, None  # saved: the step checkpoint.pt holds
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, raw, optimizer, scaler, dist)
        start = saved = int(ckpt["step"])
    elif resume:
        log.info("no checkpoint in %s yet: starting from step 0", run_dir)
    elif ckpt_path.exists() and not resume:
        _refuse_overwrite(run_dir, "pass resume=True")
    barrier(dist)

    net = wrap_model(raw, dist)
    if config.compile:
        net = torch.compile(net)
    metrics = MetricsWriter(run_dir) if dist.is_main else None
    if metrics is not None:
        metrics.truncate(start)

    def save_checkpoint(step: int) -> Path:
        nonlocal saved
        rng = all_gather_object(_rng_state(), dist)  # every rank's own streams, in rank order
        if dist.is_main:
            io.torch_save({"format": CHECKPOINT_FORMAT, "version": 2, "step": step, "model_name": model_name,
                           "model": raw.state_dict(), "model_config": _model_config(raw),
                           "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                           "rng": rng, "world_size": dist.world_size}, ckpt_path)
        barrier(dist)
        saved = step
        return ckpt_path

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

    result = LoopResult(step=start, completed=False, checkpoint=ckpt_path if saved is not None else None)
    last_eval_step = -1
    try:
        with _log_to_file(run_dir / "log.txt", dist.is_main), _StopFlag() as stop, tqdm(
            total=config.total_steps, initial=start, unit="step", dynamic_ncols=True, desc="train",
            disable=not (dist.is_main and config.progress),
        ) as bar:
            if start:  # logged here, inside log.txt's handler, so that a run's history shows its resumes
                log.info("resumed from %s at step %d", ckpt_path, start)
            net.train()
            step = start
            window_loss, window_steps, window_images, window_data = 0.0, 0, 0, 0.0
            window_t0 = time.perf_counter()
            total_images, total_time = 0, 0.0
            batches = data.steps(start)
            while step < config.total_steps:
                lr = lr_at(step)
                if lr is None:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                t0 = time.perf_counter()
                try:
                    micro = next(batches)
                except BitlabError as e:
                    # An unreadable image: the weights are those of a completed step, so keep them,
                    # when all ranks are here to write together (else one would wait in a collective).
                    if step > (saved or 0) and (not dist.distributed or isinstance(e, EveryRankError)):
                        result.checkpoint = save_checkpoint(step)
                        log.info("checkpoint of step %d written before stopping on a data error", step)
                    raise
                data_s = time.perf_counter() - t0  # waiting for the input pipeline
                n_step = getattr(micro, "num_images", None) or sum(len(x) for x, _ in micro)
                step_loss = torch.zeros((), device=dist.device)
                for k, (x, y) in enumerate(micro):
                    if config.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    last = k == len(micro) - 1
                    # DDP all-reduces gradients only on the last micro-step of an update.
                    with contextlib.nullcontext() if last or not dist.distributed else net.no_sync():
                        with autocast(dist.device, config.precision):
                            loss = loss_fn(net(x), y)
                        weighted = loss * (len(x) / n_step)
                        (scaler.scale(weighted) if scaler else weighted).backward()
                    step_loss += weighted.detach().float()
                # One small all-reduce per step carries the mean loss (logging, NaN guard) and the stop
                # flag, so that every rank takes the same decision. The gradient norm joins the NaN
                # guard: a finite loss can still overflow the gradients, and that one update would put
                # NaNs into the weights and the next checkpoint (fp16's scaler skips such steps itself).
                stop_flag = torch.tensor(float(stop.signal is not None), device=dist.device)
                grad_norm = step_loss.new_zeros(()) if scaler else _grad_norm(raw)
                shared = all_reduce_sum(torch.stack([step_loss, stop_flag, grad_norm]), dist)
                mean_loss, stop_now = shared[0].item() / dist.world_size, shared[1].item() > 0
                if not math.isfinite(mean_loss) or not math.isfinite(shared[2].item()):
                    optimizer.zero_grad(set_to_none=True)
                    kept = (f"the last good checkpoint ({ckpt_path}, step {_saved_step(ckpt_path)}) is kept"
                            if ckpt_path.exists() else "no checkpoint had been written yet")
                    what = (f"loss is {mean_loss}" if not math.isfinite(mean_loss)
                            else f"gradients are not finite (loss {mean_loss:.4g})")
                    raise NonFiniteLossError(f"{what} at step {step}: training stopped before that "
                                             f"update; {kept}. Lower the learning rate or check the data.")
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                result.step = step
                images = n_step * dist.world_size
                total_time += time.perf_counter() - t0
                total_images += images
                window_loss, window_steps = window_loss + mean_loss, window_steps + 1
                window_images, window_data = window_images + images, window_data + data_s
                bar.update(1)
                if step % config.log_every == 0 or step == config.total_steps:
                    elapsed = time.perf_counter() - window_t0
                    row = {"step": step, "split": "train", "loss": window_loss / window_steps, "lr": lr,
                           "images_per_s": window_images / max(elapsed, 1e-9), "step_s": elapsed / window_steps,
                           "data_s": window_data / window_steps}
                    if metrics is not None:
                        metrics.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{row['images_per_s']:.1f}")
                    window_loss, window_steps, window_images, window_data = 0.0, 0, 0, 0.0
                    window_t0 = time.perf_counter()
                eval_now = bool(config.eval_every) and step % config.eval_every == 0 and step < config.total_steps
                # Checkpoint before evaluating: an evaluation that fails (a bad validation image)
                # must not lose the steps trained since the last checkpoint.
                if (eval_now or config.checkpoint_every and step % config.checkpoint_every == 0) \
                        and step < config.total_steps:
                    result.checkpoint = save_checkpoint(step)
                if eval_now:
                    result.final_metrics = run_eval(step)
                    last_eval_step = step
                stopping = stop_now or (config.stop_after is not None and step >= start + config.stop_after)
                if stopping and step < config.total_steps:
                    if saved != step:
                        result.checkpoint = save_checkpoint(step)
                    result.stopped_by = signal.Signals(stop.signal).name if stop.signal else "stop_after"
                    log.info("stopped at step %d (%s); checkpoint %s; a rerun that resumes it continues",
                             step, result.stopped_by, ckpt_path)
                    result.images_per_s = total_images / max(total_time, 1e-9)
                    return result
            result.images_per_s = total_images / max(total_time, 1e-9)
            # The weights first, then the final evaluation: a finished run keeps them even if it fails.
            result.checkpoint = save_checkpoint(step) if saved != step else ckpt_path
            if dist.is_main:
                result.final = save_model(raw, final_path, model_name)
            barrier(dist)
            if last_eval_step != step:
                result.final_metrics = run_eval(step)
            result.completed = True
            log.info("done: %d steps, final model %s", step, final_path)
            return result
    finally:
        if metrics is not None:
            metrics.close()


def _grad_norm(model: nn.Module) -> torch.Tensor:
    """L2 norm over all gradients (one fused pass); NaN/inf when any gradient is."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.nn.utils.get_total_norm(grads).float()


def _saved_step(path: Path) -> int | str:
    try:
        return int(io.torch_load(path)["step"])
    except (BitlabError, KeyError, TypeError, ValueError):
        return "?"


def _model_config(model: nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else None
