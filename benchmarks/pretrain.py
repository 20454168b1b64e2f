"""Pre-training speed: scaling over processes (CPU), and the GPU step against a timm-style loop.

    python benchmarks/pretrain.py --part cpu      # 1 vs 2 processes on this machine (numbers for RESULTS.md)
    python benchmarks/pretrain.py --part gpu      # one GPU: R50x1 at 224 px, bf16, channels-last

1. CPU scaling: `bitlab pretrain` (R14x0.5 at 64 px, global batch 32, real JPEGs decoded and
   Inception-cropped by OpenCV in each process) run three ways, interleaved over rounds:
   one process with one thread (the baseline), two torchrun processes (Gloo DDP) with one thread
   each, and one process with two threads (the other way to use the same two cores). Images/s
   are the loop's own per-step figures after the first steps. Scaling efficiency =
   2-process images/s / (2 x 1-process images/s).
2. GPU: images/s per GPU of R50x1 at 224 px (global batch 128, bf16 autocast, channels-last) on
   tensors already on the device, for
   - the baseline: a minimal timm-style training loop — timm's `train.py` is not in the timm wheel,
     so this is its core written out with timm's own pieces: `timm.create_model
     ("resnetv2_50x1_bit")`, `timm.optim.create_optimizer_v2("sgd", momentum 0.9, weight decay 1e-4
     off norms and biases)`, autocast bf16, channels-last inputs, cross-entropy, backward, step;
     no per-step host sync (train.py syncs only at log intervals);
   - `bitlab pretrain`'s engine (`loop.run` with the pretrain recipe) on bitlab's R50x1 and on the
     same timm model: the loop adds one small all-reduce + host sync per step (loss, stop flag,
     gradient norm for the NaN guard) and per-step lr setting;
   and `bitlab pretrain` end to end on real JPEGs (decode + Inception crop in OpenCV workers),
   to show the data path's share. Ratios are against the baseline run in the same process.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bitlab.train.rundir import read_metrics  # noqa: E402
from photos import make_jpegs  # noqa: E402 (benchmarks/)


def _rates(run_dir: Path, skip: int) -> list[float]:
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    return [r["images_per_s"] for r in rows[skip:]]


# ----------------------------------------------------------------------------- CPU scaling
def cpu_run(data: Path, out: Path, *, nproc: int, threads: int, steps: int, batch: int, crop: int) -> float:
    """Median images/s (whole job) of one `bitlab pretrain` run after its first steps."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO_ROOT)}
    epochs = steps * batch / sum(1 for _ in data.rglob("*.jpg"))
    args = ["--model", "R14x0.5", "--data", str(data), "--out", str(out), "--batch-size", str(batch),
            "--epochs", f"{epochs:.6f}", "--decay-epochs", "--warmup-steps", "10", "--crop", str(crop),
            "--workers", "0", "--log-every", "1", "--checkpoint-every", "0", "--no-progress", "--device", "cpu"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "bitlab", "pretrain", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "bitlab", "pretrain", *args]
    job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if job.returncode:
        raise RuntimeError(job.stderr[-3000:])
    return statistics.median(_rates(out, skip=3))


def cpu(rounds: int, steps: int, batch: int, crop: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = make_jpegs(Path(tmp) / "data", 256, longest=160)
        results: dict[str, list[float]] = {"1 process x 1 thread": [], "2 processes x 1 thread": [],
                                           "1 process x 2 threads": []}
        loads: list[float] = []  # 1-minute load average after each run: other jobs share these cores
        for r in range(rounds):  # interleaved, so that load from other jobs hits all three alike
            for name, nproc, threads in (("1 process x 1 thread", 1, 1), ("2 processes x 1 thread", 2, 1),
                                         ("1 process x 2 threads", 1, 2)):
                rate = cpu_run(data, Path(tmp) / f"run{r}_{nproc}_{threads}", nproc=nproc, threads=threads,
                               steps=steps, batch=batch, crop=crop)
                results[name].append(rate)
                loads.append(os.getloadavg()[0])
                print(f"round {r}: {name}: {rate:.1f} img/s (load average {loads[-1]:.2f})", file=sys.stderr,
                      flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    one, two, threads2 = med["1 process x 1 thread"], med["2 processes x 1 thread"], med["1 process x 2 threads"]
    row = {"bench": "pretrain_cpu_scaling", "model": "R14x0.5", "crop": crop, "global_batch": batch, "steps": steps,
           "rounds": rounds, "img_s": med, "all_img_s": results, "speedup_2proc": two / one,
           "efficiency_2proc": two / (2 * one), "ddp_vs_threads": two / threads2,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
           "load_avg_per_run": loads}
    print(json.dumps(row), flush=True)
    return row


# ----------------------------------------------------------------------------- GPU
class DeviceData:
    """`StepData` of fixed uint8 batches already on the device (what a perfect input pipeline gives)."""

    def __init__(self, batch: int, crop: int, classes: int, device: torch.device, mean, std) -> None:
        from bitlab.data.transforms import normalize

        g = torch.Generator(device="cpu").manual_seed(0)
        images = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8, generator=g).to(device)
        self.x = normalize(images, mean, std)
        self.y = torch.randint(0, classes, (batch,), generator=g).to(device)

    def steps(self, start: int):
        while True:
            yield [(self.x, self.y)]


def bitlab_engine(model_name: str, batch: int, crop: int, steps: int, dev: torch.device, classes: int = 1000) -> float:
    """Median images/s of `loop.run` with the pretrain recipe (SGD, decay groups, softmax CE)."""
    from bitlab.train import pretrain as P
    from bitlab.train.distributed import DistInfo
    from bitlab.train.loop import LoopConfig, run

    torch.manual_seed(0)
    model = P.build_model(model_name, classes, multi_label=False)
    cfg = model.data_config
    schedule = P.make_schedule(1_281_167, batch, epochs=90, decay_epochs=(30, 60, 80))
    with tempfile.TemporaryDirectory() as out:
        run(model, make_optimizer=lambda m: torch.optim.SGD(P.param_groups(m, P.WEIGHT_DECAY), lr=0.1,
                                                            momentum=P.MOMENTUM),
            data=DeviceData(batch, crop, classes, dev, cfg.mean, cfg.std), lr_at=schedule.lr, loss_fn=P.softmax_xent,
            run_dir=out, config=LoopConfig(total_steps=steps + 5, checkpoint_every=0, log_every=5, precision="bf16",
                                           channels_last=True, progress=False),
            dist=DistInfo(device=dev), model_name=model_name)
        return statistics.median(_rates(Path(out), skip=1))  # the first 5 steps pick kernels and allocate


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timm_style(batch: int, crop: int, steps: int, dev: torch.device, classes: int = 1000) -> float:
    """Images/s of the baseline: timm's train.py core with timm's own pieces (module docs)."""
    import timm
    import timm.optim

    torch.manual_seed(0)
    model = timm.create_model("resnetv2_50x1_bit", num_classes=classes).to(dev).to(memory_format=torch.channels_last)
    model.train()
    opt = timm.optim.create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=1e-4, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss().to(dev)
    cfg = timm.data.resolve_data_config({}, model=model)
    data = DeviceData(batch, crop, classes, dev, cfg["mean"], cfg["std"])
    x, y = data.x.contiguous(memory_format=torch.channels_last), data.y
    warm = 5
    for i in range(warm + steps):
        if i == warm:
            _sync(dev)
            t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(dev)
    return batch * steps / (time.perf_counter() - t0)


def end_to_end(batch: int, crop: int, steps: int, workers: int, dev: torch.device) -> tuple[float, float]:
    """`bitlab pretrain` R50x1 on real ~500x375 JPEGs: median images/s and the share of step time
    spent waiting for data."""
    from bitlab.train.pretrain import PretrainConfig, pretrain

    with tempfile.TemporaryDirectory() as tmp:
        n = min(2048, max(256, steps * batch))
        data = make_jpegs(Path(tmp) / "data", n, classes=8, longest=500)
        out = Path(tmp) / "run"
        pretrain(PretrainConfig(model="R50x1", data=str(data), out=str(out), batch_size=batch,
                                epochs=steps * batch / n, decay_epochs=[], warmup_steps=100, crop=crop,
                                workers=workers, log_every=1, checkpoint_every=0, progress=False,
                                device=str(dev), precision="bf16", channels_last=True))
        rows = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"][5:]
    return (statistics.median(r["images_per_s"] for r in rows),
            sum(r.get("data_s", 0.0) for r in rows) / max(sum(r.get("step_s", 0.0) for r in rows), 1e-9))


def gpu(batch: int, crop: int, steps: int, rounds: int, workers: int, dev: torch.device) -> dict:
    rates: dict[str, list[float]] = {"timm-style loop, timm resnetv2_50x1_bit": [],
                                     "bitlab loop, bitlab R50x1": [], "bitlab loop, timm resnetv2_50x1_bit": []}
    for r in range(rounds):
        rates["timm-style loop, timm resnetv2_50x1_bit"].append(timm_style(batch, crop, steps, dev))
        rates["bitlab loop, bitlab R50x1"].append(bitlab_engine("R50x1", batch, crop, steps, dev))
        rates["bitlab loop, timm resnetv2_50x1_bit"].append(
            bitlab_engine("resnetv2_50x1_bit", batch, crop, steps, dev))
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()), file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med["timm-style loop, timm resnetv2_50x1_bit"]
    e2e, waiting = end_to_end(batch, crop, max(steps, 30), workers, dev)
    on_gpu = dev.type == "cuda"
    row = {"bench": "pretrain_gpu", "gpu": torch.cuda.get_device_name() if on_gpu else f"none ({dev})",
           "crop": crop, "batch": batch,
           "precision": "bf16", "channels_last": True, "img_s": med, "all_img_s": rates,
           "ratio_vs_timm": {k: v / base for k, v in med.items()},
           "end_to_end_jpeg_img_s": e2e, "end_to_end_data_wait_share": waiting, "workers": workers,
           "max_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if on_gpu else None,
           "torch": torch.__version__}
    print(json.dumps(row), flush=True)
    return row


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, help="timed steps per run (default: cpu 30, gpu 30)")
    ap.add_argument("--batch", type=int, help="global batch (default: cpu 32, gpu 128)")
    ap.add_argument("--crop", type=int, help="crop size (default: cpu 64, gpu 224)")
    ap.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 16), help="end-to-end loader workers")
    ap.add_argument("--device", default="cuda", help="gpu part: the device (cpu only to smoke-test this script)")
    ap.add_argument("--json", help="also write the result here")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.part == "cpu":
        row = cpu(args.rounds, args.steps or 30, args.batch or 32, args.crop or 64)
    else:
        dev = torch.device(args.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            sys.exit("--part gpu needs a CUDA device")
        torch.backends.cudnn.benchmark = True  # as timm's train.py
        row = gpu(args.batch or 128, args.crop or 224, args.steps or 30, args.rounds, args.workers, dev)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
