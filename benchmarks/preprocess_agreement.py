"""Does `bitlab evaluate` predict what each model's reference pipeline predicts? Top-1 agreement on
real, hard images, and the images/s of each pre-processing path.

    PYTHONPATH=. .venv/bin/python benchmarks/preprocess_agreement.py [--threads 2 --workers 2]
    PYTHONPATH=. .venv/bin/python benchmarks/preprocess_agreement.py --extra ooc_full/   # more images

Images: the demo OOC build (`bitlab make-ooc --demo`: 9 real object photos cut out on 12 real
scenes) and four variants of it (other output sizes, object scales, random placement, JPEG output,
feathered edges), the sample's 21 source photos (objects and scenes), and those photos re-encoded
as JPEGs at four other sizes (non-square, 333-999 px long side); `--extra DIR` adds any image folder.

Models: `efficientnet_lite0.offline_in1k` and `efficientnet_lite2.offline_in1k` (real ImageNet
weights; timm's data config: bicubic, crop 0.875 / 0.89) and `R50x1` with seeded random weights
(BiT's official view). References, each from PIL images (`Image.open(f).convert("RGB")`, as timm's
and torchvision's folder datasets load them):
- timm models: `timm.data.create_transform(**resolve_data_config({}, model=model))`;
- BiT: the official bit_pytorch validation transform, `Resize((s, s))`, `ToTensor`, `Normalize(0.5, 0.5)`.

Paths compared with the reference (same weights, same batches of 32, channels-last forward):
- `bitlab`: `bitlab.eval.predict.iter_probs`, the loop `evaluate` runs (loader workers, OpenCV
  decode, `eval_image`, per-batch normalise); `evaluate` itself is run on the demo build to check
  that its predictions.csv has the same top-1 as `iter_probs`;
- `bitlab-pil`: bitlab's geometry with PIL's own resize for every filter (the exact alternative);
- `before`: bitlab's evaluation view before the reference pipelines (OpenCV pyrDown + bilinear /
  INTER_AREA whatever the model asks, floor-rounded centre crop, DCT-scaled JPEG decode);
- `other filter`: the reference itself with bilinear and bicubic swapped (how much the filter alone
  moves the predictions on these images).
Reported per model: top-1 agreement, agreement of the top-5 sets, the largest difference of any
class probability. Speed: one thread, the per-image work of a loader worker (decode + view ->
tensor), images/s on the agreement set and on the 21 photos re-encoded at 2048 px; best of
`--rounds`, paths interleaved. Prints JSON lines, then markdown tables.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import timm.data
import torch
import torchvision.transforms as tvt
from PIL import Image

from bitlab.data.transforms import (DataConfig, center_crop, decode_image, eval_image, eval_resize_shape, normalize,
                                    reference_center_crop, resize, resize_shorter, to_chw_tensor, PIL_FILTERS)
from bitlab.demo import sample_photos
from bitlab.eval.evaluate import EvaluateConfig, evaluate
from bitlab.eval.predict import iter_probs
from bitlab.models import create_model
from bitlab.ooc.build import build_demo
from bitlab.paths import SAMPLE_DIR

MODELS = ("efficientnet_lite0.offline_in1k", "efficientnet_lite2.offline_in1k", "R50x1")
RANDOM = {"R50x1"}  # no weights were released for the bare architecture: fixed random ones (seed 0)
# make-ooc variants of the demo build: other sizes (so the models' resizes go up and down by other
# factors), object scales, placements, codecs and edges; each 108 images.
VARIANTS = {
    "384 px, scale 0.6, random placement, JPEG 95": dict(size=384, object_scale=0.6, placement="random", seed=1,
                                                         format="jpg"),
    "700 px, scale 0.5, random placement, feather 2": dict(size=700, object_scale=0.5, placement="random", seed=2,
                                                           feather=2.0),
    "300 px, scale 0.9": dict(size=300, object_scale=0.9),
    "1024 px, random placement, JPEG 85": dict(size=1024, placement="random", seed=3, format="jpg", jpeg_quality=85),
}
RESIZED_SIDES = (333, 517, 761, 999)  # long sides of the re-encoded photos
LARGE_SIDE = 2048  # long side of the timing-only photos
BATCH = 32


# ----------------------------------------------------------------------------- images
def source_photos() -> list[Path]:
    return sample_photos() + sorted((SAMPLE_DIR / "backgrounds").rglob("*.jpg"))


def reencode(photos: list[Path], out: Path, sides: tuple[int, ...]) -> list[Path]:
    """Each photo resized (INTER_AREA, or cubic when enlarging) to each long side, JPEG quality 90."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in photos:
        img = cv2.imread(str(p))
        for side in sides:
            scale = side / max(img.shape[:2])
            size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
            small = cv2.resize(img, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
            paths.append(out / f"{p.parent.name}_{p.stem}_{side}.jpg")
            cv2.imwrite(str(paths[-1]), small, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return paths


def image_groups(tmp: Path, extra: list[str]) -> dict[str, list[Path]]:
    groups = {"ooc demo build": _build(tmp / "ooc_demo", {})}
    for i, (name, opts) in enumerate(VARIANTS.items()):
        groups[f"ooc variant: {name}"] = _build(tmp / f"ooc_variant{i}", opts)
    photos = source_photos()
    groups["sample source photos"] = photos
    groups["source photos re-encoded, 333-999 px"] = reencode(photos, tmp / "resized", RESIZED_SIDES)
    for folder in extra:
        groups[f"extra: {folder}"] = sorted(p for p in Path(folder).rglob("*")
                                            if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return groups


def _build(out: Path, opts: dict) -> list[Path]:
    build_demo(out, **opts)
    return sorted(p for p in out.rglob("*") if p.suffix in (".png", ".jpg"))


# ----------------------------------------------------------------------------- views
def reference_transform(model: torch.nn.Module, name: str, interpolation: str | None = None):
    """The model's reference transform (PIL image -> normalised tensor); `interpolation` swaps its filter."""
    cfg = model.data_config
    if name == "R50x1":  # bit_pytorch/train.py's val_tx
        mode = tvt.InterpolationMode(interpolation or "bilinear")
        return tvt.Compose([tvt.Resize((cfg.input_size, cfg.input_size), interpolation=mode), tvt.ToTensor(),
                            tvt.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    ref = timm.data.resolve_data_config({}, model=model)
    if interpolation:
        ref["interpolation"] = interpolation
    return timm.data.create_transform(**ref)


def pil_view(img: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """bitlab's view with PIL's own resize for every filter."""
    h, w = eval_resize_shape(*img.shape[:2], cfg)
    if (h, w) != img.shape[:2]:
        img = np.asarray(Image.fromarray(img).resize((w, h), PIL_FILTERS[cfg.interpolation]))
    return reference_center_crop(img, cfg.input_size)


def before_min_side(cfg: DataConfig) -> int:
    return cfg.input_size if cfg.crop_pct >= 1.0 else int(cfg.input_size / cfg.crop_pct)


def before_view(img: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """The evaluation view bitlab had before (commit 1695ada): OpenCV, the model's filter ignored."""
    if cfg.crop_pct >= 1.0:
        return resize(img, cfg.input_size, cfg.input_size)
    return center_crop(resize_shorter(img, before_min_side(cfg)), cfg.input_size)


def worker_fns(model: torch.nn.Module, name: str) -> dict:
    """Per-image work of each path, as a loader worker does it: path -> tensor."""
    cfg = model.data_config
    ref = reference_transform(model, name)
    return {
        "reference": lambda p: ref(Image.open(p).convert("RGB")),
        "bitlab": lambda p: to_chw_tensor(eval_image(decode_image(p), cfg)),
        "bitlab-pil": lambda p: to_chw_tensor(pil_view(decode_image(p), cfg)),
        "before": lambda p: to_chw_tensor(before_view(decode_image(p, min_side=before_min_side(cfg)), cfg)),
    }


# ----------------------------------------------------------------------------- predictions
@torch.inference_mode()
def forward(model: torch.nn.Module, tensors: list[torch.Tensor], cfg: DataConfig) -> torch.Tensor:
    """Softmax probabilities, batches of BATCH, as `iter_probs` runs the model (uint8 inputs normalised per batch)."""
    out = []
    for i in range(0, len(tensors), BATCH):
        x = torch.stack(tensors[i:i + BATCH])
        if x.dtype == torch.uint8:
            x = normalize(x, cfg.mean, cfg.std)
        out.append(model(x.contiguous(memory_format=torch.channels_last)).float().softmax(-1))
    return torch.cat(out)


def agreement(p: torch.Tensor, ref: torch.Tensor) -> dict:
    top1 = (p.argmax(-1) == ref.argmax(-1))
    top5 = [set(a.tolist()) == set(b.tolist()) for a, b in zip(p.topk(5).indices, ref.topk(5).indices)]
    return {"n": len(p), "top1_same": int(top1.sum()), "top1_agreement": round(float(top1.float().mean()), 4),
            "top5_sets_same": int(sum(top5)), "max_prob_diff": float((p - ref).abs().max())}


def predictions(name: str, paths: list[Path], args) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # R50x1: fixed random weights
    model = create_model(name, pretrained=name not in RANDOM).eval().to(memory_format=torch.channels_last)
    cfg = model.data_config
    fns = worker_fns(model, name)
    probs = {"reference": forward(model, [fns["reference"](p) for p in paths], cfg)}
    probs["bitlab"] = torch.cat(list(iter_probs(model, paths, batch_size=BATCH, workers=args.workers,
                                                progress=False)))
    for path in ("bitlab-pil", "before"):
        probs[path] = forward(model, [fns[path](p) for p in paths], cfg)
    other = reference_transform(model, name, "bilinear" if cfg.interpolation == "bicubic" else "bicubic")
    probs["other filter"] = forward(model, [other(Image.open(p).convert("RGB")) for p in paths], cfg)
    return probs


def evaluate_matches_iter_probs(name: str, ooc: Path, probs: torch.Tensor, out: Path) -> bool:
    """`bitlab evaluate` on the demo build: the same top-1 as `iter_probs` for every image."""
    torch.manual_seed(0)
    evaluate(EvaluateConfig(model=name, random_init=name in RANDOM, data=str(ooc), out=str(out), batch_size=BATCH,
                            workers=0, progress=False))
    import pandas as pd

    df = pd.read_csv(out / "predictions.csv")
    order = {str(p.relative_to(ooc)): i for i, p in enumerate(sorted(q for q in ooc.rglob("*.png")))}
    return all(int(probs[order[img]].argmax()) == int(top1) for img, top1 in zip(df["image"], df["top1_id"]))


# ----------------------------------------------------------------------------- speed
def speed(fns: dict, paths: list[Path], rounds: int) -> dict[str, float]:
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():  # interleaved: load on the machine hits every path alike
            start = time.perf_counter()
            for p in paths:
                fn(p)
            best[k] = min(best[k], time.perf_counter() - start)
    return {k: round(len(paths) / t, 1) for k, t in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--extra", nargs="*", default=[], help="more image folders to compare on")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bitlab-agreement-"))
    try:
        groups = image_groups(tmp, args.extra)
        paths = [p for g in groups.values() for p in g]
        large = reencode(source_photos(), tmp / "large", (LARGE_SIDE,))
        print(json.dumps({"images": {k: len(v) for k, v in groups.items()}, "total": len(paths)}), flush=True)
        rows = []
        for name in args.models:
            probs = predictions(name, paths, args)
            ooc = groups["ooc demo build"]
            same = evaluate_matches_iter_probs(name, tmp / "ooc_demo", probs["bitlab"][:len(ooc)], tmp / f"eval_{name}")
            row = {"model": name, "data_config": create_model(name, pretrained=name not in RANDOM).data_config.to_dict(),
                   "evaluate_top1_equals_iter_probs": same,
                   **{k: agreement(v, probs["reference"]) for k, v in probs.items() if k != "reference"}}
            start = 0
            row["bitlab_top1_by_group"] = {}
            for g, members in groups.items():
                sl = slice(start, start + len(members))
                row["bitlab_top1_by_group"][g] = agreement(probs["bitlab"][sl], probs["reference"][sl])["top1_same"]
                start += len(members)
            torch.set_num_threads(1)  # a loader worker's thread
            model = create_model(name, pretrained=name not in RANDOM)
            row["img_per_s"] = speed(worker_fns(model, name), paths, args.rounds)
            row["img_per_s_2048px"] = speed(worker_fns(model, name), large, args.rounds)
            torch.set_num_threads(args.threads)
            print(json.dumps(row), flush=True)
            rows.append(row)
        print_tables(rows, groups)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_tables(rows: list[dict], groups: dict) -> None:
    n = sum(len(g) for g in groups.values())
    print(f"\n| model | path | top-1 same | top-5 sets same | max prob diff |\n|---|---|---|---|---|")
    for r in rows:
        for path in ("bitlab", "bitlab-pil", "before", "other filter"):
            a = r[path]
            print(f"| {r['model']} | {path} | {a['top1_same']} / {n} ({100 * a['top1_agreement']:.1f}%) | "
                  f"{a['top5_sets_same']} / {n} | {a['max_prob_diff']:.2g} |")
    print("\n| model | path | images/s (agreement set) | images/s (2048 px JPEGs) |\n|---|---|---|---|")
    for r in rows:
        for path, ips in r["img_per_s"].items():
            print(f"| {r['model']} | {path} | {ips} | {r['img_per_s_2048px'][path]} |")


if __name__ == "__main__":
    main()
