"""MixUp as BiT-HyperRule uses it: one lambda ~ Beta(alpha, alpha) per optimiser step.

Official bit_pytorch (train.py) samples lambda once per optimiser step and keeps it for all
`--batch_split` micro-batches, but draws the partner permutation *within each micro-batch*, so
the result depends on the split. bitlab draws both from a generator seeded by (seed, step) and
permutes over the whole step batch (this rank's part of it under DDP): `--batch-split 4` then
trains exactly as `--batch-split 1`, and a resumed run mixes the same pairs as an uninterrupted
one. The loss is the official two-target form lam * CE(y_a) + (1 - lam) * CE(y_b), which equals
cross-entropy against the mixed one-hot labels.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

# Keeps the MixUp stream independent of other streams seeded from the same run seed.
_MIXUP_STREAM = 0x6D6978


class MixedTargets(NamedTuple):
    """Labels of a mixed batch: `lam` of `y_a` (the images' own) and `1 - lam` of `y_b` (partners')."""

    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: float


def step_mixup(alpha: float, seed: int, step: int, batch_size: int) -> tuple[float, torch.Tensor | None]:
    """(lambda, partner permutation over the step batch) for optimiser step `step`.

    alpha == 0 means no MixUp: lambda 1 and no permutation (the plain cross-entropy path).
    """
    if alpha <= 0:
        return 1.0, None
    rng = np.random.default_rng((seed, _MIXUP_STREAM, step))
    lam = float(rng.beta(alpha, alpha))
    return lam, torch.from_numpy(rng.permutation(batch_size))


def mix(x: torch.Tensor, partner: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * x + (1 - lam) * partner (float tensors of the same shape)."""
    return x.mul(lam).add_(partner, alpha=1.0 - lam)


def mixup_cross_entropy(logits: torch.Tensor, targets: torch.Tensor | MixedTargets) -> torch.Tensor:
    """Mean cross-entropy; for `MixedTargets` the official lam * CE(y_a) + (1 - lam) * CE(y_b)."""
    logits = logits.float()
    if isinstance(targets, MixedTargets):
        return targets.lam * F.cross_entropy(logits, targets.y_a) + \
            (1.0 - targets.lam) * F.cross_entropy(logits, targets.y_b)
    return F.cross_entropy(logits, targets)
