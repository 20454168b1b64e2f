"""bitlab R50x1 vs timm resnetv2_50x1_bit: inference and training-step images/s, in one run.

    .venv/bin/python benchmarks/models.py [--batch 16 --size 128 --rounds 5 --threads 2]

Both models get identical weights, batch, resolution and thread count; runs are interleaved
(bitlab, timm, bitlab, timm, ...) so that load from other processes hits both alike, and the
ratio is taken from the medians. Prints one JSON line per (mode, memory format).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch

from bitlab.models import bitlab_to_timm, create_model


def _timed(fn, iters: int) -> float:
    fn()  # warm-up (allocator, oneDNN primitive cache)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return time.perf_counter() - start


def _step_fn(model, x, y, train: bool):
    if not train:
        def infer():
            with torch.inference_mode():
                model(x)
        return infer
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", choices=["none", "bf16"], default="none")
    return ap


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = create_model("R50x1", num_classes=1000, pretrained=False).to(device)
    theirs = timm.create_model("resnetv2_50x1_bit", num_classes=1000).to(device)
    theirs.load_state_dict(bitlab_to_timm(ours.state_dict()))
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    for train in (False, True):
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            xs = x.contiguous(memory_format=fmt)
            fns = {}
            for name, model in (("bitlab", ours), ("timm", theirs)):
                model.to(memory_format=fmt).train(train)
                fns[name] = _step_fn(model, xs, y, train)
            times = {"bitlab": [], "timm": []}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
                        times[name].append(_timed(fn, args.iters))
                    if device.type == "cuda":
                        torch.cuda.synchronize()
            ips = {k: args.batch * args.iters / statistics.median(v) for k, v in times.items()}
            print(json.dumps({
                "mode": "train" if train else "inference", "channels_last": channels_last, "device": str(device),
                "amp": args.amp, "batch": args.batch, "size": args.size, "threads": args.threads,
                "bitlab_img_s": round(ips["bitlab"], 2), "timm_img_s": round(ips["timm"], 2),
                "ratio": round(ips["bitlab"] / ips["timm"], 3),
            }), flush=True)


if __name__ == "__main__":
    main()
