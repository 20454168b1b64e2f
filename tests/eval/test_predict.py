"""Batched inference over files: same numbers as one image at a time, in file order, any batch size."""
from __future__ import annotations

import torch

from bitlab.data.transforms import decode_image, eval_image, normalize, to_chw_tensor
from bitlab.eval.predict import iter_probs, predict_files
from bitlab.models import create_model
from tests.fixtures import numerics


def test_batches_and_workers_do_not_change_predictions(tiny_ooc):
    torch.manual_seed(0)
    model = create_model("R14x0.5", num_classes=7, image_size=64, pretrained=False).eval()
    paths = sorted(tiny_ooc.rglob("*.png"))
    cfg = model.data_config
    x = torch.cat([normalize(to_chw_tensor(eval_image(decode_image(p), cfg))[None], cfg.mean, cfg.std) for p in paths])
    exact, floor = numerics.exact_and_floor(model, x, post=lambda t: t.softmax(-1))
    batched = torch.cat(list(iter_probs(model, paths, batch_size=5, workers=2, progress=False)))
    numerics.assert_near_exact(batched, exact, floor, "batched")
    pred = predict_files(model, paths, topk=3, batch_size=4, workers=0, progress=False)
    assert pred.indices.shape == (len(paths), 3)
    numerics.assert_topk_near_exact(pred.indices, pred.probs, exact, floor)


def test_no_files_no_predictions():
    model = create_model("R14x0.5", num_classes=7, image_size=32, pretrained=False)
    assert predict_files(model, [], topk=5, progress=False).indices.shape == (0, 5)
