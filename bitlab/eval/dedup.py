"""Near-duplicates between an upstream (training) set and a downstream (test) set: paper Appendix B,
Table 6 and Fig. 9.

Every image becomes one embedding, at the same pre-processing as evaluation (the model's reference
view, `bitlab.data.transforms.eval_image`):

- `model:NAME`: a bitlab model's pre-logits (global-pooled features before the classifier),
  L2-normalised, compared by cosine similarity. The default is the real offline ImageNet model
  `efficientnet_lite0.offline_in1k` (1280-d); a BiT model with `weights=` works the same way.
- `phash`: a 64-bit DCT perceptual hash, compared by Hamming distance. Far cheaper (no network),
  catches exact, resized and re-encoded copies, but not crops reliably (cropping shifts every
  frequency: a 6 % crop moves 10-24 of the 64 bits, as many as separate unrelated photos).

Search. The downstream set (~10k test images) is embedded once and kept; the upstream set (up to
~1M training images) is streamed in blocks of `block_size` images: each block is embedded (or
read from the embedding cache), multiplied against the queries in chunks of `query_block_size`,
merged into a running top-k per query, and dropped. Peak memory is therefore
`queries + block + query_block_size x block_size` scores, whatever the upstream size; the full
distance matrix never exists. Hashes are stored as +-1 vectors so that the same matmul gives
Hamming distances: hamming = (bits - dot) / 2.

Thresholds (`DEFAULT_THRESHOLDS`), and how they were chosen. On real photos (scikit-image and
matplotlib sample photos, the acceptance test's fixture) we planted near-duplicates (resized to
half size, re-encoded as JPEG at quality 30, 6 % cropped from every side) and measured, with
`efficientnet_lite0.offline_in1k` at its 224 px evaluation view (timm's: bicubic, crop 0.875):

    planted copy vs its original, cosine   0.74 (JPEG q30 of a grey clock) ... 1.00
    unrelated photos, highest cosine       0.51 (moon vs. a microscopy cell)

so `model:*` pairs with cosine similarity >= 0.70 count as duplicates: above every unrelated pair
by a wide margin, and as close to the planted floor as keeps all of them, because a lower value
adds false positives between similar photos on real data (two stereo views of one motorcycle
reach 0.90; tiny 25 px faces of different people 0.86 to their nearest). The acceptance test
checks both margins. For `phash`, unrelated photos differ in >= 20 of 64 bits and resized / JPEG
copies in <= 6, so <= 10 bits is a duplicate (the customary pHash cut-off).
Thresholds depend on the data: inspect `nearest.csv` (every query's closest match) and the
gallery around the threshold before trusting counts on a new dataset.

Outputs of `run_dedup` in `out/`: `config.json`, `duplicates.csv` (query, match, rank,
similarity, distance), `nearest.csv` (the closest match of every query), `summary.json` (the
Table 6 counts: Full / Dedup accuracy when predictions are given, and Dups). `bitlab dedup` adds
`duplicates.png` / `.pdf`, the Fig. 9 gallery that `bitlab.report.save_duplicates_gallery` draws
from the returned `DedupResult`.
Embeddings are cached per block under `cache/`, so an interrupted run resumes where it stopped
and a new threshold or another downstream set against the same upstream costs only the search.

`plant_near_duplicates` writes the study's edited copies of your own photos, to check a threshold
on your data; `planted_demo` builds the offline example sets the `duplicates` notebook starts from.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bitlab import fileio
from bitlab.data.loader import EvalFiles, default_workers, inference_workers, make_loader
from bitlab.data.transforms import (BadImageError, DataConfig, decode_image, eval_image, normalize, resize,
                                    to_chw_tensor)
from bitlab.device import parse_device
from bitlab.errors import BitlabError, ConfigError
from bitlab.models import zoo

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
DEFAULT_EMBEDDING = f"model:{zoo.OFFLINE_IMAGENET_MODEL}"
# See the module docstring for how these were measured.
DEFAULT_THRESHOLDS = {"cosine": 0.70, "hamming": 10}
DOWNSTREAM_CHUNK = 4096  # test images per cache file
# pHash (Zauner 2010): a 32x32 grey thumbnail, its DCT, and the 8x8 lowest frequencies compared
# with their median -> 64 bits that survive resizing and re-compression.
PHASH_THUMB = 32
PHASH_FREQS = 8


# ----------------------------------------------------------------------------- image sets
@dataclass
class ImageFiles:
    """Image files and the names tables show for them (relative to the folder or as listed)."""

    source: str
    paths: list[Path]
    names: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def list_images(source: str | os.PathLike) -> ImageFiles:
    """A folder (searched recursively, sorted) or a text file listing one image path per line
    (relative paths are relative to the list's folder; blank lines and `#` comments skipped)."""
    src = Path(source)
    if src.is_dir():
        paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(src).parts))
        names = [p.relative_to(src).as_posix() for p in paths]
        if not paths:
            raise BitlabError(f"{src}: no images in this folder (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    elif src.is_file():
        names = []
        for line in src.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                names.append(line)
        paths = [p if p.is_absolute() else src.parent / p for p in map(Path, names)]
        if not paths:
            raise BitlabError(f"{src}: the image list is empty")
        for name, p in zip(names, paths):
            if not p.is_file():
                raise BitlabError(f"{src}: listed image {name!r} does not exist ({p})")
    else:
        raise BitlabError(f"{src}: no such folder or image list")
    return ImageFiles(str(src), paths, names)


# ----------------------------------------------------------------------------- embeddings
def model_view(img: np.ndarray, cfg: DataConfig) -> torch.Tensor:
    """The model's evaluation view of an RGB image, uint8 CHW (normalised later, per batch)."""
    return to_chw_tensor(eval_image(img, cfg))


def phash_bits(img: np.ndarray) -> np.ndarray:
    """64-bit DCT perceptual hash of an RGB uint8 image, as a bool vector."""
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    coeffs = cv2.dct(resize(grey, PHASH_THUMB, PHASH_THUMB).astype(np.float32))[:PHASH_FREQS, :PHASH_FREQS].ravel()
    return coeffs > np.median(coeffs)


def phash_view(img: np.ndarray) -> torch.Tensor:
    """The hash as an int8 +-1 vector: the inner product of two such vectors is bits - 2 * hamming."""
    return torch.from_numpy(phash_bits(img).astype(np.int8) * 2 - 1)


def pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled features before the classifier, (N, D): ResNetV2 and timm models alike."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    raise BitlabError(f"{type(model).__name__} has no forward_features/forward_head: cannot take its pre-logits")


class Embedding:
    """How images become vectors: a per-image `view` (runs in loader workers, must pickle) and a
    per-batch `embed` (on the device). Subclasses set `spec`, `metric`."""

    spec: str
    metric: str  # "cosine" (higher = closer) or "hamming" (lower = closer)
    view: Callable[[np.ndarray], torch.Tensor]

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cache_key(self) -> str:
        return self.spec

    def dot_threshold(self, threshold: float, dim: int) -> float:
        """The inner-product value a pair must reach to be within `threshold`."""
        return threshold if self.metric == "cosine" else dim - 2 * threshold

    def similarity_distance(self, dots: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Inner products -> (similarity in [-1, 1] or [0, 1], distance: 1 - cosine or Hamming bits)."""
        if self.metric == "cosine":
            return dots, 1.0 - dots
        hamming = np.rint((dim - dots) / 2)
        return 1.0 - hamming / dim, hamming


class ModelEmbedding(Embedding):
    """A model's L2-normalised pre-logits, compared by cosine similarity."""

    metric = "cosine"

    def __init__(self, name: str, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 random_init: bool = False) -> None:
        """`weights`: a file; else the weights `name` stands for (`create_model`), or random ones (seed 0)
        with `random_init`."""
        from bitlab.models import create_model, prepare_for_inference

        if random_init and weights is not None:
            raise BitlabError(f"--random-init asks for random weights, but --weights {weights} gives a file: "
                              "give one or the other")
        self.spec = f"model:{name}"
        self.weights = None if weights is None else Path(weights)
        self.device = torch.device(device)
        if random_init:
            torch.manual_seed(0)  # the same random weights every run: cached embeddings stay valid
        pretrained = False if random_init else self.weights if self.weights is not None else True
        self.model = prepare_for_inference(create_model(name, pretrained=pretrained), self.device, fuse=True)
        # Only now: an unknown name must fail before anything is said about its weights.
        if random_init:
            log.warning("%s with random weights (--random-init): its embeddings find no real duplicates", name)
        self.cfg: DataConfig = self.model.data_config
        self.view = partial(model_view, cfg=self.cfg)
        # The weights' digest, not their path: a retrained checkpoint must not reuse old embeddings.
        digest = (fileio.sha256_file(self.weights) if self.weights is not None else "random-seed0" if random_init
                  else "pretrained")
        self._key = f"{self.spec}|{digest}|{json.dumps(self.cfg.to_dict(), sort_keys=True)}"

    def cache_key(self) -> str:
        return self._key

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        x = normalize(batch.to(self.device, non_blocking=True), self.cfg.mean, self.cfg.std)
        feats = pre_logits(self.model, x)
        if feats.ndim != 2:
            raise BitlabError(f"{self.spec}: pre-logits have shape {tuple(feats.shape)}, expected (N, D) "
                              "(a model with global pooling before its classifier)")
        return F.normalize(feats.float(), dim=1)


class PHashEmbedding(Embedding):
    """64-bit DCT perceptual hash, compared by Hamming distance."""

    spec = "phash"
    metric = "hamming"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.view = phash_view

    def cache_key(self) -> str:
        return f"phash|{PHASH_THUMB}|{PHASH_FREQS}"

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.to(self.device).float()


def make_embedding(spec: str, weights: str | os.PathLike | None = None,
                   device: str | torch.device = "cpu", random_init: bool = False) -> Embedding:
    """`model:NAME` (any `create_model` name; `ModelEmbedding`) or `phash`."""
    if spec == "phash":
        if weights is not None:
            raise ConfigError("weights", "{setting} applies to model embeddings, not phash")
        if random_init:
            raise ConfigError("random_init", "{setting} applies to model embeddings, not phash")
        return PHashEmbedding(device)
    if spec.startswith("model:") and spec[len("model:"):]:
        return ModelEmbedding(spec[len("model:"):], weights, device, random_init)
    raise BitlabError(f"unknown embedding {spec!r}: use model:NAME (e.g. {DEFAULT_EMBEDDING}) or phash")


def embed_files(embedding: Embedding, paths: Sequence[Path], *, batch_size: int = 64, workers: int = 0,
                progress: bool | tqdm = True, desc: str = "embed") -> torch.Tensor:
    """Embeddings of image files (N, D) float32 on the CPU, in file order. `progress` may be a
    tqdm bar to advance (by images) instead of one of its own."""
    loader = make_loader(EvalFiles(list(paths), embedding.view), batch_size,
                         workers=workers if len(paths) > batch_size else 0, pin_memory=embedding.device.type == "cuda")
    bar = progress if isinstance(progress, tqdm) else tqdm(
        total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
    out = []
    try:
        for batch in loader:
            if batch.errors:  # the loader's policy: a bad file stops the search, named
                raise BadImageError(batch.errors[0])
            out.append(embedding.embed(batch.images).cpu())
            bar.update(len(batch.images))
    finally:
        if bar is not progress:
            bar.close()
    return torch.cat(out)


def load_block(file: str | os.PathLike) -> torch.Tensor:
    """A cached embedding block, memory-mapped: its pages come from the page cache and go with
    the mapping, so streaming a million images through does not grow the heap (copy-on-write
    keeps the tensor writable without touching the file)."""
    return torch.from_numpy(np.load(file, mmap_mode="c", allow_pickle=False))


class EmbeddingCache:
    """Embeddings of file blocks on disk, keyed by the embedding and each file's path, size and
    mtime: a changed file or model recomputes its block, anything else is read back."""

    def __init__(self, root: str | os.PathLike, embedding: Embedding) -> None:
        self.root = Path(root)
        self.embedding = embedding

    def _file(self, paths: Sequence[Path]) -> Path:
        h = hashlib.sha256(self.embedding.cache_key().encode())
        for p in paths:
            st = p.stat()
            h.update(f"\n{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.embedding.spec)
        return self.root / f"{slug}-{h.hexdigest()[:24]}.npy"

    def get(self, paths: Sequence[Path], **embed_kwargs) -> torch.Tensor:
        file = self._file(paths)
        if file.exists():
            try:
                emb = load_block(file)
                if emb.ndim == 2 and emb.shape[0] == len(paths):
                    return emb
                log.warning("%s: holds %s embeddings for %d files; recomputing", file, tuple(emb.shape), len(paths))
            except (OSError, ValueError) as e:
                log.warning("%s: unreadable cache file (%s); recomputing", file, e)
        emb = embed_files(self.embedding, paths, **embed_kwargs)
        with fileio.atomic_write(file) as f:
            np.save(f, emb.numpy(), allow_pickle=False)
        return emb


# ----------------------------------------------------------------------------- search
class TopK:
    """The k best inner products of each query seen so far, merged block by block."""

    def __init__(self, n_queries: int, k: int, device: str | torch.device = "cpu") -> None:
        if k < 1:
            raise BitlabError(f"topk must be >= 1 (got {k})")
        self.k = k
        self.values = torch.full((n_queries, k), -math.inf, device=device)
        self.indices = torch.full((n_queries, k), -1, dtype=torch.long, device=device)

    def update(self, rows: slice, scores: torch.Tensor, offset: int) -> None:
        """Merge `scores` (queries[rows] x upstream[offset : offset + n]) into the running top-k."""
        top = scores.topk(min(self.k, scores.shape[1]), dim=1)
        values = torch.cat([self.values[rows], top.values], dim=1)
        indices = torch.cat([self.indices[rows], top.indices + offset], dim=1)
        best = values.topk(self.k, dim=1)
        self.values[rows] = best.values
        self.indices[rows] = indices.gather(1, best.indices)


def search_blocks(queries: torch.Tensor, blocks: Iterable[tuple[int, torch.Tensor]], *, k: int = 5,
                  query_block_size: int = 1024, device: str | torch.device | None = None) -> TopK:
    """Top-k inner products of every query over upstream blocks `(offset, embeddings)`.

    Memory: the queries, one block and a `query_block_size x len(block)` score matrix at a time.
    """
    if queries.ndim != 2:
        raise BitlabError(f"queries must be a (N, D) matrix, got shape {tuple(queries.shape)}")
    device = torch.device(device) if device is not None else queries.device
    queries = queries.to(device, torch.float32)
    top = TopK(len(queries), k, device)
    # One score buffer for the whole search, grown to the largest block: a fresh multi-MB matrix
    # per block would cost page faults and, on CPU, fragment the C heap as blocks stream by.
    buf = torch.empty(0, device=device)
    for offset, block in blocks:
        if block.ndim != 2 or block.shape[1] != queries.shape[1]:
            raise BitlabError(f"embedding dims differ: downstream queries have {queries.shape[1]} dims, "
                              f"the upstream block at image {offset} has shape {tuple(block.shape)} "
                              "(were both embedded with the same model?)")
        block = block.to(device, torch.float32)
        for q0 in range(0, len(queries), query_block_size):
            rows = slice(q0, q0 + query_block_size)
            q = queries[rows]
            if buf.numel() < len(q) * len(block):
                buf = torch.empty(len(q) * len(block), device=device)
            scores = torch.mm(q, block.T, out=buf[:len(q) * len(block)].view(len(q), len(block)))
            top.update(rows, scores, offset)
    return top


def split_blocks(embeddings: torch.Tensor | np.ndarray, block_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """An in-memory upstream matrix as `(offset, block)` pairs for `search_blocks`."""
    t = torch.as_tensor(embeddings)
    for start in range(0, len(t), block_size):
        yield start, t[start:start + block_size]


def search(queries: torch.Tensor | np.ndarray, upstream: torch.Tensor | np.ndarray, *, k: int = 5,
           block_size: int = 8192, query_block_size: int = 1024,
           device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k upstream inner products per query: `(values, indices)`, each (Q, k), best first."""
    top = search_blocks(torch.as_tensor(queries), split_blocks(upstream, block_size), k=k,
                        query_block_size=query_block_size, device=device)
    return top.values.cpu().numpy(), top.indices.cpu().numpy()


# ----------------------------------------------------------------------------- the command
@dataclass
class DedupConfig:
    """`bitlab dedup`: find downstream test images that have near-duplicates upstream."""

    upstream: str  # folder or image list (the training set)
    downstream: str  # folder or image list (the test set)
    out: str
    embedding: str = DEFAULT_EMBEDDING  # model:NAME or phash
    weights: str | None = None  # checkpoint for model:NAME (BiT npz, bitlab or timm file); None: the name's own
    random_init: bool = False  # model:NAME with random weights (seed 0)
    threshold: float | None = None  # None: DEFAULT_THRESHOLDS[metric]
    topk: int = 5  # matches kept per query; a query is a duplicate when its best one passes
    block_size: int = 4096  # upstream images embedded, searched and dropped at a time
    query_block_size: int = 1024  # queries per matmul: scores use query_block_size x block_size floats
    batch_size: int = 64
    workers: int | None = None  # decoding processes (None: a model: `loader.inference_workers`; phash: all)
    device: str | None = None  # None: cuda if available
    predictions: str | None = None  # CSV with `image` and `correct` columns -> Table 6 accuracies
    correct_column: str = "correct"  # the predictions column holding per-image correctness
    cache: str | None = None  # embedding cache folder (None: OUT/cache); share it between runs
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class DedupResult:
    summary: dict
    duplicates: list[dict]  # query, match, rank, similarity, distance (sorted by query, rank)
    nearest: list[dict]  # one row per query: its best match
    out: Path
    upstream: ImageFiles | None = None
    downstream: ImageFiles | None = None

    def pairs(self) -> list[tuple[Path, Path, float]]:
        """(test image, its best upstream match, similarity) of every test image with a duplicate:
        what the Fig. 9 gallery (`bitlab.report.fig_duplicates`) draws."""
        down = dict(zip(self.downstream.names, self.downstream.paths))
        up = dict(zip(self.upstream.names, self.upstream.paths))
        return [(down[r["query"]], up[r["match"]], r["similarity"]) for r in self.duplicates if r["rank"] == 1]


# What a run writes in `out/`: removed before its config.json replaces the old one, so that an
# interrupted rerun never leaves the new settings beside the old counts.
RESULT_FILES = ("summary.json", "duplicates.csv", "nearest.csv", "duplicates.png", "duplicates.pdf")


def run_dedup(cfg: DedupConfig) -> DedupResult:
    """Embed, search, threshold and count; writes the files listed in the module docstring (the
    gallery is drawn from the result: `bitlab.report.save_duplicates_gallery`). `out` is locked
    meanwhile (`bitlab.fileio.lock_folder`: one dedup writes a folder at a time)."""
    with fileio.lock_folder(cfg.out, "dedup"):
        return _run_dedup(cfg)


def _run_dedup(cfg: DedupConfig) -> DedupResult:
    for field, least in (("topk", 1), ("block_size", 1), ("query_block_size", 1), ("batch_size", 1),
                         ("workers", 0)):
        value = getattr(cfg, field)
        if value is not None and value < least:
            raise BitlabError(f"--{field.replace('_', '-')} must be at least {least}, got {value}")
    device = parse_device(cfg.device)
    out = Path(cfg.out)
    downstream, upstream = list_images(cfg.downstream), list_images(cfg.upstream)
    embedding = make_embedding(cfg.embedding, cfg.weights, device, cfg.random_init)
    threshold = DEFAULT_THRESHOLDS[embedding.metric] if cfg.threshold is None else float(cfg.threshold)
    _check_threshold(embedding.metric, threshold)
    correct = read_predictions(cfg.predictions, downstream, cfg.correct_column) if cfg.predictions else None
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    fileio.write_json(out / "config.json", {**cfg.to_dict(), "threshold": threshold, "metric": embedding.metric})

    # phash is all decoding (its workers use every core); a model embedding shares the CPU with its model.
    workers = (cfg.workers if cfg.workers is not None else inference_workers(embedding.device)
               if isinstance(embedding, ModelEmbedding) else default_workers())
    cache = EmbeddingCache(cfg.cache or out / "cache", embedding)
    kw = dict(batch_size=cfg.batch_size, workers=workers, progress=cfg.progress)
    # The test set is embedded whole (it is the small side); cached in chunks so that a stopped
    # run keeps what it finished.
    chunk = max(cfg.block_size, DOWNSTREAM_CHUNK)
    queries = torch.cat([cache.get(downstream.paths[i:i + chunk], desc="embed downstream", **kw)
                         for i in range(0, len(downstream), chunk)])
    dim = queries.shape[1]
    log.info("%d downstream x %d upstream images, %s (%d dims), threshold %s",
             len(downstream), len(upstream), embedding.spec, dim, threshold)

    def upstream_blocks() -> Iterator[tuple[int, torch.Tensor]]:
        # One bar over all upstream images, advanced while a block is embedded and by a whole
        # block read from the cache: nested bars print cursor escapes ("[A") into logs.
        with tqdm(total=len(upstream), desc="embed + search upstream", unit="img", disable=not cfg.progress) as bar:
            for start in range(0, len(upstream), cfg.block_size):
                paths = upstream.paths[start:start + cfg.block_size]
                block = cache.get(paths, **dict(kw, progress=bar))
                bar.update(start + len(paths) - bar.n)
                yield start, block

    top = search_blocks(queries, upstream_blocks(), k=cfg.topk, query_block_size=cfg.query_block_size, device=device)
    dots, idx = top.values.cpu().numpy(), top.indices.cpu().numpy()
    sim, dist = embedding.similarity_distance(dots, dim)
    # Compare inner products (exact for hashes) rather than derived floats; eps absorbs float32
    # rounding of the cosine at exactly the threshold.
    passes = (dots >= embedding.dot_threshold(threshold, dim) - 1e-6) & (idx >= 0)

    def row(q: int, r: int) -> dict:
        return {"query": downstream.names[q], "match": upstream.names[idx[q, r]], "rank": r + 1,
                "similarity": round(float(sim[q, r]), 6), "distance": round(float(dist[q, r]), 6)}

    duplicates = [row(q, r) for q in range(len(downstream)) for r in range(idx.shape[1]) if passes[q, r]]
    nearest = [row(q, 0) for q in range(len(downstream))]
    is_dup = passes[:, 0]
    summary = {"embedding": embedding.spec, "metric": embedding.metric, "dims": dim, "threshold": threshold,
               "upstream_images": len(upstream), "downstream_images": len(downstream),
               "pairs_compared": len(upstream) * len(downstream), "duplicate_pairs": len(duplicates),
               **table6_counts(is_dup, correct)}
    _write_csv(out / "duplicates.csv", duplicates)
    _write_csv(out / "nearest.csv", nearest)
    fileio.write_json(out / "summary.json", summary)
    return DedupResult(summary, duplicates, nearest, out, upstream, downstream)


def _check_threshold(metric: str, threshold: float) -> None:
    if metric == "cosine" and not -1.0 <= threshold <= 1.0:
        raise ConfigError("threshold", f"{{setting}} {threshold} is a cosine similarity: it must lie in [-1, 1]")
    bits = PHASH_FREQS**2
    if metric == "hamming" and not 0 <= threshold <= bits:
        raise ConfigError("threshold", f"{{setting}} {threshold} is a Hamming distance between {bits}-bit hashes: "
                          f"it must lie in [0, {bits}]")


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with fileio.atomic_write(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["query", "match", "rank", "similarity", "distance"])
        w.writeheader()
        w.writerows(rows)


# ----------------------------------------------------------------------------- Table 6
_TRUE = {"1", "true", "t", "yes", "y", "1.0"}
_FALSE = {"0", "false", "f", "no", "n", "0.0"}


def read_predictions(path: str | os.PathLike, images: ImageFiles, column: str = "correct") -> np.ndarray:
    """Per-image correctness (bool, in `images` order) from a CSV with `image` and `correct` columns.

    `image` is the image's name as listed (path relative to the folder) or, when file names are
    unique, its bare file name. Every test image needs exactly one row, so that "Full" is the
    accuracy on the whole test set.
    """
    import csv

    path = Path(path)
    if not path.is_file():
        raise BitlabError(f"{path}: no such predictions file")
    by_name = {n: i for i, n in enumerate(images.names)}
    basenames = [Path(n).name for n in images.names]
    by_base = {b: i for i, b in enumerate(basenames)} if len(set(basenames)) == len(basenames) else {}
    correct = np.zeros(len(images), dtype=bool)
    seen = np.zeros(len(images), dtype=bool)
    reader = csv.DictReader(fileio.text_lines(path))
    missing = {"image", column} - set(reader.fieldnames or [])
    if missing:
        raise BitlabError(f"{path}: missing column(s) {', '.join(sorted(missing))} "
                          f"(has {', '.join(reader.fieldnames or []) or 'none'})")
    for line, rec in enumerate(reader, start=2):
        name = (rec["image"] or "").strip()
        i = by_name.get(name, by_base.get(Path(name).name))
        if i is None:
            raise BitlabError(f"{path}:{line}: image {name!r} is not in the downstream set {images.source}")
        if seen[i]:
            raise BitlabError(f"{path}:{line}: image {name!r} appears twice")
        value = (rec[column] or "").strip().lower()
        if value not in _TRUE | _FALSE:
            raise BitlabError(f"{path}:{line}: {column}={rec[column]!r} is not a boolean (1/0, true/false)")
        correct[i], seen[i] = value in _TRUE, True
    if not seen.all():
        absent = [images.names[i] for i in np.flatnonzero(~seen)[:3]]
        raise BitlabError(f"{path}: no prediction for {int((~seen).sum())} downstream image(s), "
                          f"e.g. {', '.join(absent)}")
    return correct


def table6_counts(is_dup: np.ndarray, correct: np.ndarray | None = None) -> dict:
    """Paper Table 6: accuracy on the full test set ("Full"), on the test set without its
    near-duplicates ("Dedup"), and the number of near-duplicates removed ("Dups")."""
    is_dup = np.asarray(is_dup, dtype=bool)
    counts = {"dups": int(is_dup.sum()), "full_images": int(is_dup.size), "dedup_images": int((~is_dup).sum())}
    if correct is not None:
        correct = np.asarray(correct, dtype=bool)
        counts["full"] = round(100.0 * correct.mean(), 4) if correct.size else None
        counts["dedup"] = round(100.0 * correct[~is_dup].mean(), 4) if (~is_dup).any() else None
    return counts


def table6(summaries: Mapping[tuple[str, str], Mapping]) -> "pd.DataFrame":
    """Paper Table 6's layout from `bitlab dedup` summaries keyed by (upstream, downstream) name: a
    row per downstream set, per upstream set the columns Full, Dedup (accuracy, %) and Dups; without
    predictions, Full and Dedup count images instead (columns `Full images`, `Dedup images`)."""
    import pandas as pd

    cells = {}
    for (up, down), s in summaries.items():
        if s.get("full") is not None:
            values = {"Full": s["full"], "Dedup": s["dedup"], "Dups": s["dups"]}
        else:
            values = {"Full images": s["full_images"], "Dedup images": s["dedup_images"], "Dups": s["dups"]}
        cells.setdefault(down, {}).update({(up, k): v for k, v in values.items()})
    table = pd.DataFrame.from_dict(cells, orient="index")
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["upstream", ""])
    table.index.name = "downstream"
    return table


# ----------------------------------------------------------------------------- planted near-duplicates
def _half(img: np.ndarray) -> np.ndarray:
    return resize(img, max(1, img.shape[1] // 2), max(1, img.shape[0] // 2))


def _crop(img: np.ndarray, frac: float = 0.06) -> np.ndarray:
    h, w = img.shape[:2]
    return np.ascontiguousarray(img[int(h * frac):h - int(h * frac), int(w * frac):w - int(w * frac)])


# The edits of the threshold study in the module docstring: (file suffix, edit, JPEG quality).
# Quality 30 is far below the 75-95 of everyday JPEGs; a 6 % cut from every side keeps 77 % of the pixels.
NEAR_DUPLICATE_EDITS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray], int | None]] = {
    "half": (".png", _half, None), "jpeg30": (".jpg", lambda img: img, 30), "crop": (".png", _crop, None)}
EDIT_NAMES = {"half": "half-size copy", "jpeg30": "JPEG quality-30 copy", "crop": "6 %-cropped copy"}


def write_image(path: str | os.PathLike, rgb: np.ndarray, jpeg_quality: int | None = None) -> Path:
    """An RGB uint8 image as PNG or JPEG (by suffix), written atomically."""
    path = Path(path)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if jpeg_quality else []
    ok, buf = cv2.imencode(path.suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise BitlabError(f"{path}: OpenCV cannot encode this image format")
    fileio.write_bytes(path, buf.tobytes())
    return path


def plant_near_duplicates(originals: Iterable[str | os.PathLike], out: str | os.PathLike,
                          edits: Sequence[str] = tuple(NEAR_DUPLICATE_EDITS)) -> dict[str, tuple[Path, str]]:
    """Write edited copies of each image file as `out/<stem>_<edit><suffix>`; returns copy file
    name -> (original path, edit). Put the copies in a test set beside your training set to check
    that a threshold finds them all (`nearest.csv` shows how close each came)."""
    if unknown := [e for e in edits if e not in NEAR_DUPLICATE_EDITS]:
        raise BitlabError(f"unknown edit {unknown[0]!r} (known: {', '.join(NEAR_DUPLICATE_EDITS)})")
    out = Path(out)
    planted = {}
    for original in map(Path, originals):
        img = decode_image(original)
        for name in edits:
            suffix, edit, quality = NEAR_DUPLICATE_EDITS[name]
            copy = write_image(out / f"{original.stem}_{name}{suffix}", edit(img), quality)
            if copy.name in planted:
                raise BitlabError(f"{original} and {planted[copy.name][0]}: two originals named {original.stem!r}")
            planted[copy.name] = (original, name)
    return planted


# Real photos inside the scikit-image wheel (CC0 / public domain, no download): the offline example
# of the `duplicates` notebook, the same kinds of photos as the threshold study above.
# The grey clock's JPEG copy is the hardest planted copy and moon vs. cell the closest unrelated pair.
DEMO_PLANTED = ("chelsea", "coffee", "rocket", "astronaut", "clock")
DEMO_UPSTREAM_ONLY = ("camera", "coins", "moon", "hubble_deep_field", "retina", "brick", "grass",
                      "immunohistochemistry")
DEMO_DOWNSTREAM_ONLY = ("gravel", "text", "cell", "page")
# A near-miss: the left view of scikit-image's stereo pair is a training image, the right view a test
# image. The same scene from a few centimetres aside is not a copy: when the search flags it, a
# reviewer marks the match red (Fig. 9's false positives).
DEMO_NEAR_MISS = ("motorcycle_left", "motorcycle_right")
# What each test photo shows as ILSVRC-2012 class indices (Table 6's right answers; copies inherit
# their original's): cat, coffee, rocket, clock and motorcycle photos; the astronaut, the page and the
# textures show no ILSVRC-2012 class, so a 1000-way model is never right on them.
DEMO_CLASSES = {"chelsea": (281, 282, 285), "coffee": (504, 967, 968), "rocket": (657, 744, 812),
                "clock": (409, 892), "motorcycle_right": (665, 670)}


@dataclass
class PlantedSets:
    """A training (upstream) and a test (downstream) folder with known near-duplicates."""

    upstream: Path
    downstream: Path
    truth: dict[str, str]  # downstream name -> upstream name of its original
    unrelated: list[str]  # downstream names with no counterpart upstream
    edits: dict[str, str] = dataclasses.field(default_factory=dict)  # downstream name -> edit (NEAR_DUPLICATE_EDITS)
    classes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # downstream name -> ILSVRC classes

    def is_true_match(self, query: str, match: str) -> bool:
        return self.truth.get(query) == match

    def kinds(self) -> dict[str, str]:
        """Every downstream name -> what it is ('half-size copy', ..., 'unrelated photo')."""
        return {**{q: EDIT_NAMES.get(self.edits.get(q, ""), "planted copy") for q in self.truth},
                **{q: "near-miss: another view" if Path(q).stem in DEMO_NEAR_MISS else "unrelated photo"
                   for q in self.unrelated}}

    def score(self, duplicates: Sequence[Mapping]) -> dict[str, list[str]]:
        """Test images whose best match passed the threshold (`run_dedup`'s duplicates, rank 1)
        against the truth: planted copies `found` with their original, `missed`, and `false`
        positives (a wrong match, or an unrelated photo flagged)."""
        best = {r["query"]: r["match"] for r in duplicates if int(r["rank"]) == 1}
        return {"found": sorted(q for q, m in best.items() if self.is_true_match(q, m)),
                "missed": sorted(q for q in self.truth if q not in best),
                "false": sorted(q for q, m in best.items() if not self.is_true_match(q, m))}


    def predictions(self, model: str, out: str | os.PathLike) -> Path:
        """`out` (a CSV: `image`, `correct`, `prediction`): `model`'s top-1 on every test image,
        right when it is one of the photo's `classes` (Table 6's Full / Dedup accuracy)."""
        import pandas as pd

        from bitlab.data import imagenet
        from bitlab.eval.predict import predict_files
        from bitlab.models import create_model

        names = sorted(p.name for p in self.downstream.iterdir() if p.is_file())
        top = predict_files(create_model(model).eval(), [self.downstream / n for n in names], topk=1,
                            progress=False).indices[:, 0]
        rows = [{"image": n, "correct": int(int(t) in self.classes.get(n, ())), "prediction": imagenet.names()[int(t)]}
                for n, t in zip(names, top)]
        with fileio.atomic_write(out, "w", newline="", encoding="utf-8") as f:
            pd.DataFrame(rows).to_csv(f, index=False)
        return Path(out)


def planted_demo(out: str | os.PathLike) -> PlantedSets:
    """`out/upstream/` (originals + unrelated photos + a near-miss's twin) and `out/downstream/`
    (half-size, JPEG-30 and 6 %-cropped copies of the originals + other unrelated photos + the
    near-miss) from scikit-image's photos."""
    try:
        import skimage.data
    except ImportError:
        raise BitlabError("the planted example needs scikit-image's photos: pip install 'bitlab[notebooks]'") from None

    def photo(name: str) -> np.ndarray:
        img = skimage.data.stereo_motorcycle()[DEMO_NEAR_MISS.index(name)] if name in DEMO_NEAR_MISS else \
            getattr(skimage.data, name)()
        return np.ascontiguousarray(np.stack([img] * 3, axis=-1) if img.ndim == 2 else img[..., :3])

    out = Path(out)
    up, down = out / "upstream", out / "downstream"
    originals = [write_image(up / f"{n}.png", photo(n)) for n in DEMO_PLANTED]
    for n in (*DEMO_UPSTREAM_ONLY, DEMO_NEAR_MISS[0]):
        write_image(up / f"{n}.png", photo(n))
    unrelated = [write_image(down / f"{n}.png", photo(n)).name for n in (*DEMO_DOWNSTREAM_ONLY, DEMO_NEAR_MISS[1])]
    planted = plant_near_duplicates(originals, down)
    truth = {copy: orig.relative_to(up).as_posix() for copy, (orig, _) in planted.items()}
    classes = {**{copy: DEMO_CLASSES.get(orig.stem, ()) for copy, (orig, _) in planted.items()},
               **{n: DEMO_CLASSES.get(Path(n).stem, ()) for n in unrelated}}
    return PlantedSets(up, down, truth, unrelated, {copy: edit for copy, (_, edit) in planted.items()}, classes)
