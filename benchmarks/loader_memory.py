"""Memory a forked DataLoader worker copies from its parent: the file list as Python objects
against bitlab's packed arrays (`bitlab.data.datasets.PackedPaths`).

    python benchmarks/loader_memory.py --images 1281167    # ImageNet-1k's training set size

A worker is forked (as DataLoader's default on Linux) and reads every path once, as one epoch of
its share over many epochs would; its private dirty memory (pages it copied) is read from
/proc/<pid>/smaps_rollup. Baseline: the same paths in a Python list of `pathlib.Path`, as
torchvision's and timm's ImageFolder keep them (a list of (path, label) tuples).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitlab.data.datasets import PackedPaths  # noqa: E402


def private_dirty_mib(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private_Dirty")) / 1024


def worker_copies(paths) -> float:
    """MiB a forked child copies from the parent by reading every path once."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        os.close(r)
        before = private_dirty_mib(os.getpid())
        total = sum(len(str(paths[i])) for i in range(len(paths)))
        os.write(w, json.dumps([private_dirty_mib(os.getpid()) - before, total]).encode())
        os._exit(0)
    os.close(w)
    copied, _ = json.loads(os.read(r, 1 << 16))
    os.waitpid(pid, 0)
    return copied


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1_281_167)
    return ap


def names(n: int):
    return (f"/data/imagenet/train/n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(n))


def main() -> None:
    n = parser().parse_args().images
    # Each form alone in the parent, as in a run: the other's objects would be traversed too.
    as_list = [Path(p) for p in names(n)]
    list_mib = worker_copies(as_list)
    del as_list
    gc.collect()
    packed = PackedPaths(list(names(n)))
    gc.collect()
    row = {"bench": "loader_memory", "images": n, "list_of_paths_mib": list_mib, "packed_mib": worker_copies(packed),
           "packed_size_mib": (packed._bytes.nbytes + packed._ends.nbytes) / 2 ** 20}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
