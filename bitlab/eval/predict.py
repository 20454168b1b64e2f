"""Batched inference: image files -> class probabilities, with the training pre-processing.

Workers decode with OpenCV and resize and crop as the model's reference pipeline does
(`model.data_config`, `bitlab.data.transforms.eval_image`), shipping uint8 tensors
(`bitlab.data.loader`); normalisation happens once per batch on the model's device.
Several models over the same files (`iter_probs_many`) share each file's reading and decoding,
and models with the same evaluation view (size, filter, crop) share that view.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bitlab.data.loader import EvalFiles, inference_workers, make_loader
from bitlab.data.transforms import BadImageError, DataConfig, eval_image, normalize
from bitlab.device import parse_device
from bitlab.models import data_config_of, prepare_for_inference


@dataclass
class Predictions:
    """Top-k of each image: `indices[i, j]` is the j-th most probable class of image i."""

    indices: np.ndarray  # (N, k) int64
    probs: np.ndarray  # (N, k) float32


class EvalViews:
    """The evaluation views of one decoded image for several models' data configs (a picklable
    callable for loader workers): one uint8 HxWx3 view per config, in order."""

    def __init__(self, cfgs: Sequence[DataConfig]) -> None:
        self.cfgs = list(cfgs)

    def __call__(self, img: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(eval_image(img, c) for c in self.cfgs)


def view_key(cfg: DataConfig) -> tuple[int, str, float, str]:
    """What decides a model's uint8 input (mean and std are applied per model on the device)."""
    return cfg.input_size, cfg.interpolation, cfg.crop_pct, cfg.crop_mode


@torch.inference_mode()
def iter_probs_many(models: Sequence[nn.Module], paths: Sequence[str | os.PathLike], *, batch_size: int = 32,
                    workers: int | None = None, device: str | torch.device | None = None,
                    progress: bool | tqdm = True) -> Iterator[list[torch.Tensor]]:
    """Softmax probabilities of several models over the same image files, one list (a (B,
    num_outputs) float32 CPU tensor per model) per batch, in file order. Each file is read and
    decoded once for all the models; models that share an input size and crop share its view too."""
    cfgs = [data_config_of(m) for m in models]
    keys = list(dict.fromkeys(view_key(c) for c in cfgs))
    views = EvalViews([next(c for c in cfgs if view_key(c) == k) for k in keys])
    view_of = [keys.index(view_key(c)) for c in cfgs]
    device = parse_device(device)
    models = [prepare_for_inference(m, device) for m in models]
    workers = inference_workers(device) if workers is None else workers
    # Below one batch, worker start-up costs more than it saves. Images are decoded whole (no
    # DCT-scaled JPEG decode): the reference resamples the full image.
    loader = make_loader(EvalFiles(paths, views), batch_size,
                         workers=workers if len(paths) > batch_size else 0, pin_memory=device.type == "cuda")
    bar = progress if isinstance(progress, tqdm) else tqdm(
        total=len(paths), desc="predict", unit="img", disable=not progress, leave=False)
    try:
        for batch in loader:
            if batch.errors:  # the loader's policy: inference stops, naming the file
                raise BadImageError(batch.errors[0])
            xs = [v.to(device, non_blocking=True) for v in batch.images]
            out = []
            for model, cfg, v in zip(models, cfgs, view_of):
                x = normalize(xs[v], cfg.mean, cfg.std).contiguous(memory_format=torch.channels_last)
                out.append(model(x).float().softmax(dim=-1).cpu())
            yield out
            bar.update(len(xs[0]))
    finally:
        if bar is not progress:
            bar.close()


def iter_probs(model: nn.Module, paths: Sequence[str | os.PathLike], *, batch_size: int = 32,
               workers: int | None = None, device: str | torch.device | None = None,
               progress: bool | tqdm = True) -> Iterator[torch.Tensor]:
    """Softmax probabilities of `model` over image files, one (B, num_outputs) float32 CPU tensor
    per batch, in file order. `progress` may be a tqdm bar to advance (by images)."""
    for probs in iter_probs_many([model], paths, batch_size=batch_size, workers=workers, device=device,
                                 progress=progress):
        yield probs[0]


def predict_files(model: nn.Module, paths: Sequence[str | os.PathLike], *, topk: int = 5, batch_size: int = 32,
                  workers: int | None = None, device: str | torch.device | None = None,
                  progress: bool = True) -> Predictions:
    """Run `model` over image files; softmax top-k per image, in file order."""
    indices, probs = [], []
    for p in iter_probs(model, paths, batch_size=batch_size, workers=workers, device=device, progress=progress):
        top = p.topk(min(topk, p.shape[-1]), dim=-1)
        indices.append(top.indices.numpy())
        probs.append(top.values.numpy())
    if not indices:
        return Predictions(np.zeros((0, topk), np.int64), np.zeros((0, topk), np.float32))
    return Predictions(np.concatenate(indices), np.concatenate(probs))
