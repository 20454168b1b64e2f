"""Several models over one image list: one pass, resumable per model, sharded over torchrun processes.

- One pass: each batch of files is read and decoded once for every model (`predict.iter_probs_many`),
  and models that share an input size and crop share its uint8 view.
- Resumable per model: the top-k of each chunk of `CHUNK` images is saved per model
  (`<out>/.partial/<key>-<start>-<images>.npz`, atomically, keyed by what the numbers depend on:
  the model's fingerprint and the chunk's image paths, sizes and modification times, so that an
  image replaced under its name is predicted again, and only its chunk); a rerun runs a chunk only
  for the models that lack it.
- Sharded: under torchrun, process r takes images start+r, start+r+world, ... of each chunk (one
  device each), and rank 0 gathers the chunk, puts it back in image order and saves it, so the
  result is the single-process one (up to float rounding across batch compositions).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from bitlab import fileio
from bitlab.data.transforms import BadImageError
from bitlab.eval import predict
from bitlab.train import distributed
from bitlab.train.distributed import DistInfo

PARTIAL = ".partial"
# Images per resumable chunk: ~1 min of CPU work for an R50 at 224 px, so an interrupt loses little.
CHUNK = 512


@dataclass
class ModelRun:
    """One model's part of a pass: where its chunks go and how its outputs are scored."""

    model: nn.Module
    out: Path  # its results folder (chunks under .partial/)
    key: str  # fingerprint of what its chunks depend on (`evaluate._fingerprint`)
    target_outputs: list[np.ndarray]  # per image: the model outputs that count as right
    topk: int
    check: Callable[[int], None]  # called with the number of outputs on the first batch (head checks)

    def chunk_file(self, start: int, images: str) -> Path:
        return self.out / PARTIAL / f"{self.key}-{start:07d}-{images}.npz"

    def drop_stale(self, images: Sequence[str], chunk: int) -> None:
        """Chunks saved under another key (other model, weights or images) are of no use."""
        partial = self.out / PARTIAL
        partial.mkdir(parents=True, exist_ok=True)
        keep = {self.chunk_file(i * chunk, k) for i, k in enumerate(images)}
        for stale in set(partial.glob("*.npz")) - keep:
            stale.unlink()


def chunk_keys(paths: Sequence[Path], chunk: int) -> list[str]:
    """Each chunk's images as a key: their paths, sizes and modification times."""
    keys = []
    for start in range(0, len(paths), chunk):
        h = hashlib.sha256()
        for p in paths[start:start + chunk]:
            st = Path(p).stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        keys.append(h.hexdigest()[:16])
    return keys


Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]  # top-k ids, top-k probabilities, probability on the targets


def predict_runs(runs: Sequence[ModelRun], paths: Sequence[Path], *, batch_size: int, workers: int | None,
                 info: DistInfo = DistInfo(), progress: bool = True, desc: str = "evaluate",
                 chunk: int | None = None) -> list[Chunk] | None:
    """Every run's top-k ids, probabilities and target probability over `paths`, in path order (on
    rank 0; None on the other ranks). A file that cannot be read stops every process, named."""
    chunk = chunk or CHUNK
    images = chunk_keys(paths, chunk) if info.is_main else []  # only rank 0 reads and writes chunks
    if info.is_main:
        for r in runs:
            r.drop_stale(images, chunk)
    distributed.barrier(info)
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not (progress and info.is_main))
    try:
        for c, start in enumerate(range(0, len(paths), chunk)):
            stop = min(start + chunk, len(paths))
            todo = distributed.main_rank_call(
                lambda: [i for i, r in enumerate(runs) if not r.chunk_file(start, images[c]).is_file()], info)
            mine = list(range(start + info.rank, stop, info.world_size)) if todo else []
            if todo:
                local, errors = _predict_share([runs[i] for i in todo], paths, mine, batch_size, workers, info, bar)
                distributed.stop_on_errors(errors, info, "evaluation", hint=False)
                shares = distributed.all_gather_object((mine, local), info)
                if info.is_main:
                    for j, i in enumerate(todo):
                        _save(runs[i].chunk_file(start, images[c]), _in_order(shares, j, start, stop))
            bar.update(stop - start - len(mine))  # this process's own images advanced it already
    finally:
        bar.close()
    if not info.is_main:
        return None
    return [_load_all(r, images, chunk) for r in runs]


def _predict_share(runs: Sequence[ModelRun], paths: Sequence[Path], mine: list[int], batch_size: int,
                   workers: int | None, info: DistInfo, bar: tqdm) -> tuple[list[Chunk], list[str]]:
    """This process's images of a chunk through `runs`' models; a read error is returned, not raised,
    so that every process reaches the collective that stops them together."""
    if not mine:  # a last chunk smaller than the number of processes
        return [], []
    ids: list[list[np.ndarray]] = [[] for _ in runs]
    probs: list[list[np.ndarray]] = [[] for _ in runs]
    tprob: list[list[float]] = [[] for _ in runs]
    done = 0
    try:
        for batch in predict.iter_probs_many([r.model for r in runs], [paths[i] for i in mine], batch_size=batch_size,
                                             workers=workers, device=info.device,
                                             progress=bar if info.is_main else False):
            for m, (r, p) in enumerate(zip(runs, batch)):
                if done == 0:
                    r.check(p.shape[-1])
                top = p.topk(min(r.topk, p.shape[-1]), dim=-1)
                ids[m].append(top.indices.numpy())
                probs[m].append(top.values.numpy())
                pn = p.numpy()
                tprob[m] += [float(pn[b, r.target_outputs[mine[done + b]]].sum()) for b in range(len(pn))]
            done += len(batch[0])
    except BadImageError as e:
        return [], [str(e)]
    return [(np.concatenate(i), np.concatenate(pr), np.asarray(t, np.float32)) for i, pr, t in zip(ids, probs, tprob)], []


def _in_order(shares: list[tuple[list[int], list[Chunk]]], j: int, start: int, stop: int) -> Chunk:
    """Run `j`'s rows of every process's share of a chunk, back in image order."""
    parts = [(mine, local[j]) for mine, local in shares if mine]
    k = parts[0][1][0].shape[1]
    ids = np.zeros((stop - start, k), parts[0][1][0].dtype)
    probs = np.zeros((stop - start, k), np.float32)
    tprob = np.zeros(stop - start, np.float32)
    for mine, (i, p, t) in parts:
        at = np.asarray(mine) - start
        ids[at], probs[at], tprob[at] = i, p, t
    return ids, probs, tprob


def _save(file: Path, chunk: Chunk) -> None:
    with fileio.atomic_write(file, "wb") as f:
        np.savez(f, ids=chunk[0], probs=chunk[1], target_prob=chunk[2])


def _load_all(run: ModelRun, images: Sequence[str], chunk: int) -> Chunk:
    parts = []
    for c, key in enumerate(images):
        with np.load(run.chunk_file(c * chunk, key), allow_pickle=False) as z:
            parts.append((z["ids"], z["probs"], z["target_prob"]))
    ids, probs, tprob = (np.concatenate([p[j] for p in parts]) for j in range(3))
    return ids, probs, tprob
