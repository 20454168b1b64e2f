"""Three models evaluated together (`bitlab evaluate --model A --model B --model C`) against three
separate `bitlab evaluate` runs, on the same images and threads.

    PYTHONPATH=. .venv/bin/python benchmarks/evaluate_many.py [--copies 1 --rounds 3 --max-load 1.5]

The data: the embedded sample built by `make-ooc --demo` (composites and their variants: what
`evaluate` reads for the context scores), optionally as `--copies` copies of it in one manifest
folder (a bigger set of the same kind, to see how the ratio moves with the number of images).

Two ways, each timed as the user meets it:
- `cli`: separate = three `python -m bitlab evaluate --model X` processes one after the other;
  together = one process with the three `--model`s. Interpreter start-up, imports and model
  construction are included: that is what a second and third run cost.
- `inprocess`: separate = `evaluate()` three times in this process; together = `evaluate_models()`
  once. Start-up excluded: what remains is the shared pass (each file read and decoded once per
  batch for all models; models of one input size and crop share its view).

Before each round the 1-minute load average must fall below `--max-load` (polled every 20 s, up to
`--wait` s; the JSON says when it did not); the ways are interleaved and their order alternates
round by round; ratios are of the medians. Prints a JSON line per round, then the result.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bitlab.eval.evaluate import EvaluateConfig, evaluate, evaluate_models
from bitlab.ooc.build import build_demo

SOURCE = Path(__file__).resolve().parents[1]
# The three real ImageNet models that install offline: 224, 240 and 260 px, so no two share a view
# (what is shared is reading and decoding each file).
MODELS = ["efficientnet_lite0.offline_in1k", "efficientnet_lite1.offline_in1k", "efficientnet_lite2.offline_in1k"]


def make_data(root: Path, copies: int) -> Path:
    """The demo build; with copies > 1, its composites and variants `copies` times in one build-like
    folder (every copy's files renamed, the manifests extended), so the context scores still pair."""
    built = build_demo(root / "demo")
    if copies == 1:
        return built
    out = root / f"x{copies}"
    for manifest in [built / "manifest.csv", *sorted(built.glob("variants/*/manifest.csv"))]:
        folder = manifest.parent.relative_to(built)
        with manifest.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        copied = []
        for c in range(copies):
            for r in rows:
                rel = f"copy{c}/{r['file']}"
                (out / folder / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(built / folder / r["file"], out / folder / rel)
                tag = lambda v: f"{v}#{c}" if v else v  # noqa: E731 (keeps each copy's pairs apart)
                copied.append({**r, "file": rel, "fg_uid": tag(r["fg_uid"]), "bg_uid": tag(r["bg_uid"]),
                               "pair_bg_uid": tag(r["pair_bg_uid"])})
        with (out / folder / "manifest.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(copied)
    return out


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def wait_quiet(max_load: float, wait: float) -> tuple[float, bool]:
    """Poll the 1-minute load average until it is below `max_load` (or `wait` s passed)."""
    deadline = time.monotonic() + wait
    while True:
        load = os.getloadavg()[0]
        if load < max_load or time.monotonic() > deadline:
            return load, load < max_load
        time.sleep(20)


def cli(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": f"{SOURCE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bitlab", "evaluate", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_way(way: str, data: Path, out: Path, batch: int) -> float:
    shutil.rmtree(out, ignore_errors=True)  # no resumed chunks: every way starts from nothing
    common = ["--data", str(data), "--batch-size", str(batch), "--no-progress"]
    if way == "cli_separate":
        return sum(cli(["--model", m, *common, "--out", str(out / m)]) for m in MODELS)
    if way == "cli_together":
        return cli([a for m in MODELS for a in ("--model", m)] + common + ["--out", str(out)])
    start = time.perf_counter()
    base = EvaluateConfig(model=MODELS[0], data=str(data), out=str(out), batch_size=batch, progress=False)
    if way == "inprocess_separate":
        for m in MODELS:
            evaluate(EvaluateConfig(model=m, data=str(data), out=str(out / m), batch_size=batch, progress=False))
    else:
        evaluate_models(base, [{"model": m} for m in MODELS])
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--wait", type=float, default=1800)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bitlab-bench-many-"))
    try:
        data = make_data(tmp, args.copies)
        images = sum(1 for _ in data.rglob("*.png"))
        ways = ["cli_separate", "cli_together", "inprocess_separate", "inprocess_together"]
        times: dict[str, list[float]] = {w: [] for w in ways}
        loads, quiet = [], True
        for r in range(args.rounds):
            load, ok = wait_quiet(args.max_load, args.wait)
            loads.append(round(load, 2))
            quiet &= ok
            for w in ways if r % 2 == 0 else ways[::-1]:
                times[w].append(run_way(w, data, tmp / "out", args.batch))
            # each round as it ends: a run stopped early (a loaded machine) still leaves numbers
            print(json.dumps({"round": r, "load_before": loads[-1], "s": {w: round(t[-1], 2) for w, t in times.items()}}),
                  flush=True)
        med = {w: statistics.median(t) for w, t in times.items()}
        print(json.dumps({
            "models": MODELS, "images": images, "copies": args.copies, "batch": args.batch,
            "threads": torch.get_num_threads(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "load_before_rounds": loads, "quiet": quiet,
            "median_s": {w: round(v, 2) for w, v in med.items()},
            "ratio_cli": round(med["cli_together"] / med["cli_separate"], 3),
            "ratio_inprocess": round(med["inprocess_together"] / med["inprocess_separate"], 3),
            "rounds_s": {w: [round(t, 2) for t in v] for w, v in times.items()}}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
