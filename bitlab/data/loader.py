"""From images to batches for every consumer (training, its evaluation, `evaluate`, `predict`, `dedup`):
one `Item`, `Batch`, `collate`, loader factory and bad-image policy. Workers decode with OpenCV and
apply the view: uint8 CHW tensors, normalised (and mixed) once per batch on the device. A training
view is `view(img, rng=...)`, seeded by (run seed, the task's stream constant, the stream position):
the n-th image is augmented alike whatever the workers, the batch split or an interruption.

Bad images, the one policy: an image that cannot be read, decoded or transformed is a message
naming it, never a worker traceback (`READ_ERRORS`). In training with `skip_bad` it is replaced by
the next readable image of its class (single-label files: the batch keeps its size, the classes
their frequencies, a few-shot set its K), of the set (multi-label files: no one class) or of its
shard (no random access): at most `MAX_SUBSTITUTES` tries, no image twice, each warned about once
and listed in summary.json. Without `skip_bad`, or when no substitute reads, the step stops every
rank naming the files (`distributed.stop_on_errors`) after checkpointing the completed step.
Evaluation never substitutes (its counts must be exact): with `skip_bad` a bad image is left out
and warned about, else it stops, named; `evaluate`, `predict` and `dedup` stop, naming it.
"""
from __future__ import annotations

import itertools
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, NamedTuple, Sequence, TypeVar

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from bitlab.data import shards
from bitlab.data.datasets import ImageSet
from bitlab.data.multilabel import MultiLabelSet
from bitlab.data.transforms import decode_image, decode_image_bytes, to_chw_tensor
from bitlab.errors import BitlabError

# What reading an image may raise: bitlab's own errors (undecodable, no such file, a bad shard
# sample), OSError (permissions, I/O) and OpenCV's (a transform refusing an odd image).
READ_ERRORS = (BitlabError, OSError, cv2.error)
MAX_SUBSTITUTES = 64  # tries for a readable substitute before the step stops

Images = ImageSet | MultiLabelSet | Sequence[str | os.PathLike]
_C = TypeVar("_C")


class Item(NamedTuple):
    image: torch.Tensor | None
    target: Any  # int class, uint8 multi-hot tensor, or None (images without labels)
    messages: tuple[str, ...]  # replaced images, or why `image` is None


class Batch(NamedTuple):
    images: torch.Tensor | tuple[torch.Tensor, ...]  # uint8 NCHW (or the views' own tensors; a tuple: several views)
    targets: torch.Tensor | None  # int64 N, uint8 N x C, or None
    replaced: tuple[str, ...]  # bad images replaced by readable ones
    errors: tuple[str, ...]  # items without an image: left out of this batch


def collate(items: Sequence[Item]) -> Batch:
    good = [it for it in items if it.image is not None]
    replaced = tuple(m for it in good for m in it.messages)
    errors = tuple(m for it in items if it.image is None for m in it.messages)
    like = items[0].target if items else None
    if like is None:
        targets = None
    elif isinstance(like, torch.Tensor):
        targets = torch.stack([it.target for it in good]) if good else torch.empty((0, len(like)), dtype=like.dtype)
    else:
        targets = torch.tensor([it.target for it in good], dtype=torch.int64)
    if good and isinstance(good[0].image, tuple):  # several views of each image: a batch per view
        images = tuple(torch.stack(views) for views in zip(*(it.image for it in good)))
    else:
        images = torch.stack([it.image for it in good]) if good else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    return Batch(images, targets, replaced, errors)


def first_readable(candidates: Iterable[_C], read: Callable[[_C], tuple[torch.Tensor, Any]],
                   name: Callable[[_C], str], *, tries: int, target: Any) -> Item:
    """The bad-image policy's core: the first of `candidates` (at most `tries`) that `read` turns
    into (image, target); the messages of those that failed. `target`: the item's when none reads."""
    messages = []
    for candidate in itertools.islice(candidates, tries):
        try:
            image, found = read(candidate)
        except READ_ERRORS as e:
            messages.append(_message(e, name(candidate)))
            continue
        return Item(image, found, tuple(messages))
    return Item(None, target, tuple(messages))


def _message(error: Exception, name: str) -> str:
    if isinstance(error, BitlabError):
        return str(error)  # names the file already
    if isinstance(error, OSError):
        return f"{name}: cannot read ({error.strerror or error})"
    return f"{name}: cannot process image ({type(error).__name__}: {error})"


def to_tensor(view: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
    if isinstance(view, tuple):
        return tuple(to_tensor(v) for v in view)
    return view if isinstance(view, torch.Tensor) else to_chw_tensor(view)


def target_of(images: Images, i: int) -> Any:
    """Image `i`'s target: its class (ImageSet), its multi-hot labels (MultiLabelSet), or None."""
    if isinstance(images, ImageSet):
        return int(images.labels[i])
    if isinstance(images, MultiLabelSet):
        return torch.from_numpy(images.multi_hot(i))
    return None


# ----------------------------------------------------------------------------- file sets
class TrainFiles(Dataset):
    """Training views keyed by `StepSampler`'s (index, position); `decode_side`: the view's shorter side."""

    def __init__(self, images: ImageSet | MultiLabelSet, view: Callable, *, seed: int, stream: int,
                 skip_bad: bool, decode_side: int | None = None) -> None:
        self.images, self.view, self.seed, self.stream = images, view, seed, stream
        self.tries, self.decode_side = MAX_SUBSTITUTES if skip_bad else 1, decode_side
        n = len(images)
        if isinstance(images, ImageSet):  # each class's indices, and each image's place among them
            self.groups = [np.flatnonzero(images.labels == c) for c in range(len(images.classes))]
            self.group_of, self.place = images.labels, np.empty(n, dtype=np.int64)
            for idx in self.groups:
                self.place[idx] = np.arange(len(idx))
        else:  # multi-label: the whole set, in order
            self.groups, self.group_of, self.place = [np.arange(n)], np.zeros(n, np.int64), np.arange(n)

    def __len__(self) -> int:
        return len(self.images)

    def substitutes(self, index: int) -> Iterable[int]:
        """`index`, then the images after it in its group (class, or set), wrapping round once."""
        group = self.groups[self.group_of[index]]
        start = self.place[index]
        return (int(group[(start + k) % len(group)]) for k in range(len(group)))

    def __getitem__(self, key: tuple[int, int]) -> Item:
        index, position = key
        rng = np.random.default_rng((self.seed, self.stream, position))

        def read(i: int) -> tuple[torch.Tensor, Any]:
            img = decode_image(self.images.paths[i], min_side=self.decode_side)
            return to_tensor(self.view(img, rng=rng)), target_of(self.images, i)

        return first_readable(self.substitutes(index), read, lambda i: str(self.images.paths[i]), tries=self.tries,
                              target=target_of(self.images, index))


class EvalFiles(Dataset):
    """Evaluation views of a labelled set, or of plain paths (target None). `view` may return a
    tuple of views (several models' views of one decoded file): batches then hold a tuple of tensors."""

    def __init__(self, images: Images, view: Callable, decode_side: int | None = None) -> None:
        self.images, self.view, self.decode_side = images, view, decode_side
        self.paths = images.paths if isinstance(images, (ImageSet, MultiLabelSet)) else images

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Item:
        def read(j: int) -> tuple[torch.Tensor, Any]:
            img = decode_image(self.paths[j], min_side=self.decode_side)
            return to_tensor(self.view(img)), target_of(self.images, j)

        return first_readable([i], read, lambda j: str(self.paths[j]), tries=1, target=target_of(self.images, i))

    def __getitems__(self, indices: list[int]) -> list[Item]:
        """A batch's items (the DataLoader's batched fetch). In the main process (no loader workers)
        in threads, one per core the model's torch threads use: the model waits for the batch
        meanwhile, and OpenCV's decode and PIL's resize release the GIL. In a worker, one by one."""
        threads = min(len(indices), torch.get_num_threads())
        if threads < 2 or get_worker_info() is not None:
            return [self[i] for i in indices]
        with ThreadPoolExecutor(threads, thread_name_prefix="bitlab-decode") as pool:
            return list(pool.map(self.__getitem__, indices))


# ----------------------------------------------------------------------------- shard sets
class ShardViews:
    """Shard samples -> Items, for `ShardStream` (training: seeded by the key, the shard's next readable
    sample replacing a bad one) and `ShardPass` (`evaluate`)."""

    def __init__(self, view: Callable, *, num_classes: int, multi: bool, seed: int = 0, stream: int = 0,
                 skip_bad: bool = False) -> None:
        self.view, self.num_classes, self.multi, self.seed, self.stream = view, num_classes, multi, seed, stream
        self.tries = MAX_SUBSTITUTES if skip_bad else 1

    def target(self, labels: Sequence[int]) -> Any:
        if not self.multi:
            return int(labels[0])
        t = torch.zeros(self.num_classes, dtype=torch.uint8)
        t[list(labels)] = 1
        return t

    def read(self, sample: shards.Sample, **view_kw) -> tuple[torch.Tensor, Any]:
        name, data = sample.image()
        target = self.target(sample.labels())
        return to_tensor(self.view(decode_image_bytes(data, name), **view_kw)), target

    def __call__(self, samples: list[shards.Sample], j: int, key: tuple[int, int, int]) -> Item:
        rng = np.random.default_rng((self.seed, self.stream, *key))
        order = (samples[(j + k) % len(samples)] for k in range(len(samples)))
        return first_readable(order, lambda s: self.read(s, rng=rng), lambda s: s.name, tries=self.tries,
                              target=self.target([0]))

    def evaluate(self, sample: shards.Sample) -> Item:
        return first_readable([sample], self.read, lambda s: s.name, tries=1, target=self.target([0]))

    def error(self, message: str) -> Item:
        """The Item standing for a whole shard that cannot be read."""
        return Item(None, self.target([0]), (message,))


# ----------------------------------------------------------------------------- loaders
def _worker_init(_: int) -> None:
    # Ctrl-C reaches the whole process group; only the main process should react (it checkpoints
    # and stops), so workers keep serving the batches the current step still needs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers() -> int:
    """Loader processes per process: the CPU cores this process may use (its affinity mask, i.e. a
    Slurm or taskset allocation, not the machine's count), shared among the processes torchrun
    started on this node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def inference_workers(device: torch.device) -> int:
    """Loader processes for inference (`evaluate`, `predict`, `dedup`'s model embeddings) when none
    are asked for. On an accelerator, `default_workers()`. On the CPU the model's torch threads
    already use the cores, and a worker process beside them preempts them (oneDNN's threads then
    wait at every barrier): measured for R50x1 at 224 px on 2 cores, 2 workers beside 2 threads
    cost 17.5 % of the wall time against 9.3 % decoding in the main process between batches
    (benchmarks/RESULTS.md). So only the cores torch leaves free get workers; without any, the
    batch decodes in threads of the main process (`EvalFiles.__getitems__`) while the model waits."""
    if device.type != "cpu":
        return default_workers()
    return max(0, default_workers() - torch.get_num_threads())


def make_loader(dataset: Dataset, batch_size: int, *, sampler: Sampler | None = None, workers: int = 0,
                pin_memory: bool = False, persistent: bool = False) -> DataLoader:
    """A DataLoader with bitlab's collate, OpenCV-friendly workers and sensible prefetching."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, worker_init_fn=_worker_init if workers else None,
                      persistent_workers=persistent and workers > 0, prefetch_factor=4 if workers else None,
                      # Its own generator: creating a loader iterator must not consume the global
                      # torch RNG, or a resumed run (one extra iterator) would drift from an unbroken one.
                      generator=torch.Generator().manual_seed(0))
