"""`bitlab evaluate` vs timm's own validation loop: images/s on the same model, images and threads.

    .venv/bin/python benchmarks/evaluate.py [--images 192 --rounds 3 --threads 2 --workers 2]

The data: the embedded sample photos re-encoded at several sizes (JPEG, 300-1000 px long side)
into an ImageFolder of ILSVRC wnid folders, which both sides read. Both sides start from nothing
(model construction included) and end with top-1/top-5 counted:

- bitlab: `bitlab.eval.evaluate.evaluate` (OpenCV decode in workers, uint8 batches, predictions.csv
  and summary.json written);
- timm: the loop of timm's `validate.py`: `create_dataset` + `create_loader` (PIL decode,
  torchvision resize/crop/normalise in workers) + `model(input)` + `timm.utils.accuracy`, with the
  same weights; run as timm runs by default (`ratio`) and with its `--channels-last` flag
  (`ratio_vs_timm_channels_last`), since bitlab uses channels_last itself.

Runs are interleaved (bitlab, timm, bitlab, ...) so machine load hits both alike; the ratio is
taken from the medians. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import timm
import timm.data
import timm.utils
import torch

from bitlab.data.transforms import decode_image
from bitlab.demo import sample_photos
from bitlab.eval.evaluate import EvaluateConfig, evaluate
from bitlab.models import create_model, zoo
from bitlab.ooc.spec import load_classes
from bitlab.paths import SAMPLE_DIR


def sample_wnids() -> dict[str, str]:
    """The sample's photos (image id) -> the first ILSVRC-2012 wnid of their object's class."""
    wnid = {c.mid: c.ilsvrc_wnids[0] for c in load_classes(SAMPLE_DIR / "classes.csv")}
    rows = (SAMPLE_DIR / "openimages" / "validation-annotations-object-segmentation.csv").read_text().splitlines()
    return {r.split(",")[1]: wnid[r.split(",")[2]] for r in rows[1:]}


def make_images(root: Path, n: int) -> Path:
    photos = {p.stem: decode_image(p) for p in sample_photos()}
    wnids = sample_wnids()
    for i in range(n):
        stem = sorted(photos)[i % len(photos)]
        img = photos[stem]
        side = 300 + (i * 97) % 700  # long side 300..999 px: decode and resize cost vary like real data
        scale = side / max(img.shape[:2])
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        folder = root / wnids[stem]
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return root


def run_bitlab(data: Path, out: Path, args) -> float:
    start = time.perf_counter()
    evaluate(EvaluateConfig(model=args.model, data=str(data), out=str(out), batch_size=args.batch,
                            workers=args.workers, device=args.device))
    return time.perf_counter() - start


def run_timm(data: Path, args, channels_last: bool = False) -> float:
    """timm validate.py's loop, CPU path (no prefetcher); `channels_last` = its --channels-last flag."""
    start = time.perf_counter()
    model = create_model(args.model).to(args.device).eval()  # same weights as bitlab loads
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    cfg = timm.data.resolve_data_config({}, model=model)
    dataset = timm.data.create_dataset(name="", root=str(data), split="validation")
    loader = timm.data.create_loader(dataset, input_size=cfg["input_size"], batch_size=args.batch,
                                     use_prefetcher=False, interpolation=cfg["interpolation"], mean=cfg["mean"],
                                     std=cfg["std"], num_workers=args.workers, crop_pct=cfg["crop_pct"],
                                     crop_mode=cfg["crop_mode"], device=torch.device(args.device))
    top1 = top5 = 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(args.device).contiguous(memory_format=fmt), y.to(args.device)
            acc1, acc5 = timm.utils.accuracy(model(x), y, topk=(1, 5))
            top1 += acc1.item() * len(x)
            top5 += acc5.item() * len(x)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=zoo.OFFLINE_IMAGENET_MODEL)
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bitlab-bench-"))
    try:
        data = make_images(tmp / "data", args.images)
        times: dict[str, list[float]] = {"bitlab": [], "timm": [], "timm_cl": []}
        for r in range(args.rounds):
            times["bitlab"].append(run_bitlab(data, tmp / f"out{r}", args))
            times["timm"].append(run_timm(data, args))
            times["timm_cl"].append(run_timm(data, args, channels_last=True))
        ips = {k: args.images / statistics.median(v) for k, v in times.items()}
        print(json.dumps({"model": args.model, "device": args.device, "images": args.images, "batch": args.batch,
                          "threads": args.threads, "workers": args.workers,
                          **{f"{k}_img_s": round(v, 2) for k, v in ips.items()},
                          "ratio": round(ips["bitlab"] / ips["timm"], 3),
                          "ratio_vs_timm_channels_last": round(ips["bitlab"] / ips["timm_cl"], 3),
                          "rounds_s": {k: [round(t, 2) for t in v] for k, v in times.items()}}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
