"""`bitlab evaluate` on an OOC set vs timm's validation loop and vs the model's forward passes alone.

    PYTHONPATH=. .venv/bin/python benchmarks/evaluate.py [--images 324 --rounds 3 --threads 2 --workers N]

The data: an out-of-context set built by `make-ooc` from the inputs of benchmarks/ooc.py (the
embedded sample's photos and scikit-image's textures at upstream sizes): 512 px PNGs in class
folders with manifest.csv, `--images` of them (all 81 foregrounds x an even subset of the 41 background categories).
The model: R50x1 (random weights saved once to a bitlab file, so every side loads the same ones)
at its own resolution, 224 px. Three ways through the same images, same batch and threads:

- bitlab: `bitlab.eval.evaluate.evaluate` end to end: model built from the file and fused, OpenCV
  decode (by default, on the CPU, in threads of the main process between batches:
  `loader.inference_workers`), uint8 batches normalised once per batch, predictions.csv and
  summary.json written;
- timm: the loop of timm's `validate.py` (`create_dataset` + `create_loader`: PIL decode and
  torchvision resize/normalise in `--workers` processes, 4 by default; `model(input)`; `timm.utils.accuracy`) on
  timm's `resnetv2_50x1_bit` with the same weights and pre-processing (224 px, crop 1.0, mean/std
  0.5, bilinear), as timm runs it by default (contiguous) and with its `--channels-last` flag;
- model only: bitlab's prepared model (`prepare_for_inference(..., fuse=True)`, built outside the
  timing) on the same number of images as ready-made normalised tensors, softmax included: what
  evaluation would cost with a free data path. `data_path_share` = 1 - model-only / evaluate time;
  `data_path_share_in_run` = 1 - (its forward passes' seconds) / (its wall time) inside each bitlab
  run, which the round-to-round noise of a shared machine (10-20 % here) does not reach.

Runs are interleaved (bitlab, timm, timm channels-last, model only) round by round after waiting
for a quiet machine; ratios from the medians, each side's spread printed, in wall time and in CPU
seconds of the process and its loader workers (which other jobs' load moves far less). Prints one
JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import timm
import timm.data
import timm.utils
import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from bitlab.data.transforms import BIT_MEAN, BIT_STD
from bitlab.eval.evaluate import EvaluateConfig, evaluate
from bitlab.models import checkpoints, create_model, load_weights, prepare_for_inference
from bitlab.models.resnetv2 import ResNetV2
from bitlab.ooc.spec import Selection

import machine
import ooc

MODEL = "R50x1"
TIMM_MODEL = "resnetv2_50x1_bit"
TIMM_WORKERS = 4  # timm validate.py's default --workers


def make_ooc_set(root: Path, images: int, workers: int) -> tuple[Path, int]:
    """Build about `images` 512 px OOC images: every foreground (each class needs its objects) on
    an evenly spaced subset of the background categories."""
    inputs = ooc.prepare(root / "inputs")
    fgs, bgs = inputs["fgs"], inputs["bgs"]
    k = min(len(bgs), max(1, round(images / len(fgs))))
    inputs["selection"] = Selection(fgs, bgs[::len(bgs) // k][:k]).save(root / "subset.csv")
    ooc.run_build(inputs, root / "ooc", 512, workers, "png")
    return root / "ooc", len(fgs) * k


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the loader workers, joined at the end
    of each pass): what another job's load moves far less than wall time."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


class ForwardClock:
    """Wall seconds spent inside the top-level forward of every `ResNetV2` called while it is entered
    (global module hooks: the model is built inside `evaluate`)."""

    def __init__(self) -> None:
        self.seconds, self._start = 0.0, None

    def _pre(self, module: torch.nn.Module, _) -> None:
        if isinstance(module, ResNetV2):
            self._start = time.perf_counter()

    def _post(self, module: torch.nn.Module, _, __) -> None:
        if isinstance(module, ResNetV2) and self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def __enter__(self) -> "ForwardClock":
        self._hooks = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *_) -> None:
        for h in self._hooks:
            h.remove()


def run_bitlab(data: Path, weights: Path, out: Path, args, forward: list[float]) -> float:
    """`evaluate` end to end; appends to `forward` the seconds its model's forward passes took."""
    start = time.perf_counter()
    with ForwardClock() as clock:
        evaluate(EvaluateConfig(model=MODEL, pretrained=str(weights), data=str(data), out=str(out),
                                batch_size=args.batch, workers=args.workers, device=args.device, progress=False))
    forward.append(clock.seconds)
    return time.perf_counter() - start


def run_timm(data: Path, weights: Path, args, channels_last: bool) -> float:
    """timm validate.py's loop, CPU path (no prefetcher); `channels_last` = its --channels-last flag."""
    start = time.perf_counter()
    model = load_weights(timm.create_model(TIMM_MODEL, num_classes=1000), weights).to(args.device).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    dataset = timm.data.create_dataset(name="", root=str(data), split="validation")
    loader = timm.data.create_loader(dataset, input_size=(3, 224, 224), batch_size=args.batch, use_prefetcher=False,
                                     interpolation="bilinear", mean=BIT_MEAN, std=BIT_STD,
                                     num_workers=TIMM_WORKERS if args.workers is None else args.workers,
                                     crop_pct=1.0, crop_mode="center", device=torch.device(args.device))
    top1 = top5 = 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(args.device).contiguous(memory_format=fmt), y.to(args.device)
            acc1, acc5 = timm.utils.accuracy(model(x), y, topk=(1, 5))
            top1 += acc1.item() * len(x)
            top5 += acc5.item() * len(x)
    return time.perf_counter() - start


def run_model_only(model: torch.nn.Module, n: int, args) -> float:
    """The forward passes evaluation makes (same batches, softmax), on ready tensors."""
    x = torch.randn(args.batch, 3, 224, 224, device=args.device).contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n, args.batch):
            model(x[:min(args.batch, n - i)]).float().softmax(dim=-1).cpu()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=324)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--workers", type=int, default=None,
                    help="loader processes on every side (default: each side's own: bitlab's inference_workers, "
                         f"timm validate.py's {TIMM_WORKERS})")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quiet-load", type=float, default=1.5, help="wait for a load average below this")
    ap.add_argument("--quiet-wait", type=float, default=1800, help="seconds to wait for it at most")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bitlab-bench-"))
    try:
        data, n = make_ooc_set(tmp, args.images, args.workers or 0)  # 0: a build thread per core
        torch.manual_seed(0)
        weights = checkpoints.save_bitlab(create_model(MODEL, num_classes=1000, pretrained=False), tmp / "r50x1.pt", name=MODEL)
        prepared = prepare_for_inference(create_model(MODEL, pretrained=weights), args.device, fuse=True)
        if args.device == "cpu":
            machine.wait_until_quiet(args.quiet_load, limit_s=args.quiet_wait)
        load = os.getloadavg()[0]
        forward: list[float] = []  # seconds inside the model's forward in each bitlab run
        runs = {"bitlab": lambda r: run_bitlab(data, weights, tmp / f"out{r}", args, forward),
                "timm": lambda r: run_timm(data, weights, args, channels_last=False),
                "timm_cl": lambda r: run_timm(data, weights, args, channels_last=True),
                "model_only": lambda r: run_model_only(prepared, n, args)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(args.rounds):
            for name, run in runs.items():
                c = cpu_seconds()
                times[name].append(run(r))
                cpu[name].append(cpu_seconds() - c)
        med = {k: statistics.median(v) for k, v in times.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        print(json.dumps({
            "model": MODEL, "timm_model": TIMM_MODEL, "resolution": 224, "images": n, "ooc_size": 512,
            "device": args.device, **machine.describe(torch.device(args.device)), "batch": args.batch,
            "threads": args.threads, "workers": args.workers,
            **{f"{k}_img_s": round(n / v, 2) for k, v in med.items()},
            "ratio_vs_timm": round(med["timm"] / med["bitlab"], 3),
            "ratio_vs_timm_channels_last": round(med["timm_cl"] / med["bitlab"], 3),
            "data_path_share": round(1 - med["model_only"] / med["bitlab"], 3),
            # The same share inside each bitlab run (its forward passes against its own wall time):
            # free of the round-to-round noise between runs on a shared machine.
            "data_path_share_in_run": [round(1 - f / t, 3) for f, t in zip(forward, times["bitlab"])],
            "data_path_share_in_run_median": round(statistics.median(1 - f / t for f, t in zip(forward, times["bitlab"])), 3),
            "cpu_s_per_img": {k: round(v / n, 4) for k, v in med_cpu.items()},
            "ratio_vs_timm_cpu_time": round(med_cpu["timm"] / med_cpu["bitlab"], 3),
            "ratio_vs_timm_channels_last_cpu_time": round(med_cpu["timm_cl"] / med_cpu["bitlab"], 3),
            "data_path_share_cpu_time": round(1 - med_cpu["model_only"] / med_cpu["bitlab"], 3),
            "spread_img_s": {k: [round(n / max(v), 2), round(n / min(v), 2)] for k, v in times.items()},
            "load_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
