"""Fine-tuning speed: the input pipeline against torchvision's, and the data path's cost in training.

    python benchmarks/finetune.py            # both parts, numbers for benchmarks/RESULTS.md
    python benchmarks/finetune.py --quick    # a smaller run

1. Input pipeline: images/s delivered by bitlab's loader (OpenCV decode, square resize, random
   crop, flip in workers; uint8 to the main process; normalised per batch there) against the
   official recipe in torchvision/PIL (ImageFolder + Resize((p, p)) + RandomCrop + RandomHorizontalFlip
   + ToTensor + Normalize), on the same JPEGs, workers = cores, in one run.
2. Training: images/s of `bitlab finetune`'s loop on those JPEGs against the model-only step (the same
   model, batch and SGD update on tensors already in memory). The difference is what the data path
   costs.

The JPEGs are real photos (scikit-learn's two CC-BY sample photos and the repo's three sample
photos), cropped and rescaled to ImageNet-like sizes (about 500x375) so no two files are equal.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitlab.data import datasets, loader  # noqa: E402
from bitlab.data.transforms import BIT_MEAN, BIT_STD, TrainAugment, normalize, train_image  # noqa: E402
from bitlab.train.distributed import StepSampler  # noqa: E402
from photos import make_jpegs  # noqa: E402 (benchmarks/)


def _rate(batches, n_images: int, warmup: int) -> float:
    """Images/s over `n_images` after `warmup` batches (workers started, caches warm)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    seen, t0 = 0, time.perf_counter()
    while seen < n_images:
        seen += len(next(it)[0])
    return seen / (time.perf_counter() - t0)


def bitlab_pipeline(root: Path, resize: int, crop: int, batch: int, workers: int, *, normalise: bool):
    images = datasets.image_folder(root / "train")
    aug = TrainAugment(resize, crop)
    dataset = loader.TrainFiles(images, functools.partial(train_image, aug=aug), seed=0, stream=0, skip_bad=False,
                                decode_side=resize)
    batches = loader.make_loader(dataset, batch, sampler=StepSampler(len(images), batch, seed=0), workers=workers)
    for b in batches:
        # On a GPU the uint8 batch goes to the device and is normalised there; on a CPU the main
        # process does it once per batch. Both are measured.
        yield (normalize(b.images, BIT_MEAN, BIT_STD) if normalise else b.images), b.targets


def torchvision_pipeline(root: Path, resize: int, crop: int, batch: int, workers: int):
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision import datasets as tvd, transforms as T

    tf = T.Compose([T.Resize((resize, resize)), T.RandomCrop((crop, crop)), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])  # bit_pytorch/train.py
    ds = tvd.ImageFolder(str(root / "train"), tf)
    sampler = RandomSampler(ds, replacement=True, num_samples=10 ** 9)
    yield from DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, prefetch_factor=4)


def bench_pipeline(root: Path, resize: int, crop: int, *, batch: int, workers: int, images: int, rounds: int) -> dict:
    runs = {"bitlab_uint8": lambda: bitlab_pipeline(root, resize, crop, batch, workers, normalise=False),
            "bitlab_float": lambda: bitlab_pipeline(root, resize, crop, batch, workers, normalise=True),
            "torchvision": lambda: torchvision_pipeline(root, resize, crop, batch, workers)}
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):  # interleaved, so that a busy moment on a shared machine hurts every side
        for name, make in runs.items():
            rates[name].append(_rate(make(), images, warmup=2))
    out = {"resize": resize, "crop": crop, "batch": batch, "workers": workers, "rounds": rates}
    for name in runs:
        out[f"{name}_img_s"] = statistics.median(rates[name])
    out["speedup_uint8"] = out["bitlab_uint8_img_s"] / out["torchvision_img_s"]
    out["speedup_float"] = out["bitlab_float_img_s"] / out["torchvision_img_s"]
    return out


def model_only(model_name: str, crop: int, batch: int, steps: int, *, device: str = "cpu", precision: str = "fp32",
               channels_last: bool = False) -> list[float]:
    """Images/s of each forward + backward + SGD step on one batch of tensors already on the device."""
    from bitlab.models import create_model
    from bitlab.train.loop import autocast

    dev = torch.device(device)
    model = create_model(model_name, num_classes=4, zero_head=True, pretrained=False).to(dev).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    x, y = torch.randn(batch, 3, crop, crop, device=dev), torch.randint(0, 4, (batch,), device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        with autocast(dev, precision):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # the first steps allocate and pick kernels
            times.append(time.perf_counter() - t0)
    return [batch / t for t in times]


def training(root: Path, model_name: str, resize: int, crop: int, batch: int, steps: int, workers: int,
             **device_kw) -> tuple[list[float], float]:
    """Images/s of each step of `bitlab finetune`'s loop reading the JPEGs (the first two steps left
    out: they start the workers and allocate), and the share of step time spent waiting for data."""
    from bitlab.train import rundir
    from bitlab.train.finetune import FinetuneConfig, finetune

    for c in (root / "train").iterdir():  # a one-image-per-class val split (evaluation is not timed)
        (root / "val" / c.name).mkdir(parents=True, exist_ok=True)
        first = sorted(c.glob("*.jpg"))[0]
        if not (root / "val" / c.name / first.name).exists():
            os.link(first, root / "val" / c.name / first.name)
    with tempfile.TemporaryDirectory() as out:
        finetune(FinetuneConfig(model=model_name, random_init=True, data=str(root), out=out, batch_size=batch,
                                schedule=[1, steps, steps, steps, steps + 2], resolution=[resize, crop],
                                workers=workers, progress=False, checkpoint_every=0, log_every=1, **device_kw))
        rows = [r for r in rundir.read_metrics(Path(out) / "metrics.jsonl") if r["split"] == "train"]
    rows = rows[2:]
    return [r["images_per_s"] for r in rows], sum(r["data_s"] for r in rows) / sum(r["step_s"] for r in rows)


def gpu(root: Path, model_name: str, workers: int) -> list[dict]:
    """One GPU: the fine-tuning step at 128 and 480 px (bf16 autocast, channels-last), model-only and
    through the loop with the JPEG pipeline (`--batch-split 2` at 480 px)."""
    out = []
    for resize, crop, batch, split in ((160, 128, 256, 1), (512, 480, 64, 2)):
        only = statistics.median(model_only(model_name, crop, batch // split, 10, device="cuda", precision="bf16",
                                            channels_last=True))
        rates, waiting = training(root, model_name, resize, crop, batch, 12, workers, device="cuda", batch_split=split)
        train = statistics.median(rates)
        row = {"model": model_name, "crop": crop, "batch": batch, "batch_split": split,
               "model_only_img_s": only, "train_img_s": train, "data_path_cost": 1 - train / only,
               "data_wait_share": waiting,
               "max_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30, "gpu": torch.cuda.get_device_name()}
        torch.cuda.reset_peak_memory_stats()
        print(f"GPU {row['gpu']}: {model_name} at {crop} px, batch {batch} (split {split}), bf16, channels-last: "
              f"model-only {only:.0f} img/s, finetune loop with JPEGs {train:.0f} img/s "
              f"(data path {100 * row['data_path_cost']:.1f}%), peak {row['max_memory_gib']:.1f} GiB", file=sys.stderr)
        print(json.dumps({"bench": "finetune_gpu", **row}), flush=True)  # gpu_check.sh collects these lines
        out.append(row)
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=loader.default_workers())
    ap.add_argument("--model", default="R50x1")
    ap.add_argument("--part", choices=["all", "pipeline", "training", "gpu"], default="all")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", help="also write the results here")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_files, images, rounds, steps = (96, 96, 1, 4) if args.quick else (256, 384, 3, 6)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (load {os.getloadavg()[0]:.1f})",
               "torch_threads": torch.get_num_threads(), "workers": args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "jpegs"
        make_jpegs(root / "train", 512 if args.part == "gpu" else n_files)
        if args.part in ("all", "pipeline"):
            results["pipeline"] = [bench_pipeline(root, r, c, batch=32, workers=args.workers, images=images,
                                                  rounds=rounds) for r, c in ((512, 480), (160, 128))]
            for p in results["pipeline"]:
                print(f"input pipeline {p['resize']}->{p['crop']}, {p['workers']} workers: torchvision/PIL "
                      f"{p['torchvision_img_s']:.1f} img/s; bitlab uint8 {p['bitlab_uint8_img_s']:.1f} img/s "
                      f"({p['speedup_uint8']:.2f}x), normalised on this CPU {p['bitlab_float_img_s']:.1f} img/s "
                      f"({p['speedup_float']:.2f}x)")
        if args.part in ("all", "training"):
            batch, only, train, waits = 16, [], [], []
            model_only(args.model, 128, batch, 1)  # warm the kernels for both sides (same shapes)
            for _ in range(rounds):  # alternate the two, as for the pipeline
                only += model_only(args.model, 128, batch, steps)
                rates, waiting = training(root, args.model, 160, 128, batch, steps + 2, workers=1)
                train += rates
                waits.append(waiting)
            row = {"model": args.model, "crop": 128, "batch": batch, "model_only_img_s": only, "train_img_s": train,
                   "data_wait_share": statistics.median(waits)}
            for stat, agg in (("median", statistics.median), ("best", max)):  # best: the least disturbed step
                o, t = agg(only), agg(train)
                row[f"data_path_cost_{stat}"] = 1 - t / o
                print(f"training {args.model} at 128 px, batch {batch}, {stat} of {len(only)} steps each: model-only "
                      f"{o:.2f} img/s, finetune loop on the JPEGs {t:.2f} img/s -> data path costs {100 * (1 - t / o):.1f}%")
            print(f"  the loop waited for data {100 * row['data_wait_share']:.1f}% of its step time")
            results["training"] = row
        if args.part == "gpu":
            results["gpu"] = gpu(root, args.model, args.workers)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
