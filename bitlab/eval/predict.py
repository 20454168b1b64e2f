"""Batched inference: image files -> top-k classes and probabilities, with the training pre-processing."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bitlab.data.transforms import DataConfig, decode_image, eval_image, normalize, to_chw_tensor


class EvalImages(Dataset):
    """Files -> uint8 CHW tensors at the model's evaluation view (decoded in workers)."""

    def __init__(self, paths: Sequence[str | os.PathLike], cfg: DataConfig) -> None:
        self.paths = [Path(p) for p in paths]
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_chw_tensor(eval_image(decode_image(self.paths[i]), self.cfg))


@dataclass
class Predictions:
    """Top-k of each image: `indices[i, j]` is the j-th most probable class of image i."""

    indices: np.ndarray  # (N, k) int64
    probs: np.ndarray  # (N, k) float32


def data_config_of(model: nn.Module) -> DataConfig:
    return getattr(model, "data_config", None) or DataConfig()


@torch.inference_mode()
def predict_files(model: nn.Module, paths: Sequence[str | os.PathLike], *, topk: int = 5, batch_size: int = 32,
                  workers: int | None = None, device: str | torch.device | None = None,
                  progress: bool = True) -> Predictions:
    """Run `model` over image files; softmax top-k per image, in file order."""
    cfg = data_config_of(model)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.eval().to(device)
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    loader = DataLoader(EvalImages(paths, cfg), batch_size=batch_size, num_workers=workers if len(paths) > batch_size else 0,
                        pin_memory=device.type == "cuda")
    indices, probs = [], []
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress, leave=False):
        x = normalize(batch.to(device, non_blocking=True), cfg.mean, cfg.std)
        p = model(x).float().softmax(dim=-1)
        top = p.topk(min(topk, p.shape[-1]), dim=-1)
        indices.append(top.indices.cpu().numpy())
        probs.append(top.values.cpu().numpy())
    return Predictions(np.concatenate(indices), np.concatenate(probs))
