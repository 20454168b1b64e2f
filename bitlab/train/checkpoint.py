"""`checkpoint.pt` (all a resume needs, written atomically) and `final.pt` (the model alone). Both
carry the model's name and its record (`RECORD_KEYS`: class names in head order, evaluation view,
pre-training data), so `bitlab evaluate --model RUN_DIR` needs nothing else.

Each rank's global RNG states (torch, CUDA, numpy, random: what dropout or drop-path draw from) are
saved and restored to it, so a resumed run draws what an uninterrupted one would; on another process
count the ranks without one start streams seeded by (step, rank), with a warning (not bit for bit).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bitlab import fileio
from bitlab.errors import BitlabError
from bitlab.models.checkpoints import TRAIN_FORMAT_TAG
from bitlab.train.distributed import DistInfo, all_gather_object, barrier, unwrap_model

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
FINAL = "final.pt"
CHECKPOINT_FORMAT = TRAIN_FORMAT_TAG
# What a run records about its model beside the weights: `classes` (names in head order),
# `data_config` (the view its validation used: `DataConfig.to_dict()`), `pretraining_data` (for legends).
RECORD_KEYS = ("classes", "data_config", "pretraining_data")


def rng_state() -> dict:
    """This process's global RNG states (tensors and plain values: loads with weights_only=True)."""
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


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng(saved: list[dict] | dict, dist: DistInfo, step: int) -> None:
    """This rank's own RNG states from a checkpoint (a single dict: an older checkpoint's rank 0's)."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) != dist.world_size and dist.is_main:
        log.warning("the checkpoint holds the RNG states of %d process(es), this run has %d: %s; global-RNG "
                    "randomness (dropout, drop-path) will differ from an uninterrupted run", len(states),
                    dist.world_size, "ranks %d and up start streams seeded by (step, rank)" % len(states)
                    if dist.world_size > len(states) else "the extra states are left unused")
    if dist.rank < len(states):
        set_rng_state(states[dist.rank])
        return
    seed = int(np.random.SeedSequence((step, dist.rank)).generate_state(1)[0])
    torch.manual_seed(seed)  # CUDA generators too
    random.seed(seed)
    np.random.seed(seed)


def model_signature(model: nn.Module) -> dict[str, list[int]]:
    """Parameter/buffer names and shapes: what a checkpoint must match to be resumed into `model`."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _record(record: dict | None) -> dict:
    unknown = set(record or {}) - set(RECORD_KEYS)
    if unknown:
        raise ValueError(f"not model record keys: {sorted(unknown)}")
    return dict(record or {})


def save_checkpoint(path: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, dist: DistInfo, model_name: str | None,
                    model_record: dict | None = None) -> Path:
    """Collective: every rank's RNG states are gathered, rank 0 writes `path`, all wait for it."""
    rng = all_gather_object(rng_state(), dist)  # every rank's own streams, in rank order
    if dist.is_main:
        config = getattr(model, "config", None)
        fileio.torch_save({"format": CHECKPOINT_FORMAT, "version": 2, "step": step, "model_name": model_name,
                       "model": model.state_dict(), "model_config": config.to_dict() if hasattr(config, "to_dict")
                       else None, "optimizer": optimizer.state_dict(),
                       "scaler": scaler.state_dict() if scaler else None, "rng": rng, "world_size": dist.world_size,
                       **_record(model_record)}, path)
    barrier(dist)
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, dist: DistInfo = DistInfo()) -> dict:
    """Restore model, optimiser, scaler and this rank's RNG states from a training checkpoint; returns it."""
    ckpt = fileio.torch_load(path)
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
    restore_rng(ckpt["rng"], dist, int(ckpt["step"]))
    return ckpt


def saved_step(path: Path) -> int | str:
    """The step a checkpoint file holds ("?" when it cannot be read)."""
    try:
        return int(fileio.torch_load(path)["step"])
    except (BitlabError, KeyError, TypeError, ValueError):
        return "?"


def save_model(model: nn.Module, path: str | Path, name: str | None = None, record: dict | None = None) -> Path:
    """The trained model alone, as a bitlab model file (`checkpoints.save_bitlab`: the name, the record,
    the weights; ResNetV2's architecture too). Loads with `create_model(name, pretrained=path)`;
    timm models' weights are its `state_dict` entry."""
    from bitlab.models import save_bitlab

    return save_bitlab(unwrap_model(model), path, name=name, record=_record(record))
