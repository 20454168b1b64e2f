"""Sharded tar files in the WebDataset layout: a writer, and streaming readers for training and evaluation.

For data sets too large for a file-per-image file system (ImageNet-21k: 14M files), images are
packed into a few thousand tar files read sequentially. A shard set is a folder:

    DIR/shards.json            the index: classes, multi_label, and per shard its name, sample
                               count, size and sha256 (the readers need the counts to resume)
    DIR/shard-000000.tar ...   samples: consecutive members sharing a key (WebDataset's convention:
                               the member name up to the first dot of its base name)
    <key>.jpg (.png, ...)      the image file's bytes, exactly as they were (not re-encoded)
    <key>.cls                  single-label sets: the class index as decimal text (WebDataset's `cls`)
    <key>.json                 {"labels": [class indices], "path": the source file, relative}

so the files also read with the `webdataset` package or plain `tar`. Samples are shuffled when
written (seeded), so that a reader streaming a few shards already sees a mix of classes. Tars
written by other tools (webdataset's ShardWriter, img2dataset, `tar`) become a shard set with
`index_shards` (`bitlab shards-index DIR`), which checks each sample once and writes the same
`shards.json`; labels come from `.json`'s `labels` (or `label` / `cls`) or else `.cls`, and the
samples keep their order (shuffle when writing them, or training sees each shard's classes together).

Training reads (`ShardStream`) need no random access: every epoch the shards are permuted by (seed,
epoch) and dealt out to the *readers* (rank x DataLoader worker); a reader loads one shard at a
time (keep shards at a few hundred MB) and yields its samples in an order seeded by (seed, epoch,
shard). Each reader's stream is a pure function of the seed and the layout, and a resumed run skips
what was consumed by counting (whole shards from the index, without reading them).
"""
from __future__ import annotations

import hashlib
import io as _io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info
from tqdm.auto import tqdm

from bitlab import fileio
from bitlab.data.datasets import ImageSet
from bitlab.data.multilabel import MultiLabelSet, load_labelled, read_classes
from bitlab.data.transforms import BadImageError, decode_image_bytes
from bitlab.errors import BitlabError, ConfigError

log = logging.getLogger(__name__)

INDEX = "shards.json"
FORMAT = "bitlab-shards"
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "pbm", "tif", "tiff")
# Default samples per shard: ~100 MB of ImageNet JPEGs (110 KB each), the size WebDataset suggests.
SHARD_SIZE = 1000
# Keep the shard-order and sample-order streams apart from other streams of the same seed.
_SHARD_ORDER = 0x73686472
_SAMPLE_ORDER = 0x736D706C
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # key = dirname + base name up to the first dot
_T = TypeVar("_T")
_R = TypeVar("_R")


class ShardError(BitlabError):
    """A shard set or shard file that cannot be used (the message names the file)."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    bytes: int
    sha256: str


@dataclass
class ShardIndex:
    """A shard set on disk: where it is, its shards and what its labels mean."""

    root: Path
    shards: list[ShardInfo]
    classes: list[str]
    multi_label: bool
    source: str = ""
    seed: int | None = None
    label_counts: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # source files left out: they did not decode

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    def __len__(self) -> int:
        return self.num_samples

    def path(self, i: int) -> Path:
        return self.root / self.shards[i].name

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "classes": self.classes, "multi_label": self.multi_label,
                "source": self.source, "seed": self.seed, "num_samples": self.num_samples,
                "label_counts": self.label_counts, "skipped": self.skipped,
                "shards": [asdict(s) for s in self.shards]}


@dataclass
class Sample:
    """One WebDataset sample: its key and its members' bytes by extension (`jpg`, `cls`, `json`)."""

    key: str
    fields: dict[str, bytes]
    shard: Path

    @property
    def name(self) -> str:
        """`shard.tar:key` — what error messages call this sample."""
        return f"{self.shard}:{self.key}"

    def image(self) -> tuple[str, bytes]:
        """(member name, encoded bytes) of the image."""
        for ext in IMAGE_FIELDS:
            if ext in self.fields:
                return f"{self.shard}:{self.key}.{ext}", self.fields[ext]
        raise ShardError(f"{self.name}: no image member (expected one of .{', .'.join(IMAGE_FIELDS)}; "
                         f"found .{', .'.join(sorted(self.fields)) or 'nothing'})")

    def labels(self) -> list[int]:
        """Class indices: `.json`'s `labels` list, or its `label` / `cls` integer (other writers'
        names); else `.cls` (decimal text). A `.json` without labels (img2dataset's metadata) defers
        to `.cls`; one that does not parse, or whose `labels` are not integers, is an error."""
        try:
            meta = json.loads(self.fields["json"]) if "json" in self.fields else {}
            if not isinstance(meta, dict):
                raise ValueError("not an object")
            if "labels" in meta:
                labels = meta["labels"]
                if not (isinstance(labels, list) and all(_is_index(x) for x in labels)):
                    raise ValueError("labels must be a list of integers")
                return labels
            for name in ("label", "cls"):
                if _is_index(meta.get(name)):
                    return [meta[name]]
            if "cls" in self.fields:
                return [int(self.fields["cls"].decode().strip())]
        except (ValueError, UnicodeDecodeError):
            pass
        raise ShardError(f"{self.name}: no readable labels (.json with 'labels', 'label' or 'cls', or .cls)")


def _is_index(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is no class index


# ----------------------------------------------------------------------------- index
def is_shard_set(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / INDEX).is_file() or (path.name == INDEX and path.is_file())


def read_index(path: str | os.PathLike, *, check_files: bool = True) -> ShardIndex:
    """The shard set at `path` (its folder or its `shards.json`); every listed shard must exist."""
    path = Path(path)
    file = path if path.name == INDEX and path.is_file() else path / INDEX
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{path}: not a shard set (no {INDEX}; write one with `bitlab shards`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{file}: unreadable shard index ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        found = d.get("format") if isinstance(d, dict) else None
        raise ShardError(f"{file}: not a bitlab shard index (format {found!r})")
    try:
        shards = [ShardInfo(s["name"], int(s["count"]), int(s["bytes"]), s["sha256"]) for s in d["shards"]]
        index = ShardIndex(file.parent, shards, list(d["classes"]), bool(d["multi_label"]), d.get("source", ""),
                           d.get("seed"), list(d.get("label_counts") or []), list(d.get("skipped") or []))
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{file}: malformed shard index ({e!r})") from None
    if not shards:
        raise ShardError(f"{file}: the shard set is empty")
    for s in shards:
        if Path(s.name).name != s.name:
            raise ShardError(f"{file}: shard name {s.name!r} must be a plain file name")
    if check_files:
        missing = [s.name for s in shards if not (index.root / s.name).is_file()]
        if missing:
            raise ShardError(f"{file}: {len(missing)} shard file(s) missing, first {index.root / missing[0]}")
    return index


def verify(index: ShardIndex, progress: bool = False) -> list[str]:
    """Problems found by re-reading every shard (sha256, sample count): empty when all is well."""
    problems = []
    for i, s in enumerate(tqdm(index.shards, desc="verify", unit="shard", disable=not progress)):
        path = index.path(i)
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif fileio.sha256_file(path) != s.sha256:
            problems.append(f"{path}: sha256 differs from {INDEX} (changed or corrupt)")
        else:
            try:
                n = sum(1 for _ in iter_shard(path))
            except ShardError as e:
                problems.append(str(e))
                continue
            if n != s.count:
                problems.append(f"{path}: {n} samples, {INDEX} says {s.count}")
    return problems


# ----------------------------------------------------------------------------- reading
class _HashingReader:
    """A file read front to back through `read`, hashing the bytes that pass: the sha256 of a
    shard from the same single pass that reads its samples."""

    def __init__(self, f: IO[bytes], digest: Any) -> None:
        self.f, self.digest = f, digest

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        return data


def iter_shard(path: str | os.PathLike, digest: Any = None) -> Iterator[Sample]:
    """The samples of one tar shard, streamed in file order (members grouped by key). `digest`
    (a `hashlib` object) is fed the whole file's bytes on the way."""
    path = Path(path)
    key, fields = None, {}
    try:
        with open(path, "rb") as raw:
            source = raw if digest is None else _HashingReader(raw, digest)
            with tarfile.open(fileobj=source, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    m = _KEY.match(member.name)
                    if m is None:
                        continue  # no extension: not part of any sample (WebDataset skips these too)
                    k, ext = m[1], m[2].lower()
                    if k != key:
                        if key is not None:
                            yield Sample(key, fields, path)
                        key, fields = k, {}
                    elif ext in fields:  # as webdataset refuses it: which of the two is the sample's?
                        raise ShardError(f"{path}:{member.name}: member appears twice")
                    f = tar.extractfile(member)
                    fields[ext] = f.read() if f is not None else b""
            if digest is not None:  # tarfile stops at the end-of-archive block: hash the padding too
                while source.read(1 << 20):
                    pass
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise ShardError(f"{path}: unreadable tar shard ({e.__class__.__name__}: {e})") from None
    if key is not None:
        yield Sample(key, fields, path)


def read_shard(path: str | os.PathLike, expected: int | None = None) -> list[Sample]:
    """All samples of one shard in memory; `expected` (the index's count) is checked."""
    samples = list(iter_shard(path))
    if expected is not None and len(samples) != expected:
        raise ShardError(f"{path}: {len(samples)} samples, the index says {expected} (truncated or replaced?)")
    return samples


def reader_layout(num_shards: int, world_size: int, workers: int) -> int:
    """DataLoader workers per rank for a shard stream: at most `workers`, and every reader
    (rank x worker) must get at least one shard per epoch, or it would never yield."""
    if num_shards < world_size:
        raise ShardError(f"{num_shards} shard(s) cannot feed {world_size} processes: every process needs at least "
                         "one; write smaller shards (bitlab shards --shard-size) or use fewer processes")
    return max(0, min(workers, num_shards // world_size))


class ShardStream(IterableDataset):
    """Endless training stream of one rank over a shard set, split over the DataLoader's workers.

    `transform(samples, j, key)` makes the item of sample `j` of a loaded shard (all of it: a bad
    sample can be replaced by a neighbour), `key = (epoch, shard, j)` seeding its augmentation;
    `on_error(message)` the item standing for an unreadable shard.

    Resume: a DataLoader takes batches round-robin from its workers, so of the b = `micro_steps`
    x `start_step` batches consumed so far, reader role r (of W per rank) made batches r, r + W, ...
    A new DataLoader starts again at worker 0, which must therefore continue role b mod W (worker w
    plays role (b + w) mod W), skipping the samples that role already gave. `start_epoch` starts a
    fresh pass at that epoch instead (used when the layout changed).
    """

    def __init__(self, index: ShardIndex, transform: Callable[[list[Sample], int, tuple[int, int, int]], Any], *,
                 seed: int, rank: int = 0, world_size: int = 1, workers: int = 0, micro_batch: int = 1,
                 micro_steps: int = 1, start_step: int = 0, start_epoch: int = 0,
                 on_error: Callable[[str], Any] | None = None) -> None:
        self.index, self.transform, self.seed = index, transform, seed
        self.rank, self.world_size, self.workers = rank, world_size, max(workers, 1)
        self.micro_batch, self.micro_steps = micro_batch, micro_steps
        self.start_step, self.start_epoch, self.on_error = start_step, start_epoch, on_error
        self.readers = world_size * self.workers
        if len(index.shards) < self.readers:
            raise ShardError(f"{index.root}: {len(index.shards)} shards for {self.readers} readers")

    def shards_of(self, reader: int, epoch: int) -> np.ndarray:
        """Reader `reader`'s shards in epoch `epoch`: every R-th of a seeded shard permutation."""
        order = np.random.default_rng((self.seed, _SHARD_ORDER, epoch)).permutation(len(self.index.shards))
        return order[reader::self.readers]

    def role(self, worker: int) -> int:
        """The reader role (0..W-1) DataLoader worker `worker` plays after `start_step` steps."""
        return (self.start_step * self.micro_steps + worker) % self.workers

    def consumed(self, role: int) -> int:
        """Samples reader role `role` contributed to the first `start_step` steps."""
        batches = self.start_step * self.micro_steps
        mine = (batches - role + self.workers - 1) // self.workers if batches > role else 0
        return mine * self.micro_batch

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        role = self.role(info.id if info is not None else 0)
        reader = self.rank * self.workers + role
        skip, epoch = self.consumed(role), self.start_epoch
        while True:
            for s in self.shards_of(reader, epoch):
                shard = self.index.shards[s]
                if skip >= shard.count:
                    skip -= shard.count
                    continue
                try:
                    samples = read_shard(self.index.path(s), shard.count)
                except ShardError as e:
                    if self.on_error is None:
                        raise
                    yield self.on_error(str(e))
                    skip = 0
                    continue
                order = np.random.default_rng((self.seed, _SAMPLE_ORDER, epoch, int(s))).permutation(len(samples))
                for j in order[skip:]:
                    yield self.transform(samples, int(j), (epoch, int(s), int(j)))
                skip = 0
            epoch += 1


class ShardPass(IterableDataset):
    """One pass over this rank's share of the shards (every world_size-th from `rank`), split
    over the DataLoader's workers, in file order: for evaluation (every sample exactly once over
    all ranks and workers). `transform(sample)` makes the item; `on_error(message)` the item for
    an unreadable shard."""

    def __init__(self, index: ShardIndex, transform: Callable[[Sample], Any], *, rank: int = 0, world_size: int = 1,
                 on_error: Callable[[str], Any] | None = None) -> None:
        self.index, self.transform, self.on_error = index, transform, on_error
        self.mine = list(range(rank, len(index.shards), world_size))

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        shards = self.mine if info is None else self.mine[info.id::info.num_workers]
        for s in shards:
            try:
                for sample in iter_shard(self.index.path(s)):
                    yield self.transform(sample)
            except ShardError as e:
                if self.on_error is None:
                    raise
                yield self.on_error(str(e))


# ----------------------------------------------------------------------------- writing
def _label_lists(images: ImageSet | MultiLabelSet) -> list[list[int]]:
    if isinstance(images, MultiLabelSet):
        return [x.tolist() for x in images.labels]
    return [[int(x)] for x in images.labels]


def check_shard_limits(shard_size: int, max_bytes: int | None) -> None:
    """Refuse shard limits that would make no shards or one sample per shard, naming the setting."""
    if shard_size <= 0:
        raise ConfigError("shard_size", f"must be positive, got {shard_size}")
    if max_bytes is not None and max_bytes <= 0:
        raise ConfigError("max_bytes", f"must be positive, got {max_bytes}")


def plan_shards(sizes: Sequence[int], order: Sequence[int], shard_size: int, max_bytes: int | None) -> list[list[int]]:
    """Split `order` into shards of at most `shard_size` samples and (if set) `max_bytes` bytes
    (a single larger file gets a shard of its own)."""
    check_shard_limits(shard_size, max_bytes)
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        size = sizes[i] + 3 * 512  # + tar headers of the image, label and json members
        if current and (len(current) >= shard_size or (max_bytes and used + size > max_bytes)):
            groups.append(current)
            current, used = [], 0
        current.append(int(i))
        used += size
    if current:
        groups.append(current)
    return groups


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata: the same input gives byte-identical shards (and sha256s).
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, _io.BytesIO(data))


def _member_names(path: Path) -> list[str] | None:
    try:
        with tarfile.open(path, mode="r|*") as tar:
            return [m.name for m in tar]
    except (tarfile.TarError, OSError, EOFError):
        return None


def _map_shards(fn: Callable[[_T], _R], items: Sequence[_T], *, workers: int, desc: str,
                progress: bool) -> list[_R]:
    """`fn` over `items` (one per shard) in `workers` threads, results in order. The first error
    cancels the shards not yet started, rather than reporting it after working through them all."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(
            total=len(items), desc=desc, unit="shard", disable=not progress) as bar:
        results = []
        try:
            for result in pool.map(fn, items):
                results.append(result)
                bar.update(1)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def _source_sizes(images: ImageSet | MultiLabelSet) -> list[int]:
    """Each image file's size in bytes (what `plan_shards` packs by), its type checked first."""
    sizes = []
    for p in images.paths:
        _image_ext(Path(p))
        try:
            sizes.append(os.stat(p).st_size)
        except OSError as e:
            raise BitlabError(f"{p}: cannot read image file ({e.strerror or e})") from None
    return sizes


def _checked_image(src: Path, source: str, skip_bad: bool) -> bytes | None:
    """The file's bytes, decoded as training will decode them so that a bad file is named here
    rather than as shard.tar:key when pre-training reaches it (None: it does not decode, and
    `skip_bad` leaves it out). Measured: 1.3 ms per 500x375 JPEG (48 KB) on one core, over 300
    images; the shard writers decode in parallel (OpenCV releases the GIL)."""
    try:
        data = src.read_bytes()
    except OSError as e:
        raise BitlabError(f"{src}: cannot read image file ({e.strerror or e})") from None
    try:
        decode_image_bytes(data, str(src))
    except BadImageError as e:
        if not skip_bad:
            raise BadImageError(f"{e} (in {source}; --skip-bad-images leaves such images out)") from None
        log.warning("skipped: %s", e)
        return None
    return data


def _write_shard(path: Path, members: list[tuple[str, Path, list[int]]], *, multi: bool, common: Path,
                 source: str, skip_bad: bool) -> list[tuple[str, list[int]]]:
    """Write the tar shard of `members` (key, image file, labels) to `path` atomically, unless it
    holds exactly those members already (a resumed write); returns the (file, labels) left out."""
    expected = []
    for key, src, _ in members:
        expected += [f"{key}.{_image_ext(src)}"] + ([] if multi else [f"{key}.cls"]) + [f"{key}.json"]
    if path.is_file() and _member_names(path) == expected:
        return []
    skipped = []
    with fileio.atomic_write(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, src, labels in members:
            if (data := _checked_image(src, source, skip_bad)) is None:
                skipped.append((str(src), labels))
                continue
            _member(tar, f"{key}.{_image_ext(src)}", data)
            if not multi:
                _member(tar, f"{key}.cls", str(labels[0]).encode())
            rel = os.path.relpath(os.path.abspath(src), common)
            _member(tar, f"{key}.json", json.dumps({"labels": labels, "path": rel}).encode())
    return skipped


def write_shards(images: ImageSet | MultiLabelSet, out: str | os.PathLike, *, shard_size: int = SHARD_SIZE,
                 max_bytes: int | None = None, shuffle: bool = True, seed: int = 0, prefix: str = "shard",
                 workers: int = 4, progress: bool = True, skip_bad: bool = False) -> ShardIndex:
    """Pack `images` (single- or multi-label) into tar shards under `out` and write `out/shards.json`.

    Resumable: shards are written to a temp file and renamed, the index last; a rerun keeps complete
    shards (same members). The order is a seeded permutation (`shuffle`); every file must decode (the
    error names it), or with `skip_bad` is left out (listed in the index's `skipped`)."""
    check_shard_limits(shard_size, max_bytes)
    out, multi, labels, n = Path(out), images.multi_label, _label_lists(images), len(images)
    if n == 0:
        raise BitlabError(f"{images.source}: no images to write")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    groups = plan_shards(_source_sizes(images), order, shard_size, max_bytes)
    common = Path(os.path.commonpath([os.path.abspath(p) for p in images.paths]))
    if n == 1:
        common = common.parent
    width, position = max(9, len(str(n))), {int(i): k for k, i in enumerate(order)}
    with fileio.lock_folder(out, "shards"):  # one writer per shard set
        if (out / INDEX).exists():
            os.unlink(out / INDEX)  # the index is rewritten last: without it, the folder is not a shard set

        def write_one(k: int) -> tuple[ShardInfo, list[tuple[str, list[int]]]]:
            path = out / f"{prefix}-{k:06d}.tar"
            members = [(f"{position[i]:0{width}d}", Path(images.paths[i]), labels[i]) for i in groups[k]]
            skipped = _write_shard(path, members, multi=multi, common=common, source=images.source, skip_bad=skip_bad)
            return ShardInfo(path.name, len(members) - len(skipped), path.stat().st_size, fileio.sha256_file(path)), skipped

        results = _map_shards(write_one, range(len(groups)), workers=workers, desc="shards", progress=progress)
        infos, skipped = [info for info, _ in results], [s for _, left_out in results for s in left_out]
        if len(skipped) == n:
            raise BitlabError(f"{images.source}: none of the {n} images decodes")
        planned = {i.name for i in infos}
        if stale := sorted(p.name for p in out.glob(f"{prefix}-*.tar") if p.name not in planned):
            log.warning("%s: %d shard file(s) from an earlier write are not part of this set (e.g. %s)", out,
                        len(stale), stale[0])
        counts = np.zeros(len(images.classes), np.int64)
        for lab in labels:
            counts[lab] += 1
        for _, lab in skipped:
            counts[lab] -= 1
        index = ShardIndex(out, infos, list(images.classes), multi, images.source, seed if shuffle else None,
                           counts.tolist(), sorted(src for src, _ in skipped))
        fileio.write_json(out / INDEX, index.to_dict())
    log.info("%s: %d samples in %d shards (%.1f MB)", out, index.num_samples, len(infos),
             sum(i.bytes for i in infos) / 1e6)
    return index


def _image_ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    if ext not in IMAGE_FIELDS:
        raise BitlabError(f"{path}: unsupported image type {path.suffix or '(no extension)'!r} "
                          f"(shards hold .{', .'.join(IMAGE_FIELDS)})")
    return ext


def write_source(data: str | os.PathLike, out: str | os.PathLike, *, split: str | None = None,
                 label_sep: str | None = None, classes: str | os.PathLike | None = None,
                 **kwargs: Any) -> dict[str, ShardIndex]:
    """`bitlab shards`: any labelled source (ImageFolder tree, CSV, multi-label CSV / JSON lines)
    to shard sets. A source with splits (train/, val/; a split column) gives `out/<split>/` per
    split (or only `split`); a source without gives `out/` itself. `kwargs` go to `write_shards`."""
    splits = load_labelled(data, label_sep=label_sep, classes=read_classes(classes) if classes else None)
    if split is not None:
        if split not in splits:
            raise BitlabError(f"{data}: no split {split!r} (found: {', '.join(sorted(splits))})")
        targets = {split: (splits[split], Path(out))}
    elif list(splits) == ["all"]:
        targets = {"all": (splits["all"], Path(out))}
    else:
        targets = {name: (s, Path(out) / name) for name, s in sorted(splits.items())}
    with fileio.lock_folder(out, "shards"):  # one writer for the whole set (and each split's folder)
        return {name: write_shards(s, dest, **kwargs) for name, (s, dest) in targets.items()}


# ----------------------------------------------------------------------------- indexing foreign shards
def index_shards(root: str | os.PathLike, *, pattern: str = "*.tar", classes: Sequence[str] | None = None,
                 multi_label: bool = False, workers: int = 4, progress: bool = True) -> ShardIndex:
    """`bitlab shards-index`: the WebDataset tars matching `pattern` in `root` (written by another
    tool) as a shard set (`root/shards.json`). Each tar is read once, in name order: samples counted
    and checked (one image, labels in range: one unless `multi_label`), sha256 taken on the way.
    `classes` names the indices (default "0" .. the largest label). An error names the sample."""
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"{root}: no such folder")
    with fileio.lock_folder(root, "shards-index"):  # no writer may change the tars while they are read
        return _index_shards(root, pattern, classes, multi_label, workers, progress)


def _index_shards(root: Path, pattern: str, classes: Sequence[str] | None, multi_label: bool, workers: int,
                  progress: bool) -> ShardIndex:
    if (root / INDEX).exists():
        # Re-indexing would replace the class names (and a writer's source, seed, skipped list).
        raise ShardError(f"{root / INDEX}: already a shard set (delete it to index the tars again)")
    if Path(pattern).name != pattern:
        raise ShardError(f"--pattern {pattern!r}: a file name pattern in {root}, not a path")
    paths = sorted(p for p in root.glob(pattern) if p.is_file() and p.name != fileio.LOCK_FILE)
    if not paths:
        raise ShardError(f"{root}: no files match {pattern!r}")
    limit = None if classes is None else len(classes)

    def scan(path: Path) -> tuple[ShardInfo, Counter[int]]:
        digest, counts, keys = hashlib.sha256(), Counter(), set()
        for sample in iter_shard(path, digest):
            if sample.key in keys:
                raise ShardError(f"{sample.name}: a second sample with this key (its members are not consecutive)")
            keys.add(sample.key)
            images = [ext for ext in IMAGE_FIELDS if ext in sample.fields]
            if len(images) != 1:
                raise ShardError(f"{sample.name}: {len(images)} image members, a sample needs exactly one "
                                 f"(found .{', .'.join(sorted(sample.fields))})")
            labels = sample.labels()
            if not multi_label and len(labels) != 1:
                raise ShardError(f"{sample.name}: {len(labels)} labels {labels} in a single-label set "
                                 "(--multi-label for several per image)")
            for label in labels:
                if label < 0 or (limit is not None and label >= limit):
                    raise ShardError(f"{sample.name}: label {label} out of range " + (
                        "(class indices are 0 or more)" if limit is None else f"for {limit} classes (0..{limit - 1})"))
            counts.update(set(labels))  # an image counts once per class, as the writer counts
        if not keys:
            # A reader dealt only empty shards would never yield: the writer makes none either.
            raise ShardError(f"{path}: no samples")
        return ShardInfo(path.name, len(keys), path.stat().st_size, digest.hexdigest()), counts

    results = _map_shards(scan, paths, workers=workers, desc="index", progress=progress)
    total: Counter[int] = Counter()
    for _, counts in results:
        total.update(counts)
    if classes is None:
        if not total:
            raise ShardError(f"{root}: no sample has a label; name the classes (--classes or --num-classes)")
        classes = [str(i) for i in range(max(total) + 1)]
    index = ShardIndex(root, [info for info, _ in results], list(classes), multi_label, str(root),
                       label_counts=[total[i] for i in range(len(classes))])
    fileio.write_json(root / INDEX, index.to_dict())
    log.info("%s: indexed %d samples in %d shards", root, index.num_samples, len(index.shards))
    return index
