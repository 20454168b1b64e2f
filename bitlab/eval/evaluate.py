"""`bitlab evaluate`: run one or several models over an evaluation set and score them.

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
the one result. One evaluate writes a folder at a time (`bitlab.io.lock_folder`), and the old
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

from bitlab import io
from bitlab.device import parse_device
from bitlab.errors import BitlabError
from bitlab.eval import context, multi, robustness
from bitlab.eval.results import CONFIG, MODELS_INDEX, PREDICTIONS, SUMMARY, VARIANT_PREDICTIONS, invalidate, slug
from bitlab.models import data_config_of, registry, zoo
from bitlab.train import distributed
from bitlab.train.torchrun import env_rank

log = logging.getLogger(__name__)

PARTIAL = multi.PARTIAL
# What a models file entry (`--models FILE`) may set: the rest of EvaluateConfig is shared.
MODEL_FIELDS = ("model", "pretrained", "num_classes", "image_size", "label_map", "label", "pretraining_data")


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
        # forever and 0 fell back silently to the model's default.
        for name, least in (("image_size", 1), ("batch_size", 1), ("workers", 0)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise BitlabError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")


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


def load_model_for_eval(cfg: EvaluateConfig) -> nn.Module:
    """The one place evaluate builds a model: name, weights, head size and resolution. Weights that
    no file gives are drawn from seed 0, so every torchrun process, and a resumed run, has the same
    model (the caller's random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return registry.create_model(cfg.model, num_classes=cfg.num_classes, pretrained=cfg.pretrained,
                                     image_size=cfg.image_size)


def _fingerprint(cfg: EvaluateConfig, model: nn.Module) -> str:
    """What every saved chunk depends on besides its images: model, weights file, resolution, label
    map, top-k, chunk size (the images themselves key each chunk: `multi.chunk_keys`)."""
    h = hashlib.sha256()
    weights = Path(cfg.pretrained) if cfg.pretrained else None
    stat = weights.stat() if weights and weights.is_file() else None
    h.update(json.dumps([cfg.model, str(weights), stat and (stat.st_size, stat.st_mtime_ns), cfg.num_classes,
                         data_config_of(model).to_dict(), cfg.label_map, cfg.topk, multi.CHUNK]).encode())
    return h.hexdigest()[:16]


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
                raise BitlabError(f"models evaluated together share --{name.replace('_', '-')}: "
                                  f"{getattr(first, name)!r} ({first.model}) vs {getattr(c, name)!r} ({c.model})")
    outs = [Path(c.out).resolve() for c in cfgs]
    if len(set(outs)) < len(outs):
        raise BitlabError(f"two models would write the same results folder {outs[0]}: give each a --label")
    return first


@dataclass
class _Model:
    cfg: EvaluateConfig
    model: nn.Module
    label_map: np.ndarray | None
    n_out: int | None


def _load_models(cfgs: Sequence[EvaluateConfig]) -> list[_Model]:
    models = []
    for cfg in cfgs:
        label_map = robustness.read_label_map(cfg.label_map) if cfg.label_map else None
        model = load_model_for_eval(cfg)
        n_out = num_outputs(model)
        check_head(model, n_out, label_map, cfg)
        models.append(_Model(cfg, model, label_map, n_out))
    return models


def _run(m: _Model, items: Sequence[robustness.EvalItem], key: str) -> multi.ModelRun:
    # Targets expressed in model outputs: with a label map, every output mapped to a target counts.
    if m.label_map is not None:
        targets = [np.flatnonzero(np.isin(m.label_map, it.targets)) for it in items]
    else:
        targets = [np.asarray(it.targets, dtype=np.int64) for it in items]
    return multi.ModelRun(m.model, Path(m.cfg.out), key, targets, m.cfg.topk,
                          lambda n_out: check_head(m.model, n_out, m.label_map, m.cfg))


def evaluate_many(cfgs: Sequence[EvaluateConfig], variants_dir: str | Path | None = None) -> list[dict]:
    """Evaluate several models on the same data in one pass (each `cfg.out` its own results folder,
    as `evaluate` writes it); returns their summaries. Under torchrun the images are sharded over the
    processes; rank 0 writes (holding each folder's lock), and every process returns the summaries."""
    base = _shared(cfgs)
    parse_device(base.device)  # a bad --device fails before anything is read or written
    with contextlib.ExitStack() as locks:
        if env_rank() == 0:
            for c in cfgs:
                locks.enter_context(io.lock_folder(c.out, "evaluate"))
        return _evaluate_many(cfgs, base, variants_dir)


def _evaluate_many(cfgs: Sequence[EvaluateConfig], base: EvaluateConfig, variants_dir: str | Path | None) -> list[dict]:
    ev = robustness.load_eval_set(base.data, base.classes, base.role)
    if not any(it.targets for it in ev.items):
        raise BitlabError(f"{ev.root}: no image has a class to score (a no_fg variant shows backgrounds alone: "
                          "evaluate the composites beside it, whose context scores use it)")
    sets = context.find_variants(ev, variants_dir)
    everything = dataclasses.replace(ev, items=ev.items + context.variant_items(ev, sets))
    models = _load_models(cfgs)
    with distributed.session(base.device) as info:
        if info.is_main:
            for m in models:
                Path(m.cfg.out).mkdir(parents=True, exist_ok=True)
                invalidate(m.cfg.out)  # before the new config.json: never one run's config beside another's results
                io.write_json(Path(m.cfg.out) / CONFIG, dataclasses.asdict(m.cfg))
        log.info("%s: %d images (%s, role %s) and %d variant images with %s", ev.root, len(ev.items), ev.kind,
                 ev.role, len(everything.items) - len(ev.items), ", ".join(model_label(c) for c in cfgs))
        runs = [_run(m, everything.items, _fingerprint(m.cfg, m.model)) for m in models]
        preds = multi.predict_runs(runs, everything.paths(), batch_size=base.batch_size, workers=base.workers,
                                   info=info, progress=base.progress,
                                   desc="evaluate " + ", ".join(model_label(c) for c in cfgs))
        summaries = None
        if info.is_main:
            summaries = [_write_results(m, ev, sets, p) for m, p in zip(models, preds)]
        return distributed.broadcast_object(summaries, info)


def _write_results(m: _Model, ev: robustness.EvalSet, sets: dict, pred: multi.Chunk) -> dict:
    """One model's predictions.csv (+ variant_predictions.csv) and summary.json; drops its chunks."""
    ids, probs, tprob = pred
    if m.label_map is not None:
        ids = m.label_map[ids]
    n = len(ev.items)
    df = robustness.predictions_table(ev.items, ids[:n], probs[:n], tprob[:n])
    variants = context.variant_tables(context.variant_items(ev, sets), ids[n:], probs[n:], tprob[n:]) if sets else {}
    if variants:
        df = context.join(df, ev.items, variants)
    cfg = m.cfg
    summary = {
        "model": {"label": model_label(cfg), "name": cfg.model, "pretrained": cfg.pretrained,
                  "pretraining_data": pretraining_data(cfg),
                  "params_m": round(sum(p.numel() for p in m.model.parameters()) / 1e6, 3),
                  "num_outputs": m.n_out, "data_config": data_config_of(m.model).to_dict(),
                  "label_map": cfg.label_map},
        "dataset": {**ev.describe(), **({"variants": {v: str(s.root.resolve()) for v, s in sets.items()}}
                                        if sets else {})},
        **robustness.summarize(df),
    }
    if variants:
        summary["context"] = context.summarize(df, variants)
    out = Path(cfg.out)
    _write_csv(out / PREDICTIONS, df)
    if variants:
        _write_csv(out / VARIANT_PREDICTIONS, _concat(variants))
    io.write_json(out / SUMMARY, summary)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    return summary


def _concat(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(list(tables.values()), ignore_index=True)


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    with io.atomic_write(path, "w", newline="", encoding="utf-8") as f:
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
    num_classes: int | None = None
    image_size: int | None = None
    label_map: str | None = None
    label: str | None = None
    pretraining_data: str | None = None


def model_configs(base: EvaluateConfig, models: Sequence[dict]) -> list[EvaluateConfig]:
    """One EvaluateConfig per model (`MODEL_FIELDS` from each entry, the rest from `base`), each
    writing to `base.out/<slug of its label>`."""
    cfgs = []
    for spec in models:
        cfg = dataclasses.replace(base, **{k: spec.get(k) for k in MODEL_FIELDS})
        cfgs.append(dataclasses.replace(cfg, out=str(Path(base.out) / slug(model_label(cfg)))))
    labels = [model_label(c) for c in cfgs]
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
            lock.enter_context(io.lock_folder(base.out, "evaluate"))
            index.unlink(missing_ok=True)  # an interrupted run leaves no index of another run's models
        summaries = evaluate_many(cfgs, variants_dir)
        if env_rank() == 0:
            io.write_json(index, {"models": [{"label": s["model"]["label"], "folder": Path(c.out).name,
                                              "model": c.model} for c, s in zip(cfgs, summaries)]})
    return summaries
