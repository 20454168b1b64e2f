"""bitlab R50x1 vs timm resnetv2_50x1_bit: inference and training-step images/s, in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/models.py [--batch 8 --size 128 --rounds 5 --threads 2]

Both models get identical weights, batch, resolution and thread count; runs are interleaved
(bitlab, timm, bitlab, timm, ...) so that load from other processes hits both alike, and the
ratio is taken from the medians (each side's slowest and fastest round are printed as its spread).
Each row also gives the ratio of the process's CPU seconds per image (`ratio_cpu_time`), which
another job's load moves far less than wall time; with `--threads 1` it is the work each model does.
Inference: bitlab as `bitlab evaluate` runs it, its weight standardisation folded into the kernels
(`fuse_weight_standardization`), and, as `bitlab_cached`, the unfused model whose StdConv2d reuse
their standardised kernels (what `bitlab.eval.predict` gets for a model it must not change);
timm's model as timm runs it. Training: both models as they train. With `--compile` every model
is `torch.compile`d first (compile time excluded, printed). On a CPU the script first waits for a
quiet machine (1-minute load average below `--quiet-load`, checked each minute, up to 30 min).
Prints one JSON line per (mode, memory format).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import timm
import torch

from bitlab.models import bitlab_to_timm, create_model, fuse_weight_standardization

import machine


def _timed(fn, iters: int) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of `iters` calls after one warm-up call."""
    fn()  # warm-up (allocator, oneDNN primitive cache)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    return time.perf_counter() - start, time.process_time() - cpu


def _step_fn(model, x, y, train: bool, device: torch.device):
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    if not train:
        def infer():
            with torch.inference_mode():
                model(x)
            sync()
        return infer
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sync()
    return step


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", choices=["none", "bf16"], default="none")
    ap.add_argument("--modes", nargs="+", choices=["inference", "train"], default=["inference", "train"])
    ap.add_argument("--formats", nargs="+", choices=["contiguous", "channels_last"],
                    default=["contiguous", "channels_last"])
    ap.add_argument("--compile", action="store_true", help="torch.compile every model (bitlab's and timm's)")
    ap.add_argument("--quiet-load", type=float, default=1.5, help="CPU runs wait for a load average below this")
    ap.add_argument("--quiet-wait", type=float, default=1800, help="seconds to wait for it at most")
    return ap


def _contestants(ours, theirs, train: bool, fmt: torch.memory_format, compile_: bool) -> dict:
    if train:
        models = {"bitlab": ours, "timm": theirs}
    else:  # evaluation's models: fused, and the cached path; both fresh copies of the same weights
        models = {"bitlab": fuse_weight_standardization(ours), "bitlab_cached": copy.deepcopy(ours), "timm": theirs}
    models = {k: m.to(memory_format=fmt).train(train) for k, m in models.items()}
    return {k: torch.compile(m) for k, m in models.items()} if compile_ else models


def _run(ours, theirs, x, y, train: bool, fmt: torch.memory_format, args, device: torch.device) -> dict:
    xs = x.contiguous(memory_format=fmt)
    fns = {}
    for name, model in _contestants(ours, theirs, train, fmt, args.compile).items():
        fns[name] = _step_fn(model, xs, y, train, device)
    compile_s = {}
    if args.compile:  # compile outside the timing: the first call of each
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            compile_s[name] = round(time.perf_counter() - start, 1)
    times = {name: [] for name in fns}
    cpu_times = {name: [] for name in fns}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, fn in fns.items():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
                wall, cpu = _timed(fn, args.iters)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    n = args.batch * args.iters
    ips = {k: n / statistics.median(v) for k, v in times.items()}
    row = {"mode": "train" if train else "inference", "channels_last": fmt == torch.channels_last,
           **{f"{k}_img_s": round(v, 2) for k, v in ips.items()},
           "ratio": round(ips["bitlab"] / ips["timm"], 3)}
    if "bitlab_cached" in ips:
        row["ratio_cached"] = round(ips["bitlab_cached"] / ips["timm"], 3)
    row["spread_img_s"] = {k: [round(n / max(v), 2), round(n / min(v), 2)] for k, v in times.items()}
    # CPU seconds per image: what other jobs' load changes least (one thread: no OpenMP spin-waits)
    cpu = {k: statistics.median(v) / n for k, v in cpu_times.items()}
    row["cpu_s_per_img"] = {k: round(v, 4) for k, v in cpu.items()}
    row["ratio_cpu_time"] = round(cpu["timm"] / cpu["bitlab"], 3)
    if "bitlab_cached" in cpu:
        row["ratio_cached_cpu_time"] = round(cpu["timm"] / cpu["bitlab_cached"], 3)
    row["load_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    if compile_s:
        row["compile_s"] = compile_s
    return row


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        machine.wait_until_quiet(args.quiet_load, limit_s=args.quiet_wait)
    torch.manual_seed(0)
    ours = create_model("R50x1", num_classes=1000, pretrained=False).to(device)
    theirs = timm.create_model("resnetv2_50x1_bit", num_classes=1000).to(device)
    theirs.load_state_dict(bitlab_to_timm(ours.state_dict()))
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    setup = {"device": str(device), **machine.describe(device), "amp": args.amp, "compile": args.compile,
             "batch": args.batch, "size": args.size, "threads": args.threads, "rounds": args.rounds,
             "iters": args.iters}
    for mode in args.modes:  # inference first: training changes the weights
        for fmt in args.formats:
            memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            row = _run(ours, theirs, x, y, mode == "train", memory_format, args, device)
            print(json.dumps({**row, **setup}), flush=True)


if __name__ == "__main__":
    main()
