"""Batched inference: image files -> class probabilities, with the training pre-processing.

Workers decode with OpenCV and resize and crop as the model's reference pipeline does
(`model.data_config`, `bitlab.data.transforms.eval_image`), shipping uint8 tensors
(`bitlab.data.loader`); normalisation happens once per batch on the model's device.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bitlab.data.loader import EvalFiles, default_workers, make_loader
from bitlab.data.transforms import BadImageError, eval_image, normalize
from bitlab.device import parse_device
from bitlab.models import data_config_of, prepare_for_inference


@dataclass
class Predictions:
    """Top-k of each image: `indices[i, j]` is the j-th most probable class of image i."""

    indices: np.ndarray  # (N, k) int64
    probs: np.ndarray  # (N, k) float32




@torch.inference_mode()
def iter_probs(model: nn.Module, paths: Sequence[str | os.PathLike], *, batch_size: int = 32,
               workers: int | None = None, device: str | torch.device | None = None,
               progress: bool | tqdm = True) -> Iterator[torch.Tensor]:
    """Softmax probabilities of `model` over image files, one (B, num_outputs) float32 CPU tensor
    per batch, in file order. `progress` may be a tqdm bar to advance (by images)."""
    cfg = data_config_of(model)
    device = parse_device(device)
    model = prepare_for_inference(model, device)
    workers = default_workers() if workers is None else workers
    # Below one batch, worker start-up costs more than it saves. Images are decoded whole (no
    # DCT-scaled JPEG decode): the reference resamples the full image.
    loader = make_loader(EvalFiles(paths, functools.partial(eval_image, cfg=cfg)), batch_size,
                         workers=workers if len(paths) > batch_size else 0, pin_memory=device.type == "cuda")
    bar = progress if isinstance(progress, tqdm) else tqdm(
        total=len(paths), desc="predict", unit="img", disable=not progress, leave=False)
    try:
        for batch in loader:
            if batch.errors:  # the loader's policy: inference stops, naming the file
                raise BadImageError(batch.errors[0])
            x = normalize(batch.images.to(device, non_blocking=True), cfg.mean, cfg.std)
            x = x.contiguous(memory_format=torch.channels_last)
            yield model(x).float().softmax(dim=-1).cpu()
            bar.update(len(batch.images))
    finally:
        if bar is not progress:
            bar.close()


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
