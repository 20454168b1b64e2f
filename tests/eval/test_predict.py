"""Batched inference over files: same numbers as one image at a time, in file order, any batch size."""
from __future__ import annotations

import torch

from bitlab.data.transforms import decode_image, eval_image, normalize, to_chw_tensor
from bitlab.eval.predict import iter_probs, predict_files
from bitlab.models import create_model
from tests.fixtures import numerics
from tests.fixtures.reference_views import FAR, NEAR, differing, reference_view


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


class PixelProbe(torch.nn.Module):
    """A 'model' whose logits are the normalised pixels it is fed: softmax gives them back up to a
    constant (log p = x - logsumexp(x)), so a test sees exactly what `predict` gave the model."""

    def __init__(self, data_config) -> None:
        super().__init__()
        self.data_config = data_config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_predict_feeds_the_model_the_pixels_its_data_config_asks_for(tmp_path, photos):
    """EfficientNet-Lite0's data config (timm's pretrained_cfg) says bicubic, crop 0.875: predict's
    input is the bicubic reference's (timm's transform on PIL images), not bilinear's."""
    from dataclasses import replace

    import cv2

    cfg = create_model("efficientnet_lite0.offline_in1k").data_config
    assert (cfg.interpolation, cfg.crop_pct, cfg.crop_mode) == ("bicubic", 0.875, "center")
    paths = []
    for name, img in photos.items():
        paths.append(tmp_path / f"{name}.png")  # lossless: OpenCV and PIL decode the same pixels
        cv2.imwrite(str(paths[-1]), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    probs = torch.cat(list(iter_probs(PixelProbe(cfg), paths, batch_size=2, workers=2, progress=False)))
    near, far = [], []
    for p, img in zip(probs.double().log(), photos.values()):
        fed = p - p.mean()  # the pixels, centred, in normalised units
        for shares, ref_cfg in ((near, cfg), (far, replace(cfg, interpolation="bilinear"))):
            ref = normalize(torch.from_numpy(reference_view(img, ref_cfg)).permute(2, 0, 1)[None].contiguous(),
                            cfg.mean, cfg.std)[0].flatten().double()
            levels = (fed - (ref - ref.mean())) * 255 * torch.tensor(cfg.std, dtype=torch.float64).repeat_interleave(
                cfg.input_size ** 2)
            shares.append(differing(levels.abs().round().numpy(), 0))
    assert max(near) < NEAR and sum(far) / len(far) > FAR, (near, far)
