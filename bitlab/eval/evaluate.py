"""`bitlab evaluate`: run one or several models over an evaluation set and score them.

`load_model_for_eval` is how a model comes to be evaluated: a registry name with the weights it
stands for (or a file, or random ones), or a training run with its classes; `evaluate` scores it.

Writes, per model, the results folder that `bitlab.eval.results` describes and reads back:
`predictions.csv`, `summary.json` (the accuracy breakdowns of `robustness.summarize`, with
intervals, and the context scores of `bitlab.eval.context` when make-ooc's variants are beside the
composites), `variant_predictions.csv` (then) and `config.json`.

Several models (`evaluate_many`, `evaluate_models`) share one pass over the images: each file is
read and decoded once per batch for all of them (`bitlab.eval.multi`). `evaluate_models` lays the
folders out as `OUT/<model label slug>/` beside `OUT/models.json`; one model keeps `OUT` itself.

Long runs resume: predictions are saved per model in chunks under `.partial/` (atomically) and a
rerun with the same model and weights skips the chunks whose images (names, sizes and modification
times) are unchanged. Under torchrun the images are sharded over the processes and rank 0 writes
the one result. One evaluate writes a folder at a time (`bitlab.fileio.lock_folder`), and the old
results go before the new config.json is written (`results.invalidate`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from bitlab import fileio
from bitlab.data.transforms import DataConfig
from bitlab.device import parse_device
from bitlab.errors import BitlabError, ConfigError
from bitlab.eval import context, multi, robustness
from bitlab.eval.results import CONFIG, MODELS_INDEX, PREDICTIONS, SUMMARY, VARIANT_PREDICTIONS, invalidate, slug
from bitlab.models import checkpoints, data_config_of, prepare_for_inference, registry, zoo
from bitlab.train import distributed
from bitlab.train.checkpoint import CHECKPOINT, FINAL
from bitlab.train.torchrun import env_rank

log = logging.getLogger(__name__)

PARTIAL = multi.PARTIAL
MAX_IMAGE_SIZE = 4096  # px per side: 8.5x BiT's largest input (480); beyond, a batch no longer fits in memory
# What a models file entry (`--models FILE`) may set: the rest of EvaluateConfig is shared.
MODEL_FIELDS = ("model", "pretrained", "random_init", "num_classes", "image_size", "label_map", "label",
                "pretraining_data")



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


def load_model_for_eval(cfg: EvaluateConfig, ev: robustness.EvalSet,
                        device: str | torch.device | None = None) -> EvalModel:
    """The model `cfg` names, built once, with its label, weights and what its outputs stand for.

    `cfg.model` is a registry name or a training run's directory (its final.pt); `cfg.pretrained` a
    weights file, which alone must record its model's name (a run's final.pt or checkpoint.pt). A run
    brings its classes (the head map: `robustness.head_from_classes`, over `ev`'s class table) and
    its evaluation view. Without a file the weights are those the name stands for (downloaded into
    the cache on first use), or random ones with `cfg.random_init` (seed 0, so reruns agree).
    `cfg.label_map` overrides the run's classes. `device` (default `cfg.device`): where it runs
    (under torchrun, each process's own).
    """
    run, weights_file, record, name = _source(cfg)
    pretrained: registry.Pretrained = weights_file if weights_file is not None else not cfg.random_init
    view = _recorded_view(record, weights_file, cfg.image_size)
    # Random weights come from seed 0 (every run, every torchrun process, a resumed run: the same
    # model), without touching the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = registry.create_model(name, num_classes=cfg.num_classes, pretrained=pretrained,
                                      image_size=view.input_size if view else cfg.image_size)
    if view is not None:  # the run's own validation view
        model.data_config = view
    model = prepare_for_inference(model, device or cfg.device, fuse=True)  # evaluation never trains: fold WS in once
    head = None
    if cfg.label_map:
        head = robustness.head_from_label_map(cfg.label_map)
    elif "classes" in record:
        head = robustness.head_from_classes(record["classes"], robustness.class_table_for(ev.root, cfg.classes),
                                            f"{weights_file}: the run's classes")
    return EvalModel(model, name, _label(cfg, name, run, weights_file), _weights_text(name, pretrained),
                     pretraining_data(cfg, record, name), head, cfg.random_init, weights_file, run)


def _source(cfg: EvaluateConfig) -> tuple[Path | None, Path | None, dict, str]:
    """(run directory, weights file, the file's record, registry name) that `cfg` names."""
    run, weights_file, named_run = _run_and_weights(cfg)
    record = checkpoints.read_record(weights_file) if weights_file is not None else {}
    name = record.get("name") if named_run or not cfg.model else cfg.model
    if not name:
        raise BitlabError(f"{weights_file}: the file does not name its model (only bitlab runs' final.pt and "
                          "checkpoint.pt do): give --model NAME as well")
    return run, weights_file, record, name


def _label(cfg: EvaluateConfig, name: str, run: Path | None, weights_file: Path | None) -> str:
    label = cfg.label or (f"{name} [{run.name}]" if run else f"{name} [{weights_file.stem}]" if weights_file
                          else name)
    if cfg.random_init and "random" not in label.lower():
        label += " (random weights)"
    return label


def model_label(cfg: EvaluateConfig) -> str:
    """How figures name `cfg`'s model (as `load_model_for_eval` labels it), without building it."""
    run, weights_file, _, name = _source(cfg)
    return _label(cfg, name, run, weights_file)


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
    """What every saved chunk depends on besides its images: model, weights (file or kind),
    resolution, head map, top-k, chunk size (the images themselves key each chunk: `multi.chunk_keys`)."""
    h = hashlib.sha256()
    weights = em.weights_file
    stat = weights.stat() if weights and weights.is_file() else None
    h.update(json.dumps([em.name, str(weights), stat and (stat.st_size, stat.st_mtime_ns), em.weights,
                         cfg.num_classes, data_config_of(em.model).to_dict(), em.head and em.head.ilsvrc, cfg.topk,
                         multi.CHUNK]).encode())
    return h.hexdigest()[:16]


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


def evaluate(cfg: EvaluateConfig, variants_dir: str | Path | None = None) -> dict:
    """Evaluate `cfg.model` on `cfg.data`; write predictions, summary and config to `cfg.out`, which
    this run locks meanwhile (a folder another evaluate writes is refused). Returns the summary."""
    return evaluate_many([cfg], variants_dir)[0]


def _shared(cfgs: Sequence[EvaluateConfig]) -> EvaluateConfig:
    """The settings every model of one pass must share (the data, the pass); an error names the first
    that differs."""
    if not cfgs:
        raise BitlabError("no model to evaluate")
    first = cfgs[0]
    for c in cfgs[1:]:
        for name in ("data", "classes", "role", "topk", "batch_size", "workers", "device"):
            if getattr(c, name) != getattr(first, name):
                raise ConfigError(name, f"models evaluated together share it: {getattr(first, name)!r} "
                                  f"({first.model}) vs {getattr(c, name)!r} ({c.model})")
    outs = [Path(c.out).resolve() for c in cfgs]
    if len(set(outs)) < len(outs):
        raise BitlabError(f"two models would write the same results folder {outs[0]}: give each a --label")
    return first


def evaluate_many(cfgs: Sequence[EvaluateConfig], variants_dir: str | Path | None = None) -> list[dict]:
    """Evaluate several models on the same data in one pass (each `cfg.out` its own results folder,
    as `evaluate` writes it); returns their summaries. Under torchrun the images are sharded over the
    processes; rank 0 writes (holding each folder's lock), and every process returns the summaries."""
    base = _shared(cfgs)
    parse_device(base.device)  # a bad --device fails before anything is read or written
    with contextlib.ExitStack() as locks:
        if env_rank() == 0:
            for c in cfgs:
                locks.enter_context(fileio.lock_folder(c.out, "evaluate"))
        return _evaluate_many(cfgs, base, variants_dir)


@dataclass
class _Scored:
    """One model of a pass, and which images of the pass it scores (a subset head: its classes')."""

    cfg: EvaluateConfig
    em: EvalModel
    task: dict
    rows: np.ndarray  # indices into the composites
    variant_rows: np.ndarray  # indices into the variant images


def _scored(cfg: EvaluateConfig, em: EvalModel, ev: robustness.EvalSet,
            variant_items: Sequence[robustness.EvalItem]) -> _Scored:
    check_head(em, em.num_outputs, cfg)
    kept, task = scored_items(em, ev)
    if em.random:
        log.warning("%s: random weights (--random-init): its scores are chance, not a trained model's", em.label)
    if task["note"]:
        log.info("%s: %s", em.label, task["note"])
    keep = {id(it) for it in kept.items}
    rows = np.asarray([i for i, it in enumerate(ev.items) if id(it) in keep], dtype=np.int64)
    # Variant images of classes the head does not know are left out too; the bare backgrounds (no
    # class) are kept: the context-consistent error reads them.
    vrows = np.asarray([i for i, it in enumerate(variant_items)
                        if not it.targets or em.head is None or not em.head.subset or em.head.scores(it.targets)],
                       dtype=np.int64)
    return _Scored(cfg, em, task, rows, vrows)


def _run(s: _Scored, items: Sequence[robustness.EvalItem]) -> multi.ModelRun:
    # Targets expressed in model outputs: through a head map, every output that stands for a target counts.
    head = s.em.head
    targets = [head.right_outputs(it.targets) if head else np.asarray(it.targets, dtype=np.int64) for it in items]
    return multi.ModelRun(s.em.model, Path(s.cfg.out), _fingerprint(s.cfg, s.em), targets, s.cfg.topk,
                          lambda n_out: check_head(s.em, n_out, s.cfg))


def _evaluate_many(cfgs: Sequence[EvaluateConfig], base: EvaluateConfig, variants_dir: str | Path | None) -> list[dict]:
    ev = robustness.load_eval_set(base.data, base.classes, base.role)
    if not any(it.targets for it in ev.items):
        raise BitlabError(f"{ev.root}: no image has a class to score (a no_fg variant shows backgrounds alone: "
                          "evaluate the composites beside it, whose context scores use it)")
    sets = context.find_variants(ev, variants_dir)
    extra = context.variant_items(ev, sets)
    everything = dataclasses.replace(ev, items=ev.items + extra)
    with distributed.session(base.device) as info:
        scored = [_scored(c, load_model_for_eval(c, ev, device=info.device), ev, extra) for c in cfgs]
        if info.is_main:
            for s in scored:
                Path(s.cfg.out).mkdir(parents=True, exist_ok=True)
                invalidate(s.cfg.out)  # before the new config.json: never one run's config beside another's results
                fileio.write_json(Path(s.cfg.out) / CONFIG, dataclasses.asdict(s.cfg))
        labels = ", ".join(s.em.label for s in scored)
        log.info("%s: %d images (%s, role %s) and %d variant images with %s", ev.root, len(ev.items), ev.kind,
                 ev.role, len(extra), labels)
        runs = [_run(s, everything.items) for s in scored]
        preds = multi.predict_runs(runs, everything.paths(), batch_size=base.batch_size, workers=base.workers,
                                   info=info, progress=base.progress, desc=f"evaluate {labels}")
        summaries = None
        if info.is_main:
            summaries = [_write_results(s, ev, extra, sets, p) for s, p in zip(scored, preds)]
        return distributed.broadcast_object(summaries, info)


def _write_results(s: _Scored, ev: robustness.EvalSet, extra: Sequence[robustness.EvalItem], sets: dict,
                   pred: multi.Chunk) -> dict:
    """One model's predictions.csv (+ variant_predictions.csv) and summary.json; drops its chunks."""
    ids, probs, tprob = pred
    em, cfg, n = s.em, s.cfg, len(ev.items)
    if em.head is not None:  # output ids -> the ILSVRC-2012 classes they stand for
        ids = em.head.ilsvrc_ids(ids, [it.targets for it in ev.items + list(extra)])
    items = [ev.items[i] for i in s.rows]
    df = robustness.predictions_table(items, ids[s.rows], probs[s.rows], tprob[s.rows])
    vitems = [extra[i] for i in s.variant_rows]
    vr = n + s.variant_rows
    variants = context.variant_tables(vitems, ids[vr], probs[vr], tprob[vr]) if vitems else {}
    if variants:
        df = context.join(df, items, variants)
    summary = {
        "model": {"label": em.label, "name": em.name, "pretrained": str(em.weights_file) if em.weights_file else None,
                  "weights": em.weights, "random_init": em.random, "run": str(em.run) if em.run else None,
                  "pretraining_data": em.pretraining_data,
                  "params_m": round(sum(p.numel() for p in em.model.parameters()) / 1e6, 3),
                  "num_outputs": em.num_outputs, "data_config": data_config_of(em.model).to_dict(),
                  "label_map": cfg.label_map, "head": em.head.describe() if em.head else None},
        "task": s.task,
        "dataset": {**dataclasses.replace(ev, items=items).describe(),
                    **({"variants": {v: str(vs.root.resolve()) for v, vs in sets.items()}} if sets else {})},
        **robustness.summarize(df),
    }
    if variants:
        summary["context"] = context.summarize(df, variants)
    out = Path(cfg.out)
    _write_csv(out / PREDICTIONS, df)
    if variants:
        _write_csv(out / VARIANT_PREDICTIONS, _concat(variants))
    fileio.write_json(out / SUMMARY, summary)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    return summary


def _concat(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(list(tables.values()), ignore_index=True)


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    with fileio.atomic_write(path, "w", newline="", encoding="utf-8") as f:
        df.to_csv(f, index=False, float_format="%.6g")


# ----------------------------------------------------------------------------- several models
def read_models_file(path: str | Path) -> list[dict]:
    """The models of a `--models` file (YAML or JSON): a list whose entries are a model name or a
    mapping of `MODEL_FIELDS` (e.g. `{model: BiT-M-R50x1, pretrained: w.npz, label: BiT-M}`)."""
    from bitlab.settings import load_file, settings_from

    data = load_file(path)
    if isinstance(data, dict) and set(data) == {"models"}:
        data = data["models"]
    if not isinstance(data, list) or not data:
        raise BitlabError(f"{path}: expected a list of models (names or mappings with {', '.join(MODEL_FIELDS)})")
    specs = []
    for i, entry in enumerate(data, start=1):
        entry = {"model": entry} if isinstance(entry, str) else entry
        where = f"{path}: model {i}"
        spec = settings_from(_ModelSpec, entry, where)
        if "model" not in spec:
            raise BitlabError(f"{where}: no 'model' name")
        specs.append(spec)
    return specs


@dataclass
class _ModelSpec:
    """The per-model settings of a models file (`MODEL_FIELDS`); types as EvaluateConfig's."""

    model: str
    pretrained: str | None = None
    random_init: bool = False
    num_classes: int | None = None
    image_size: int | None = None
    label_map: str | None = None
    label: str | None = None
    pretraining_data: str | None = None


def model_configs(base: EvaluateConfig, models: Sequence[dict]) -> list[EvaluateConfig]:
    """One EvaluateConfig per model (`MODEL_FIELDS` from each entry, the rest from `base`), each
    writing to `base.out/<slug of its label>`."""
    cfgs, labels = [], []
    for spec in models:
        cfg = dataclasses.replace(base, **{k: spec[k] for k in MODEL_FIELDS if k in spec})
        labels.append(model_label(cfg))  # once: a run's label reads its final.pt's record
        cfgs.append(dataclasses.replace(cfg, out=str(Path(base.out) / slug(labels[-1]))))
    if len({slug(x) for x in labels}) < len(labels):
        raise BitlabError(f"two models share a label (or its folder name): {', '.join(labels)}; give each a label")
    return cfgs


def evaluate_models(base: EvaluateConfig, models: Sequence[dict], variants_dir: str | Path | None = None) -> list[dict]:
    """Several models on `base.data` in one pass: `base.out/<label slug>/` per model (a results folder
    as `evaluate` writes it) and `base.out/models.json` listing them (`results.find_results` reads it)."""
    cfgs = model_configs(base, models)
    index = Path(base.out) / MODELS_INDEX
    with contextlib.ExitStack() as lock:
        if env_rank() == 0:  # under torchrun, rank 0 writes
            lock.enter_context(fileio.lock_folder(base.out, "evaluate"))
            index.unlink(missing_ok=True)  # an interrupted run leaves no index of another run's models
        summaries = evaluate_many(cfgs, variants_dir)
        if env_rank() == 0:
            fileio.write_json(index, {"models": [{"label": s["model"]["label"], "folder": Path(c.out).name,
                                              "model": c.model} for c, s in zip(cfgs, summaries)]})
    return summaries
