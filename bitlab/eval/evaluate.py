"""`bitlab evaluate`: run a model over an evaluation set and score it.

`load_model_for_eval` is how a model comes to be evaluated: a registry name with the weights it
stands for (or a file, or random ones), or a training run with its classes; `evaluate` scores it.

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
import torch
from torch import nn
from tqdm.auto import tqdm

from bitlab import io
from bitlab.data.transforms import DataConfig
from bitlab.device import parse_device
from bitlab.errors import BitlabError, ConfigError
from bitlab.eval import robustness
from bitlab.eval.predict import iter_probs
from bitlab.eval.results import CONFIG, PREDICTIONS, SUMMARY, invalidate
from bitlab.models import checkpoints, data_config_of, prepare_for_inference, registry, zoo
from bitlab.train.checkpoint import CHECKPOINT, FINAL

log = logging.getLogger(__name__)

PARTIAL = ".partial"
# Images per resumable chunk: ~1 min of CPU work for an R50 at 224 px, so an interrupt loses little.
CHUNK = 512
MAX_IMAGE_SIZE = 4096  # px per side: 8.5x BiT's largest input (480); beyond, a batch no longer fits in memory


@dataclass(kw_only=True)
class EvaluateConfig:
    model: str | None = None  # a registry name or a run directory; None: the name `pretrained` records
    data: str
    out: str
    pretrained: str | None = None  # a weights file (default: the weights the name stands for, or the run's)
    random_init: bool = False  # random weights (seed 0) instead of pretrained ones: labelled so everywhere
    num_classes: int | None = None
    image_size: int | None = None
    classes: str | None = None  # class table for folder layouts (default: DATA/classes.csv, ooc_dataset/classes.csv)
    label_map: str | None = None  # model output -> ILSVRC-2012 class, for heads that are not 1000-way
    role: str | None = None  # "ooc" | "val"; default from the data layout
    label: str | None = None  # how figures name the model (default: model name + weights file or run)
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
        if not self.model and not self.pretrained:
            raise BitlabError("give --model (a model name or a run directory) or --pretrained FILE (a run's final.pt)")
        if self.random_init and self.pretrained:
            raise BitlabError(f"--random-init asks for random weights, but --pretrained {self.pretrained} gives a "
                              "weights file: give one or the other")


@dataclass
class EvalModel:
    """A model ready to score, and what its results say about it (`load_model_for_eval`)."""

    model: nn.Module
    name: str  # its registry name
    label: str  # how figures name it
    weights: str  # what its weights are, in words
    pretraining_data: str  # for legends
    head: robustness.HeadMap | None  # what its outputs stand for; None: ILSVRC-2012's 1000 classes in order
    random: bool = False  # random weights (`--random-init`)
    weights_file: Path | None = None
    run: Path | None = None  # the training run it comes from

    @property
    def num_outputs(self) -> int | None:
        return num_outputs(self.model)


def load_model_for_eval(cfg: EvaluateConfig, ev: robustness.EvalSet) -> EvalModel:
    """The model `cfg` names, built once, with its label, weights and what its outputs stand for.

    `cfg.model` is a registry name or a training run's directory (its final.pt); `cfg.pretrained` a
    weights file, which alone must record its model's name (a run's final.pt or checkpoint.pt). A run
    brings its classes (the head map: `robustness.head_from_classes`, over `ev`'s class table) and
    its evaluation view. Without a file the weights are those the name stands for (downloaded into
    the cache on first use), or random ones with `cfg.random_init` (seed 0, so reruns agree).
    `cfg.label_map` overrides the run's classes.
    """
    run, weights_file, named_run = _run_and_weights(cfg)
    record = checkpoints.read_record(weights_file) if weights_file is not None else {}
    name = record.get("name") if named_run or not cfg.model else cfg.model
    if not name:
        raise BitlabError(f"{weights_file}: the file does not name its model (only bitlab runs' final.pt and "
                          "checkpoint.pt do): give --model NAME as well")
    pretrained: registry.Pretrained = weights_file if weights_file is not None else not cfg.random_init
    if cfg.random_init:
        torch.manual_seed(0)  # the same random weights on every run: resumed chunks stay valid
    view = _recorded_view(record, weights_file, cfg.image_size)
    model = registry.create_model(name, num_classes=cfg.num_classes, pretrained=pretrained,
                                  image_size=view.input_size if view else cfg.image_size)
    if view is not None:  # the run's own validation view
        model.data_config = view
    model = prepare_for_inference(model, cfg.device, fuse=True)  # evaluation never trains: fold WS in once
    head = None
    if cfg.label_map:
        head = robustness.head_from_label_map(cfg.label_map)
    elif "classes" in record:
        head = robustness.head_from_classes(record["classes"], robustness.class_table_for(ev.root, cfg.classes),
                                            f"{weights_file}: the run's classes")
    label = cfg.label or (f"{name} [{run.name}]" if run else f"{name} [{weights_file.stem}]" if weights_file
                          else name)
    if cfg.random_init and "random" not in label.lower():
        label += " (random weights)"
    return EvalModel(model, name, label, _weights_text(name, pretrained), pretraining_data(cfg, record, name), head,
                     cfg.random_init, weights_file, run)


def _run_and_weights(cfg: EvaluateConfig) -> tuple[Path | None, Path | None, bool]:
    """(the run directory, the weights file, whether `cfg.model` is the run) that `cfg` names:
    `--model RUN_DIR` means its final.pt (or `--pretrained`); a run's final.pt / checkpoint.pt given
    alone belongs to its folder."""
    weights = Path(cfg.pretrained) if cfg.pretrained else None
    if cfg.model and Path(cfg.model).is_dir():
        run = Path(cfg.model)
        weights = weights or run / FINAL
        if not weights.is_file():
            hint = (f"the run has not finished: resume it, or evaluate its last checkpoint with --pretrained "
                    f"{run / CHECKPOINT}" if (run / CHECKPOINT).is_file() else "is it a bitlab training run?")
            raise BitlabError(f"{run}: no {weights.name} ({hint})")
        return run, weights, True
    if weights is not None and weights.name in (FINAL, CHECKPOINT) and (weights.parent / "config.json").is_file():
        return weights.parent, weights, False
    return None, weights, False


def _recorded_view(record: dict, source: Path | None, image_size: int | None) -> DataConfig | None:
    """The evaluation view a run recorded (its validation's), at `image_size` when given."""
    view = record.get("data_config")
    if view is None:
        return None
    try:
        recorded = DataConfig(**{**view, "mean": tuple(view["mean"]), "std": tuple(view["std"])})
    except (KeyError, TypeError) as e:
        raise BitlabError(f"{source}: key 'data_config' is not a DataConfig ({type(e).__name__}: {e})") from None
    return dataclasses.replace(recorded, input_size=image_size) if image_size else recorded


def _weights_text(name: str, pretrained: registry.Pretrained) -> str:
    if pretrained is False:
        return "random (--random-init, seed 0)"
    if not registry.own_weights(pretrained):
        return str(pretrained)
    if name in zoo.OFFLINE_MODELS:
        return f"packaged ({zoo.OFFLINE_MODELS[name].package})"
    if registry.resolve(name) is not None:
        return str(zoo.cached_official(name)[1])
    source = zoo.timm_source(name)
    return f"timm's pretrained weights ({source.hf_hub_id or source.url})"


def pretraining_data(cfg: EvaluateConfig, record: dict | None = None, name: str | None = None) -> str:
    """The pre-training data to show in legends: given, else random weights', else what the run recorded,
    else known from the model name and weights (`registry.pretraining_data`)."""
    if cfg.pretraining_data:
        return cfg.pretraining_data
    if cfg.random_init:
        return registry.RANDOM_WEIGHTS
    if record and record.get("pretraining_data"):
        return record["pretraining_data"]
    return registry.pretraining_data(name or cfg.model, cfg.pretrained or True)


def num_outputs(model: nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_head(em: EvalModel, n_out: int | None, cfg: EvaluateConfig) -> None:
    """ILSVRC-mapped sets need a 1000-way head, or a head map with one entry per output."""
    if n_out is None:
        return
    if em.head is not None:
        if len(em.head.names) != n_out:
            what = (f"label map has {len(em.head.names)} entries" if cfg.label_map
                    else f"run recorded {len(em.head.names)} classes")
            raise BitlabError(f"{em.head.source.removeprefix('--label-map ')}: {what}, but {em.name} has {n_out} "
                              "outputs")
    elif n_out != robustness.PAPER_WAY:
        raise BitlabError(f"{em.name} has a {n_out}-way head, but {cfg.data} is scored against the "
                          "1000 ILSVRC-2012 classes: use a 1000-way model, a run directory (--model RUN_DIR: its "
                          "classes map by name) or pass --label-map FILE "
                          f"(one ILSVRC-2012 wnid or '-' per output, {n_out} lines)")


def _fingerprint(cfg: EvaluateConfig, em: EvalModel) -> str:
    """What every saved chunk depends on: model, weights (file or kind), resolution, head map, top-k."""
    h = hashlib.sha256()
    weights = em.weights_file
    stat = weights.stat() if weights and weights.is_file() else None
    h.update(json.dumps([em.name, str(weights), stat and (stat.st_size, stat.st_mtime_ns), em.weights,
                         cfg.num_classes, data_config_of(em.model).to_dict(), em.head and em.head.ilsvrc, cfg.topk,
                         CHUNK]).encode())
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


def _predict_chunks(em: EvalModel, ev: robustness.EvalSet, cfg: EvaluateConfig, out: Path
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k output ids, probabilities and probability on the targets, chunk by chunk (resumable)."""
    partial = out / PARTIAL
    partial.mkdir(parents=True, exist_ok=True)
    files = _chunk_files(partial, _fingerprint(cfg, em), ev)
    for stale in set(partial.glob("*.npz")) - set(files):
        stale.unlink()
    paths = ev.paths()
    # Targets expressed in model outputs: through a head map, every output that stands for a target counts.
    target_outputs = [em.head.right_outputs(it.targets) if em.head else np.asarray(it.targets) for it in ev.items]
    chunks = []
    bar = tqdm(total=len(paths), desc=f"evaluate {em.label}", unit="img", disable=not cfg.progress)
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
            for p in iter_probs(em.model, paths[start:stop], batch_size=cfg.batch_size, workers=cfg.workers,
                                device=cfg.device, progress=bar):
                if i == start:
                    check_head(em, p.shape[-1], cfg)
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
    if em.head is not None:
        ids = em.head.ilsvrc_ids(ids, [it.targets for it in ev.items])
    return ids, probs, tprob


def scored_items(em: EvalModel, ev: robustness.EvalSet) -> tuple[robustness.EvalSet, dict]:
    """`ev` as `em` is scored on it, and the task: a head over a subset of the ILSVRC-2012 classes
    answers only among them, so only images of those classes are scored (the rest are left out and
    counted); summary.json's `task` says so."""
    head = em.head
    if head is None or not head.subset:
        return ev, {"way": head.way if head else robustness.PAPER_WAY, "subset": False, "note": "",
                    "images_left_out": 0, "classes_left_out": []}
    kept = [it for it in ev.items if head.scores(it.targets)]
    left = sorted({it.cls for it in ev.items if not head.scores(it.targets)})
    if not kept:
        known = ", ".join(n for n, s in zip(head.names, head.ilsvrc) if s)
        raise BitlabError(f"{ev.root}: none of its classes ({', '.join(sorted({it.cls for it in ev.items}))}) is "
                          f"among the {head.way} of {em.label}'s head ({known})")
    if left:
        log.warning("%s scores %d of %d images: its %d-way head knows none of the classes %s",
                    em.label, len(kept), len(ev.items), head.way, ", ".join(left))
    return (dataclasses.replace(ev, items=kept),
            {"way": head.way, "subset": True, "note": head.note, "images_left_out": len(ev.items) - len(kept),
             "classes_left_out": left})


def evaluate(cfg: EvaluateConfig) -> dict:
    """Evaluate `cfg.model` on `cfg.data`; write predictions, summary and config to `cfg.out`, which
    this run locks meanwhile (a folder another evaluate writes is refused). Returns the summary."""
    parse_device(cfg.device)  # a bad --device fails before anything is read or written
    with io.lock_folder(cfg.out, "evaluate"):
        return _evaluate(cfg)


def _evaluate(cfg: EvaluateConfig) -> dict:
    ev = robustness.load_eval_set(cfg.data, cfg.classes, cfg.role)
    em = load_model_for_eval(cfg, ev)
    n_out = em.num_outputs
    check_head(em, n_out, cfg)
    ev, task = scored_items(em, ev)
    if em.random:
        log.warning("%s: random weights (--random-init): its scores are chance, not a trained model's", em.label)
    if task["note"]:
        log.info("%s: %s", em.label, task["note"])
    out = Path(cfg.out)
    invalidate(out)  # before the new config.json: never one run's config beside another's results
    io.write_json(out / CONFIG, dataclasses.asdict(cfg))
    log.info("%s: %d images (%s, role %s) with %s", ev.root, len(ev.items), ev.kind, ev.role, em.label)
    ids, probs, tprob = _predict_chunks(em, ev, cfg, out)
    df = robustness.predictions_table(ev.items, ids, probs, tprob)
    summary = {
        "model": {"label": em.label, "name": em.name, "pretrained": str(em.weights_file) if em.weights_file else None,
                  "weights": em.weights, "random_init": em.random, "run": str(em.run) if em.run else None,
                  "pretraining_data": em.pretraining_data,
                  "params_m": round(sum(p.numel() for p in em.model.parameters()) / 1e6, 3),
                  "num_outputs": n_out, "data_config": data_config_of(em.model).to_dict(),
                  "label_map": cfg.label_map, "head": em.head.describe() if em.head else None},
        "task": task,
        "dataset": ev.describe(),
        **robustness.summarize(df),
    }
    with io.atomic_write(out / PREDICTIONS, "w", newline="", encoding="utf-8") as f:
        df.to_csv(f, index=False, float_format="%.6g")
    io.write_json(out / SUMMARY, summary)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    return summary
