"""One process per device with torchrun: process group, collective decisions and data sharding.

`setup` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and joins the process group (NCCL on GPUs,
Gloo on CPU); without torchrun everything degrades to one process and no collective is called, so
library code calls the helpers unconditionally. Data sharding is by *global sample position*: the
global batch of step t is positions [t*B, (t+1)*B) of one seeded stream and rank r takes its r-th
slice, so N devices, `--batch-split N` and a plain run see the same images at every step.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from bitlab.data.transforms import BadImageError
from bitlab.device import parse_device
from bitlab.errors import BitlabError, ConfigError
from bitlab.train.torchrun import env_rank

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its rank among `world_size` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, writes metrics and saves checkpoints."""
        return self.rank == 0


def setup(device: str | torch.device | None = None) -> DistInfo:
    """Read torchrun's environment and join the process group (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = parse_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **_attempt_store(rank, world))
        if rank == 0:  # joining is a rendezvous: every rank is in once it returns
            log.info("%d processes joined the %s process group (rank 0 on %s)", world, backend, dev)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def _attempt_store(rank: int, world: int) -> dict:
    """Under torchrun, the process group's store with a key prefix per restart attempt: torchrun keeps
    one store for all attempts (`--max-restarts`), and a restarted attempt's ranks would find the dead
    attempt's addresses under the same keys and hang connecting to them until the timeout."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        return {}
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world))
    return {"store": dist.PrefixStore(f"bitlab/attempt{attempt}", store)}


def teardown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str | torch.device | None, info: DistInfo | None = None) -> Iterator[DistInfo]:
    """`info` when the caller already joined the process group; else `setup` now and `teardown` after."""
    if info is not None:
        yield info
        return
    info = setup(device)
    try:
        yield info
    except BaseException:
        teardown(info)  # no barrier here: the other ranks may never reach one
        raise
    # Leave together: a rank that tears down and exits while another still finishes its last
    # writes can make Gloo's connection threads abort the slower process at exit.
    barrier(info)
    teardown(info)


T = TypeVar("T")


class EveryRankError(BitlabError):
    """A data error raised on every rank at the same step (a collective decision): the ranks can
    still write a checkpoint together before stopping."""


class UnreadableDataError(BadImageError, EveryRankError):
    """Raised by `stop_on_errors` on every rank at once."""


def control_group(info: DistInfo):
    """A Gloo group for the per-step error check of GPU runs (None: the default group, Gloo on CPUs).
    On NCCL the host would wait every step for the GPU work queued (the optimiser step) before
    launching the next forward; over Gloo the ranks agree on the host alone."""
    if not info.distributed or info.device.type != "cuda":
        return None
    return dist.new_group(backend="gloo")


def stop_on_errors(errors: Sequence[str], info: DistInfo, what: str, hint: bool = True, group=None) -> None:
    """Collective (every rank calls it at the same point): if any rank has errors, every rank raises
    the same UnreadableDataError naming the files (`hint`: mention --skip-bad-images)."""
    if info.distributed:
        flag = torch.tensor([float(len(errors))], device="cpu" if group is not None else info.device)
        dist.all_reduce(flag, group=group)
        if flag.item() == 0:
            return
        per_rank: list = [None] * info.world_size
        dist.all_gather_object(per_rank, list(errors[:5]), group=group)
    elif not errors:
        return
    else:
        per_rank = [list(errors[:5])]
    lines = [(f"rank {r}: " if info.distributed else "") + m for r, msgs in enumerate(per_rank) for m in msgs]
    raise UnreadableDataError(f"cannot read {what} data, stopping{' every rank' if info.distributed else ''}: "
                              + "; ".join(lines) + (" (--skip-bad-images replaces unreadable images)" if hint else ""))


def main_rank_call(fn: Callable[[], T], info: DistInfo) -> T:
    """Run `fn` on rank 0 and hand its result to every rank; a `BitlabError` it raises is raised on
    every rank, so that all of them stop together instead of the others waiting in a collective."""
    result: Any = None
    if info.is_main:
        try:
            result = fn()
        except BitlabError as e:
            result = e
    result = broadcast_object(result, info)
    if isinstance(result, BitlabError):
        raise result
    return result


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over ranks, in place (returns the tensor for chaining)."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank (e.g. a decision only rank 0 can make)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order (e.g. per-rank counts for a summary)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel across ranks (gradients averaged), or the model itself."""
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP and/or torch.compile wrappers (what checkpoints store)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def per_rank_batch(batch_size: int, batch_split: int, info: DistInfo) -> int:
    """Micro-batch size on each rank; the global batch must split evenly over ranks and micro-steps."""
    parts = batch_split * info.world_size
    if batch_size % parts:
        raise ConfigError("batch_split", f"batch size {batch_size} does not split into {info.world_size} process(es) x "
                          f"{{setting}} {batch_split}; choose a multiple of {parts}")
    return batch_size // parts


class StepSampler(Sampler):
    """Endless, seeded, resumable sample stream for map-style datasets, sharded over ranks.

    Yields `(dataset_index, position)`: position g is the sample's place in the global stream (epoch
    g // n, slot g % n of that epoch's permutation), the key of per-sample randomness. Epochs run
    into each other with no partial batches (TF's repeat -> shuffle -> batch), each a fresh
    permutation: a few-shot set smaller than the batch is seen evenly (the official trainer drew
    with replacement). `start_step` skips the steps trained: a resumed run sees the same order."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, start_step: int = 0,
                 info: DistInfo = DistInfo()) -> None:
        if num_samples <= 0:
            raise BitlabError("cannot train on an empty dataset")
        per_rank = per_rank_batch(batch_size, 1, info)
        self.n, self.batch_size, self.seed, self.start_step = num_samples, batch_size, seed, start_step
        self.lo = info.rank * per_rank
        self.hi = self.lo + per_rank
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng((self.seed, epoch)).permutation(self.n)
        return self._perm

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step = self.start_step
        while True:
            for g in range(step * self.batch_size + self.lo, step * self.batch_size + self.hi):
                epoch, slot = divmod(g, self.n)
                yield int(self.permutation(epoch)[slot]), g
            step += 1


class ShardSampler(Sampler):
    """Rank r's share (every world_size-th index from r) of a finite dataset, in order, no padding:
    per-rank evaluation sums add up to exactly the full-set numbers."""

    def __init__(self, num_samples: int, info: DistInfo = DistInfo()) -> None:
        self.indices = range(info.rank, num_samples, info.world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
