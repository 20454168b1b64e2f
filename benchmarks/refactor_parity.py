"""Behaviour unchanged, proven: the same small jobs on a base revision and on this tree, outputs compared bit for bit.

    python benchmarks/refactor_parity.py                 # base: the merge-base with main
    python benchmarks/refactor_parity.py --base cbf5e75 --keep /tmp/parity

The base revision is checked out into a temporary `git worktree`; every job runs as a real
`python -m bitlab ...` process with that tree (or this one) first on PYTHONPATH, on the same
seeds, one thread each, in one invocation on one machine, so the comparison is exact whatever the
CPU. Compared per job: model files (`final.pt`, `checkpoint.pt`: every tensor with `torch.equal`,
every other value with ==), `metrics.jsonl` and `summary.json` (every number but the timings),
`plan.json`, CSV outputs byte for byte (`predictions.csv`, `fewshot.csv`, `manifest.csv`) and the
sha256 of every image and shard a job writes. Prints one table row per compared artifact.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parent.parent
# Timings differ from run to run by nature, and so do the states of Python's and numpy's global RNGs
# that a checkpoint records (seeded by the OS at start-up, bitlab draws nothing from them); everything
# else must not.
IGNORED_KEYS = {"images_per_s", "step_s", "data_s", "train_images_per_s", "python", "numpy"}
TINY_FINETUNE = ["--model", "R14x0.5", "--data", "builtin:digits", "--batch-size", "16", "--resolution", "18", "16",
                 "--schedule", "1", "2", "3", "4", "6", "--base-lr", "0.05", "--workers", "0", "--no-progress",
                 "--device", "cpu", "--log-every", "1", "--eval-every", "3"]
TINY_FEWSHOT = ["--model", "R14x0.5", "--data", "builtin:digits", "--batch-size", "8", "--resolution", "18", "16",
                "--schedule", "1", "1", "1", "1", "2", "--workers", "0", "--no-progress", "--device", "cpu"]
TINY_PRETRAIN = ["--model", "R14x0.5", "--batch-size", "16", "--epochs", "0.06", "--decay-epochs", "0.04",
                 "--warmup-steps", "2", "--crop", "32", "--log-every", "1", "--checkpoint-every", "2", "--no-progress",
                 "--device", "cpu", "--base-lr", "0.1"]


def jobs(data: Path) -> list[tuple[str, list[list[str]], list[tuple[str, str]]]]:
    """(name, commands run in order in the job's folder, [(artifact, kind)]). `{data}` is the shared
    input folder; every job writes under its own folder (the working directory)."""
    ft = [("run/final.pt", "tensors"), ("run/checkpoint.pt", "tensors"), ("run/metrics.jsonl", "jsonl"),
          ("run/summary.json", "json"), ("run/plan.json", "json"), ("run/config.json", "json")]
    return [
        ("finetune", [["finetune", *TINY_FINETUNE, "--out", "run"]], ft),
        ("finetune --batch-split 2 --mixup 0.2",
         [["finetune", *TINY_FINETUNE, "--batch-split", "2", "--mixup", "0.2", "--out", "run"]], ft),
        ("finetune --stop-after 2, then --resume",
         [["finetune", *TINY_FINETUNE, "--mixup", "0.2", "--stop-after", "2", "--out", "run"],
          ["finetune", *TINY_FINETUNE, "--mixup", "0.2", "--resume", "--out", "run"]], ft),
        ("fewshot", [["fewshot", *TINY_FEWSHOT, "--shots", "1", "2", "--seeds", "0", "1", "--out", "run"]],
         [("run/fewshot.csv", "bytes"), ("run/fewshot_summary.csv", "bytes"), ("run/k1_seed0/final.pt", "tensors"),
          ("run/k2_seed1/final.pt", "tensors"), ("run/k2_seed1/metrics.jsonl", "jsonl")]),
        ("pretrain (files)", [["pretrain", *TINY_PRETRAIN, "--data", "builtin:digits", "--workers", "0",
                               "--eval-every", "2", "--out", "run"]], ft),
        ("pretrain (multi-label jsonl)", [["pretrain", *TINY_PRETRAIN, "--data", f"{data}/multilabel.jsonl",
                                           "--workers", "1", "--out", "run"]], ft),
        ("shards + pretrain (shards, 2 workers)",
         [["shards", "--data", f"{data}/digits", "--out", "shards", "--shard-size", "200", "--no-progress"],
          ["pretrain", *TINY_PRETRAIN, "--data", "shards", "--workers", "2", "--out", "run"]],
         ft + [("shards/train/shards.json", "json"), ("shards", "tree-hashes")]),
        ("pretrain, 2 processes (torchrun)",
         [["@torchrun", "pretrain", *TINY_PRETRAIN, "--data", "builtin:digits", "--workers", "0", "--batch-split",
           "2", "--out", "run"]], ft),
        ("make-ooc --demo", [["make-ooc", "--demo", "--out", "ooc"]],
         [("ooc/manifest.csv", "bytes"), ("ooc", "tree-hashes")]),
        ("evaluate (demo OOC, EfficientNet-Lite0)",
         [["make-ooc", "--demo", "--out", "ooc"],
          ["evaluate", "--model", "efficientnet_lite0.offline_in1k", "--data", "ooc", "--out", "res", "--workers", "2",
           "--no-progress"]],
         [("res/predictions.csv", "bytes"), ("res/summary.json", "json")]),
        ("dedup (phash, demo OOC against itself)",
         [["make-ooc", "--demo", "--out", "ooc"],
          ["dedup", "--upstream", "ooc", "--downstream", "ooc", "--embedding", "phash", "--workers", "2",
           "--gallery", "0", "--no-progress", "--out", "dd"]],
         [("dd/duplicates.csv", "bytes"), ("dd/nearest.csv", "bytes"), ("dd/summary.json", "json")]),
    ]


# ----------------------------------------------------------------------------- running
def run_job(tree: Path, commands: list[list[str]], where: Path, env: dict) -> tuple[bool, str, float]:
    """Run `commands` in `where`/../run, then rename that folder to `where`: both sides run in the same
    folder, so the absolute paths their outputs record (config.json, summary.json) compare equal."""
    folder = where.parent / "run"
    folder.mkdir(parents=True)
    env = {**env, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    for argv in commands:
        if argv[0] == "@torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "bitlab",
                   *argv[1:]]
        else:
            cmd = [sys.executable, "-m", "bitlab", *argv]
        proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            folder.rename(where)
            return False, f"`{' '.join(argv)}` exited {proc.returncode}: {proc.stderr.strip()[-600:]}", 0.0
    folder.rename(where)
    return True, "", time.perf_counter() - t0


# ----------------------------------------------------------------------------- comparing
def same_values(a: Any, b: Any, path: str = "") -> str | None:
    """None if equal (tensors bit for bit), else where they first differ."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: tensor vs {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.shape == b.shape and a.is_floating_point() else "-"
            return f"{path}: tensors differ (max |diff| {diff})"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{path}: keys differ ({sorted(set(a) ^ set(b))[:4]})"
        for k in a:
            if k in IGNORED_KEYS:
                continue
            if (d := same_values(a[k], b[k], f"{path}.{k}")) is not None:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            if (d := same_values(x, y, f"{path}[{i}]")) is not None:
                return d
        return None
    if a != b and not (isinstance(a, float) and isinstance(b, float) and a != a and b != b):  # NaN == NaN here
        return f"{path}: {a!r} vs {b!r}"
    return None


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every image, tar shard and CSV under `root` (not logs, configs or timestamps)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tar", ".csv")}


READERS: dict[str, Callable[[Path], Any]] = {
    "tensors": lambda p: torch.load(p, map_location="cpu", weights_only=True),
    "json": lambda p: json.loads(p.read_text()),
    "jsonl": lambda p: [json.loads(line) for line in p.read_text().splitlines() if line.strip()],
    "bytes": lambda p: p.read_bytes(),
    "tree-hashes": tree_hashes,
}


def compare(base: Path, new: Path, artifact: str, kind: str) -> str:
    a, b = base / artifact, new / artifact
    if not a.exists() or not b.exists():
        return f"MISSING ({'base' if not a.exists() else 'new'})"
    va, vb = READERS[kind](a), READERS[kind](b)
    if kind == "bytes":
        return "identical" if va == vb else f"DIFFERENT ({len(va)} vs {len(vb)} bytes)"
    diff = same_values(va, vb)
    count = f", {len(va)} files" if kind == "tree-hashes" else ""
    return "identical" + count if diff is None else f"DIFFERENT: {diff[:160]}"


# ----------------------------------------------------------------------------- inputs
def make_inputs(data: Path, tree: Path, env: dict) -> None:
    """The digits as a folder (for `shards`) and a multi-label JSON-lines file over them (labels: the
    digit and its parity)."""
    code = ("from bitlab.data.datasets import write_digits; import sys; print(write_digits(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", code, str(data / "cache")], env={**env, "PYTHONPATH": str(tree)},
                         capture_output=True, text=True, check=True)
    digits = Path(out.stdout.strip())
    shutil.copytree(digits, data / "digits")
    rows = []
    for split in ("train", "val"):
        for f in sorted((data / "digits" / split).rglob("*.png")):
            d = int(f.parent.name)
            rows.append({"path": str(f.relative_to(data)), "labels": [str(d), "even" if d % 2 == 0 else "odd"],
                         "split": split})
    (data / "multilabel.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def merge_base() -> str:
    return subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="git revision to compare with (default: the merge-base of HEAD and main)")
    ap.add_argument("--new", help="git revision to test instead of this working tree (e.g. HEAD)")
    ap.add_argument("--only", nargs="+", help="run only the jobs whose names start with these")
    ap.add_argument("--keep", help="keep the work folder here (default: a temporary folder, removed)")
    args = ap.parse_args()
    base_rev = args.base or merge_base()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bitlab-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    base_tree, new_tree = work / "base-tree", (work / "new-tree" if args.new else REPO)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BITLAB_DATA": str(work / "data" / "cache")}
    env.pop("PYTHONPATH", None)
    trees = [(base_tree, base_rev)] + ([(new_tree, args.new)] if args.new else [])
    for tree, rev in trees:
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=REPO, check=True,
                       capture_output=True)
    rows, failed = [], False
    try:
        make_inputs(work / "data", new_tree, env)
        for name, commands, artifacts in jobs(work / "data"):
            if args.only and not any(name.startswith(o) for o in args.only):
                continue
            folder = work / "jobs" / name.split(" ")[0].replace("/", "_") / str(len(rows))
            times = {}
            for side, tree in (("base", base_tree), ("new", new_tree)):
                ok, why, times[side] = run_job(tree, commands, folder / side, env)
                if not ok:
                    rows.append((name, f"({side} run)", "FAILED: " + why))
                    failed = True
                    break
            else:
                for artifact, kind in artifacts:
                    result = compare(folder / "base", folder / "new", artifact, kind)
                    failed |= not result.startswith("identical")
                    rows.append((name, artifact, result))
                print(f"{name}: base {times['base']:.0f} s, new {times['new']:.0f} s", file=sys.stderr, flush=True)
    finally:
        for tree, _ in trees:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    head = subprocess.run(["git", "rev-parse", "--short", args.new or "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    dirty = not args.new and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                            capture_output=True, text=True).stdout.strip()
    print(f"base {base_rev[:10]} vs {'revision' if args.new else 'this tree'} {head}"
          f"{' + uncommitted changes' if dirty else ''}; "
          f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}")
    width = max(len(r[0]) for r in rows) if rows else 10
    awidth = max(len(r[1]) for r in rows) if rows else 10
    print(f"| {'job':<{width}} | {'artifact':<{awidth}} | result |")
    print(f"|{'-' * (width + 2)}|{'-' * (awidth + 2)}|---|")
    for job, artifact, result in rows:
        print(f"| {job:<{width}} | {artifact:<{awidth}} | {result} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
