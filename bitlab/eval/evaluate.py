"""`bitlab evaluate`: run a model over an evaluation set and score it.

Writes the results folder that `bitlab.eval.results` describes and reads back: `predictions.csv`,
`summary.json` (the accuracy breakdowns of `robustness.summarize`) and `config.json`.

Long runs resume: predictions are saved in chunks under `.partial/` (atomically) and a rerun
with the same model, weights and images (their sizes and modification times) skips the chunks
already done. One evaluate writes a folder at a time (`bitlab.io.lock_folder`), and the old results
go before the new config.json is written (`results.invalidate`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from bitlab import io
from bitlab.device import parse_device
from bitlab.errors import BitlabError, ConfigError
from bitlab.eval import robustness
from bitlab.eval.predict import iter_probs
from bitlab.eval.results import CONFIG, PREDICTIONS, SUMMARY, invalidate
from bitlab.models import data_config_of, prepare_for_inference, registry, zoo

log = logging.getLogger(__name__)

PARTIAL = ".partial"
# Images per resumable chunk: ~1 min of CPU work for an R50 at 224 px, so an interrupt loses little.
CHUNK = 512
MAX_IMAGE_SIZE = 4096  # px per side: 8.5x BiT's largest input (480); beyond, a batch no longer fits in memory


@dataclass
class EvaluateConfig:
    model: str
    data: str
    out: str
    pretrained: str | None = None
    num_classes: int | None = None
    image_size: int | None = None
    classes: str | None = None  # class table for folder layouts (default: DATA/classes.csv, ooc_dataset/classes.csv)
    label_map: str | None = None  # model output -> ILSVRC-2012 class, for heads that are not 1000-way
    role: str | None = None  # "ooc" | "val"; default from the data layout
    label: str | None = None  # how figures name the model (default: model name + weights file)
    pretraining_data: str | None = None  # legend of Fig. 12 right (default: from the model name)
    topk: int = 5
    batch_size: int = 32
    workers: int | None = None
    device: str | None = None
    progress: bool = True  # a tqdm bar (notebooks turn it off: a saved notebook keeps the bar's first frame)

    def __post_init__(self) -> None:
        # Refused here, before any file is read or written: a size below 1 made the resize loop
        # forever and 0 fell back silently to the model's default; a side far above any model's
        # (BiT's largest is 480) only ends in a failed allocation of the resized batch.
        for name, least, most in (("image_size", 1, MAX_IMAGE_SIZE), ("batch_size", 1, None), ("workers", 0, None)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ConfigError(name, f"must be at least {least}, got {value}")
            if value is not None and most is not None and value > most:
                raise ConfigError(name, f"must be at most {most}, got {value}")


def model_label(cfg: EvaluateConfig) -> str:
    if cfg.label:
        return cfg.label
    return cfg.model + (f" [{Path(cfg.pretrained).stem}]" if cfg.pretrained else "")


def pretraining_data(cfg: EvaluateConfig) -> str:
    """The pre-training data to show in legends: given, or known from the model name and weights."""
    if cfg.pretraining_data:
        return cfg.pretraining_data
    if cfg.model in zoo.OFFLINE_MODELS:
        return "ILSVRC-2012"
    if cfg.pretrained is None:  # create_model never downloads: no file, no training
        return "none (random weights)"
    spec = registry.resolve(cfg.model)
    return spec.upstream if spec is not None and spec.upstream else "unknown"


def num_outputs(model: nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_head(model: nn.Module, n_out: int | None, label_map: np.ndarray | None, cfg: EvaluateConfig) -> None:
    """ILSVRC-mapped sets need a 1000-way head, or a label map with one entry per output."""
    if n_out is None:
        return
    if label_map is not None:
        if len(label_map) != n_out:
            raise BitlabError(f"{cfg.label_map}: label map has {len(label_map)} entries, "
                              f"but {cfg.model} has {n_out} outputs")
    elif n_out != 1000:
        raise BitlabError(f"{cfg.model} has a {n_out}-way head, but {cfg.data} is scored against the "
                          "1000 ILSVRC-2012 classes: use a 1000-way model or pass --label-map FILE "
                          f"(one ILSVRC-2012 wnid or '-' per output, {n_out} lines)")


def _fingerprint(cfg: EvaluateConfig, model: nn.Module) -> str:
    """What every saved chunk depends on: model, weights file, resolution, label map, top-k."""
    h = hashlib.sha256()
    weights = Path(cfg.pretrained) if cfg.pretrained else None
    stat = weights.stat() if weights and weights.is_file() else None
    h.update(json.dumps([cfg.model, str(weights), stat and (stat.st_size, stat.st_mtime_ns), cfg.num_classes,
                         data_config_of(model).to_dict(), cfg.label_map, cfg.topk, CHUNK]).encode())
    return h.hexdigest()[:16]


def _chunk_files(partial: Path, key: str, ev: robustness.EvalSet) -> list[Path]:
    """Each chunk's file: named by `key` and its images' names, sizes and modification times, so an
    image replaced under the same name is predicted again (and only its chunk)."""
    files = []
    for start in range(0, len(ev.items), CHUNK):
        h = hashlib.sha256()
        for it in ev.items[start:start + CHUNK]:
            st = (ev.root / it.image).stat()
            h.update(f"{it.image}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        files.append(partial / f"{key}-{start:07d}-{h.hexdigest()[:16]}.npz")
    return files


def _predict_chunks(model: nn.Module, ev: robustness.EvalSet, cfg: EvaluateConfig, out: Path,
                    label_map: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k output ids, probabilities and probability on the targets, chunk by chunk (resumable)."""
    partial = out / PARTIAL
    partial.mkdir(parents=True, exist_ok=True)
    files = _chunk_files(partial, _fingerprint(cfg, model), ev)
    for stale in set(partial.glob("*.npz")) - set(files):
        stale.unlink()
    paths = ev.paths()
    # Targets expressed in model outputs: with a label map, every output mapped to a target counts.
    if label_map is not None:
        target_outputs = [np.flatnonzero(np.isin(label_map, it.targets)) for it in ev.items]
    else:
        target_outputs = [np.asarray(it.targets) for it in ev.items]
    chunks = []
    bar = tqdm(total=len(paths), desc=f"evaluate {model_label(cfg)}", unit="img", disable=not cfg.progress)
    try:
        for start, file in zip(range(0, len(paths), CHUNK), files):
            stop = min(start + CHUNK, len(paths))
            if file.is_file():
                with np.load(file, allow_pickle=False) as z:
                    chunks.append((z["ids"], z["probs"], z["target_prob"]))
                bar.update(stop - start)
                continue
            ids, probs, tprob = [], [], []
            i = start
            for p in iter_probs(model, paths[start:stop], batch_size=cfg.batch_size, workers=cfg.workers,
                                device=cfg.device, progress=bar):
                if i == start:
                    check_head(model, p.shape[-1], label_map, cfg)
                top = p.topk(min(cfg.topk, p.shape[-1]), dim=-1)
                ids.append(top.indices.numpy())
                probs.append(top.values.numpy())
                pn = p.numpy()
                tprob += [float(pn[r, target_outputs[i + r]].sum()) for r in range(len(pn))]
                i += len(pn)
            chunk = (np.concatenate(ids), np.concatenate(probs), np.asarray(tprob, np.float32))
            with io.atomic_write(file, "wb") as f:
                np.savez(f, ids=chunk[0], probs=chunk[1], target_prob=chunk[2])
            chunks.append(chunk)
    finally:
        bar.close()
    ids, probs, tprob = (np.concatenate([c[j] for c in chunks]) for j in range(3))
    if label_map is not None:
        ids = label_map[ids]
    return ids, probs, tprob


def evaluate(cfg: EvaluateConfig) -> dict:
    """Evaluate `cfg.model` on `cfg.data`; write predictions, summary and config to `cfg.out`, which
    this run locks meanwhile (a folder another evaluate writes is refused). Returns the summary."""
    parse_device(cfg.device)  # a bad --device fails before anything is read or written
    with io.lock_folder(cfg.out, "evaluate"):
        return _evaluate(cfg)


def _evaluate(cfg: EvaluateConfig) -> dict:
    ev = robustness.load_eval_set(cfg.data, cfg.classes, cfg.role)
    label_map = robustness.read_label_map(cfg.label_map) if cfg.label_map else None
    model = prepare_for_inference(registry.create_model(cfg.model, num_classes=cfg.num_classes, pretrained=cfg.pretrained,
                                                        image_size=cfg.image_size), cfg.device, fuse=True)
    n_out = num_outputs(model)
    check_head(model, n_out, label_map, cfg)
    out = Path(cfg.out)
    invalidate(out)  # before the new config.json: never one run's config beside another's results
    io.write_json(out / CONFIG, dataclasses.asdict(cfg))
    log.info("%s: %d images (%s, role %s) with %s", ev.root, len(ev.items), ev.kind, ev.role, model_label(cfg))
    ids, probs, tprob = _predict_chunks(model, ev, cfg, out, label_map)
    df = robustness.predictions_table(ev.items, ids, probs, tprob)
    summary = {
        "model": {"label": model_label(cfg), "name": cfg.model, "pretrained": cfg.pretrained,
                  "pretraining_data": pretraining_data(cfg),
                  "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                  "num_outputs": n_out, "data_config": data_config_of(model).to_dict(),
                  "label_map": cfg.label_map},
        "dataset": ev.describe(),
        **robustness.summarize(df),
    }
    with io.atomic_write(out / PREDICTIONS, "w", newline="", encoding="utf-8") as f:
        df.to_csv(f, index=False, float_format="%.6g")
    io.write_json(out / SUMMARY, summary)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    return summary
