"""Validation during training, for every task: one `Evaluator` over a file set or a shard set."""
from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bitlab.data import shards
from bitlab.data.datasets import ImageSet
from bitlab.data.loader import Batch, EvalFiles, ShardViews, make_loader
from bitlab.data.multilabel import MultiLabelSet
from bitlab.errors import BitlabError
from bitlab.train import distributed as D
from bitlab.train.command import Env
from bitlab.train.loop import eval_logits

log = logging.getLogger(__name__)


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes with at least one positive of the average precision (area under the
    precision-recall curve, scikit-learn's definition); NaN when no class has a positive."""
    from sklearn.metrics import average_precision_score

    present = targets.sum(0) > 0
    if not present.any():
        return math.nan
    return float(average_precision_score(targets[:, present], scores[:, present], average="macro"))


class Evaluator:
    """Loss and top-1/top-5 (single-label) or loss, precision@1 and mAP (multi-label: the N x C scores
    are gathered, so they must fit in memory), sharded over ranks and summed: the same numbers on
    any number of processes. Bad images: left out with `skip_bad` (listed in `bad`), else stop."""

    def __init__(self, source: ImageSet | MultiLabelSet | shards.ShardIndex, view: Callable, env: Env, *,
                 batch_size: int, skip_bad: bool, decode_side: int | None = None) -> None:
        dist, workers, pin = env.dist, env.workers, env.dist.device.type == "cuda"
        self.multi = source.multi_label
        if isinstance(source, shards.ShardIndex):
            views = ShardViews(view, num_classes=len(source.classes), multi=self.multi)
            dataset = shards.ShardPass(source, views.evaluate, rank=dist.rank, world_size=dist.world_size,
                                       on_error=views.error)
            self.loader = make_loader(dataset, batch_size, workers=min(workers, len(dataset.mine)), pin_memory=pin,
                                      persistent=True)
        else:
            sampler = D.ShardSampler(len(source), dist)
            # Below one batch, worker start-up costs more than it saves.
            self.loader = make_loader(EvalFiles(source, view, decode_side), batch_size, sampler=sampler,
                                      workers=workers if len(sampler) > batch_size else 0, pin_memory=pin,
                                      persistent=True)
        self.mean, self.std, self.dist, self.skip_bad = env.mean, env.std, dist, skip_bad
        self.precision, self.channels_last = env.precision, env.channels_last
        self.bad: set[str] = set()

    def _errors(self, batch: Batch) -> list[str]:
        """The batch's bad images that stop the evaluation (none with `skip_bad`: they are left out)."""
        if not self.skip_bad:
            return list(batch.errors)
        for message in set(batch.errors) - self.bad:
            log.warning("left out of validation: %s", message)
            self.bad.add(message)
        return []

    @torch.inference_mode()
    def __call__(self, model: nn.Module, step: int) -> dict:
        dev = self.dist.device
        sums = torch.zeros(4, dtype=torch.float64, device=dev)  # loss, top1 (prec@1), top5, n
        errors: list[str] = []
        scores, targets = [], []
        for batch in self.loader:
            errors += self._errors(batch)
            if not len(batch.images) or errors:
                continue
            logits = eval_logits(model, batch.images, mean=self.mean, std=self.std, device=dev,
                                 precision=self.precision, channels_last=self.channels_last)
            y = batch.targets.to(dev, non_blocking=True)
            n = torch.tensor(float(len(y)), dtype=torch.float64, device=dev)
            if self.multi:
                loss = F.binary_cross_entropy_with_logits(logits, y.float(), reduction="none").sum()
                top1 = y.gather(1, logits.argmax(1, keepdim=True)).sum()
                sums += torch.stack([loss.double(), top1.double(), torch.zeros_like(n), n])
                scores.append(torch.sigmoid(logits).cpu().numpy())
                targets.append(y.cpu().numpy())
            else:
                hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
                sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), hit[:, 0].sum().double(),
                                     hit.any(dim=1).sum().double(), n])
        # Every rank finishes its share first (no collective inside the loop: shares differ in size).
        D.stop_on_errors(errors, self.dist, "validation")
        loss, top1, top5, n = D.all_reduce_sum(sums, self.dist).tolist()
        if n == 0:
            raise BitlabError("no readable validation images")
        if not self.multi:
            return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "n": int(n)}
        mine = (np.concatenate(scores) if scores else None, np.concatenate(targets) if targets else None)
        parts = [p for p in D.all_gather_object(mine, self.dist) if p[0] is not None]
        all_scores, all_targets = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return {"loss": loss / n, "prec1": top1 / n, "map": mean_average_precision(all_scores, all_targets),
                "n": int(n)}
