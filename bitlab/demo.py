"""`bitlab demo`: the main job on the embedded offline sample."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from bitlab import io
from bitlab.data import imagenet
from bitlab.eval.predict import predict_files
from bitlab.models import create_model, save_npz, zoo
from bitlab.paths import SAMPLE_DIR

log = logging.getLogger(__name__)


def sample_photos(sample_dir: Path = SAMPLE_DIR) -> list[Path]:
    photos = sorted((sample_dir / "openimages" / "validation").glob("*.jpg"))
    if not photos:
        raise FileNotFoundError(f"{sample_dir}: the embedded sample is missing (it ships with the source tree)")
    return photos


def classify_sample(out: Path, sample_dir: Path = SAMPLE_DIR) -> dict:
    """Classify the sample photos with the real offline ImageNet model, and check the BiT
    checkpoint path end to end: a BiT R50x1 written as an official npz, loaded back by name."""
    photos = sample_photos(sample_dir)
    out.mkdir(parents=True, exist_ok=True)
    real = create_model(zoo.OFFLINE_IMAGENET_MODEL)
    pred = predict_files(real, photos, topk=5)
    torch.manual_seed(0)
    npz = save_npz(create_model("BiT-S-R50x1"), out / "BiT-S-R50x1-random.npz")
    bit = create_model("BiT-S-R50x1", pretrained=npz, image_size=128)
    bit_pred = predict_files(bit, photos, topk=1, progress=False)
    names = imagenet.names()
    rows = [{"image": p.name,
             zoo.OFFLINE_IMAGENET_MODEL: [(names[i], round(float(q), 4)) for i, q in zip(idx, prob)],
             "BiT-S-R50x1 (random weights, npz round trip)": names[int(b[0])]}
            for p, idx, prob, b in zip(photos, pred.indices, pred.probs, bit_pred.indices)]
    io.write_json(out / "sample_predictions.json", rows)
    return {"rows": rows, "file": out / "sample_predictions.json"}
