"""Batched inference: image files -> class probabilities, with the training pre-processing.

Workers decode and resize with OpenCV at the model's resolution (`model.data_config`) and ship
uint8 tensors; normalisation happens once per batch on the model's device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bitlab.data.transforms import DataConfig, decode_image, eval_image, eval_min_side, normalize, to_chw_tensor
from bitlab.device import parse_device
from bitlab.models import data_config_of, prepare_for_inference


class EvalImages(Dataset):
    """Files -> uint8 CHW tensors at the model's evaluation view (decoded in workers)."""

    def __init__(self, paths: Sequence[str | os.PathLike], cfg: DataConfig) -> None:
        self.paths = [Path(p) for p in paths]
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_chw_tensor(eval_image(decode_image(self.paths[i], eval_min_side(self.cfg)), self.cfg))


@dataclass
class Predictions:
    """Top-k of each image: `indices[i, j]` is the j-th most probable class of image i."""

    indices: np.ndarray  # (N, k) int64
    probs: np.ndarray  # (N, k) float32


def default_workers() -> int:
    # Decoding + resizing a 500 px image takes a few ms; more than 8 workers rarely pays off.
    return min(os.cpu_count() or 1, 8)


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
    # Below one batch, worker start-up costs more than it saves.
    loader = DataLoader(EvalImages(paths, cfg), batch_size=batch_size,
                        num_workers=workers if len(paths) > batch_size else 0,
                        pin_memory=device.type == "cuda")
    bar = progress if isinstance(progress, tqdm) else tqdm(
        total=len(paths), desc="predict", unit="img", disable=not progress, leave=False)
    try:
        for batch in loader:
            x = normalize(batch.to(device, non_blocking=True), cfg.mean, cfg.std)
            x = x.contiguous(memory_format=torch.channels_last)
            yield model(x).float().softmax(dim=-1).cpu()
            bar.update(len(batch))
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
