"""EfficientNet-Lite inference as `bitlab evaluate` runs it (BatchNorm folded into the convs) vs the
same timm model as timm runs it, in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/batchnorm_fold.py [--models lite0 lite2 --batch 32 --rounds 5]

Each model at its own input size (Lite0 224, Lite1 240, Lite2 260 px) with its real offline weights,
three ways on the same random batch, same thread count: timm's model as `timm.create_model` gives
it (contiguous, timm validate.py's default), the same with `--channels-last`, and bitlab's
`prepare_for_inference(..., fuse=True)` (every BatchNorm after a conv folded into it, channels-last).
Rounds are interleaved (timm, timm channels-last, bitlab, ...) after waiting for a quiet machine;
images/s from the medians, each side's spread and its CPU seconds per image printed, with the
largest logit difference between bitlab's and timm's outputs. Prints one JSON line per model.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

from bitlab.models import create_model, prepare_for_inference

import machine

SIZES = {"lite0": 224, "lite1": 240, "lite2": 260}  # each model's own resolution (its data config)


def _timed(model: torch.nn.Module, x: torch.Tensor, iters: int) -> tuple[float, float]:
    """(wall, CPU) seconds of `iters` forward passes after a warm-up pass."""
    with torch.inference_mode():
        model(x)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(iters):
            model(x)
    return time.perf_counter() - start, time.process_time() - cpu


def bench(name: str, args: argparse.Namespace) -> dict:
    timm_model = create_model(f"efficientnet_{name}.offline_in1k", pretrained=True).eval()  # a timm module
    sides = {"timm": (timm_model, torch.contiguous_format),
             "timm_channels_last": (copy.deepcopy(timm_model).to(memory_format=torch.channels_last),
                                    torch.channels_last),
             "bitlab": (prepare_for_inference(copy.deepcopy(timm_model), "cpu", fuse=True), torch.channels_last)}
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, SIZES[name], SIZES[name])
    with torch.inference_mode():
        ref, ours = timm_model(x), sides["bitlab"][0](x.contiguous(memory_format=torch.channels_last))
    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for side, (model, fmt) in sides.items():
            wall, c = _timed(model, x.contiguous(memory_format=fmt), args.iters)
            times[side].append(wall)
            cpu[side].append(c)
    n = args.batch * args.iters
    ips = {k: n / statistics.median(v) for k, v in times.items()}
    return {"model": f"efficientnet_{name}", "size": SIZES[name], "batch": args.batch,
            **{f"{k}_img_s": round(v, 2) for k, v in ips.items()},
            "ratio_vs_timm": round(ips["bitlab"] / ips["timm"], 3),
            "ratio_vs_timm_channels_last": round(ips["bitlab"] / ips["timm_channels_last"], 3),
            "spread_img_s": {k: [round(n / max(v), 2), round(n / min(v), 2)] for k, v in times.items()},
            "cpu_ms_per_img": {k: round(1000 * statistics.median(v) / n, 1) for k, v in cpu.items()},
            "max_logit_diff": float((ours - ref).abs().max()), "same_top1": bool((ours.argmax(1) == ref.argmax(1)).all()),
            "load_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=sorted(SIZES), default=["lite0", "lite2"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quiet-load", type=float, default=1.5, help="wait for a 1-minute load average below this")
    ap.add_argument("--quiet-wait", type=float, default=1800, help="seconds to wait for it at most")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    machine.wait_until_quiet(args.quiet_load, limit_s=args.quiet_wait)
    for name in args.models:
        print(json.dumps({**bench(name, args), "threads": args.threads, **machine.describe(torch.device("cpu"))}),
              flush=True)


if __name__ == "__main__":
    main()
