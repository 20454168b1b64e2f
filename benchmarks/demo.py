"""`bitlab demo` (what `make demo` runs) and the five notebooks end to end, against the model work
they cannot avoid, measured beside them in the same run.

    PYTHONPATH=. .venv/bin/python benchmarks/demo.py [--notebooks] [--max-load 1.5]

- demo: `python -m bitlab demo` in a fresh folder, as a user runs it (interpreter start-up,
  imports, make-ooc, every model's evaluation on both sets, the report); wall and CPU seconds.
- baseline: the demo's forward passes alone, in this process: each demo model (its registry
  name, its own input size) on as many ready-made normalised tensors as the demo evaluates,
  batch 32, softmax included. `ratio` = demo / baseline: what everything besides the models'
  arithmetic costs (decoding, resizing, composing, writing, drawing, start-up).
- notebooks (`--notebooks`): each notebook run top to bottom by papermill on the offline sample
  in a fresh folder, one after the other; wall seconds each and in total (issue 14's budget: the
  demo and the notebooks' total each under 3 minutes on 2 cores).

Waits (up to `--wait` s) for the 1-minute load average to fall below `--max-load` first, and
prints the load seen. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("ooc_tour", "robustness", "error_analysis", "duplicates", "fewshot")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _wait_quiet(max_load: float, wait: float) -> float:
    start = time.time()
    while os.getloadavg()[0] >= max_load and time.time() - start < wait:
        time.sleep(20)
    return os.getloadavg()[0]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_demo(tmp: Path) -> dict:
    before, start = _children_cpu(), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bitlab", "demo", "--out", str(tmp / "demo_out"),
                           "--figures", str(tmp / "figures")], cwd=tmp, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return {"wall_s": round(wall, 1), "cpu_s": round(_children_cpu() - before, 1)}


def demo_images(out: Path) -> dict[str, tuple[int, int]]:
    """(images evaluated, input size) per demo model, read from the demo's own summaries."""
    work: dict[str, list[int]] = {}
    for summary in sorted((out / "results").glob("*/summary.json")):
        s = json.loads(summary.read_text())
        n = s["dataset"]["num_images"] + sum(v.get("n", 0) for v in s.get("context", {}).get("variants", {}).values())
        name = s["model"]["name"]
        size = s["model"]["data_config"]["input_size"]
        work.setdefault(name, [0, size])[0] += n
    return {k: (v[0], v[1]) for k, v in work.items()}


def run_baseline(work: dict[str, tuple[int, int]], batch: int = 32) -> float:
    from bitlab.models import create_model, prepare_for_inference

    total = 0.0
    for name, (n, size) in work.items():
        model = prepare_for_inference(create_model(name, pretrained=name.startswith("efficientnet"),
                                                   image_size=size), "cpu", fuse=True)
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, n, batch):
                model(x[:min(batch, n - i)]).float().softmax(dim=-1)
        total += time.perf_counter() - start
    return total


def run_notebooks(tmp: Path) -> dict[str, float]:
    times = {}
    for name in NOTEBOOKS:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks" / f"{name}.ipynb"),
                               str(tmp / f"{name}.out.ipynb"), "-p", "WORK", str(tmp / "nb" / name),
                               "-p", "FIGURES", str(tmp / "nb_figures"), "--cwd", str(ROOT / "notebooks"),
                               "-k", "python3", "--no-progress-bar"], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name}: {done.stderr[-3000:]}")
        times[name] = round(time.perf_counter() - start, 1)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notebooks", action="store_true", help="also run the five notebooks")
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--wait", type=float, default=900)
    args = ap.parse_args()
    load = [_wait_quiet(args.max_load, args.wait)]
    with tempfile.TemporaryDirectory(prefix="bitlab-demo-bench-") as d:
        tmp = Path(d)
        demo = run_demo(tmp)
        load.append(os.getloadavg()[0])
        work = demo_images(tmp / "demo_out")
        baseline = run_baseline(work)
        result = {"demo": demo, "baseline_forward_s": round(baseline, 1), "ratio": round(demo["wall_s"] / baseline, 2),
                  "images_per_model": work}
        if args.notebooks:
            nb = run_notebooks(tmp)
            result["notebooks_s"] = nb
            result["notebooks_total_s"] = round(sum(nb.values()), 1)
        load.append(os.getloadavg()[0])
    result.update({"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "load_1min": [round(x, 2) for x in load]})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
