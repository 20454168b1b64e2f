"""Near-duplicate search: bitlab's blocked top-k (torch matmul, running top-k) against numpy brute
force (the whole query x upstream similarity matrix, then argpartition), on the same embeddings.

1. Speed: pairs compared per second, both methods in this run, same data; their top-k must agree.
2. Memory: peak RSS above the process's baseline, each method in a fresh process, at two upstream
   sizes. Upstream embeddings are read block by block from .npy files, as `bitlab dedup` reads its
   embedding cache; brute force has to load them all and hold the full matrix.

Embeddings are random unit vectors of the offline model's width (1280) with planted noisy copies:
the search cost does not depend on what the vectors mean, and the planted pairs check that both
methods find the same neighbours.

    PYTHONPATH=. python benchmarks/dedup.py                 # the numbers in benchmarks/RESULTS.md
    PYTHONPATH=. python benchmarks/dedup.py --queries 200 --upstream 4000 --sizes 2000 8000  # quick
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bitlab.eval.dedup import load_block, search_blocks, split_blocks

K = 5
PLANTED_EVERY = 10  # every 10th query is a noisy copy of some upstream vector


def make_queries(n: int, dim: int, upstream_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Queries and, for the planted ones, the index of their upstream original (-1 otherwise)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, dim), dtype=np.float32)
    truth = np.full(n, -1)
    truth[::PLANTED_EVERY] = rng.integers(0, upstream_size, len(truth[::PLANTED_EVERY]))
    return q, truth


def upstream_block(start: int, size: int, dim: int) -> np.ndarray:
    """Deterministic block of upstream vectors (so every process sees the same data)."""
    return np.random.default_rng(1_000_003 + start).standard_normal((size, dim), dtype=np.float32)


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(n_queries: int, n_upstream: int, dim: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    upstream = normalise(np.concatenate([upstream_block(s, min(block, n_upstream - s), dim)
                                         for s in range(0, n_upstream, block)]))
    q, truth = make_queries(n_queries, dim, n_upstream)
    planted = truth >= 0
    q[planted] = upstream[truth[planted]] + 0.02 * q[planted]  # near-duplicates: cosine ~ 0.8
    return normalise(q), upstream, truth


def brute_force(q: np.ndarray, u: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ u.T  # the full (Q, U) matrix: what the blocked search avoids
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-vals, axis=1)
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(part, order, axis=1)


def blocked(q: np.ndarray, blocks, k: int, query_block_size: int) -> tuple[np.ndarray, np.ndarray]:
    top = search_blocks(torch.from_numpy(q), blocks, k=k, query_block_size=query_block_size)
    return top.values.numpy(), top.indices.numpy()


def best_times(fns: dict, repeats: int) -> dict:
    """Best wall time and last output of each function, runs interleaved so that load from other
    processes on a shared machine hits every method alike."""
    best = {name: (float("inf"), None) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = fn()
            best[name] = (min(best[name][0], time.perf_counter() - t0), out)
    return best


def speed(args) -> dict:
    q, u, truth = build(args.queries, args.upstream, args.dim, args.block_size)
    pairs = len(q) * len(u)
    res = best_times({"numpy": lambda: brute_force(q, u, K),
                      "bitlab": lambda: blocked(q, split_blocks(u, args.block_size), K, args.query_block_size)},
                     args.repeats)
    t_np, (v_np, i_np) = res["numpy"]
    t_bl, (v_bl, i_bl) = res["bitlab"]
    planted = truth >= 0
    assert (i_np[:, 0] == i_bl[:, 0]).all(), "top-1 differs between brute force and blocked search"
    np.testing.assert_allclose(v_np, v_bl, atol=1e-4)
    assert (i_bl[planted, 0] == truth[planted]).all(), "a planted near-duplicate was missed"
    return {"queries": len(q), "upstream": len(u), "dim": args.dim, "k": K, "block_size": args.block_size,
            "query_block_size": args.query_block_size,
            "numpy_brute_force_s": round(t_np, 3), "bitlab_blocked_s": round(t_bl, 3),
            "numpy_pairs_per_s": round(pairs / t_np), "bitlab_pairs_per_s": round(pairs / t_bl),
            "speedup": round(t_np / t_bl, 2)}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM (ru_maxrss would keep the parent's peak across exec)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(args) -> None:
    """One measurement in a fresh process: peak RSS above the baseline after queries are loaded."""
    files = sorted(Path(args.blocks_dir).glob("*.npy"))[: args.n_files]
    q = np.load(Path(args.blocks_dir) / "queries.npy", allow_pickle=False)
    _reset_peak_rss()
    base = _status_kib("VmRSS")
    if args.child == "numpy":
        u = np.concatenate([np.load(f, allow_pickle=False) for f in files])
        _, idx = brute_force(q, u, K)
    else:
        blocks = ((i * args.block_size, load_block(f)) for i, f in enumerate(files))
        _, idx = blocked(q, blocks, K, args.query_block_size)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_mib": round((peak - base) / 1024, 1), "top1_sum": int(idx[:, 0].sum())}))


def memory(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n_max = max(args.sizes)
        q, _ = make_queries(args.queries, args.dim, n_max)
        np.save(Path(tmp) / "queries.npy", normalise(q))
        for i, s in enumerate(range(0, n_max, args.block_size)):
            np.save(Path(tmp) / f"block{i:06d}.npy", normalise(upstream_block(s, args.block_size, args.dim)))
        for size in args.sizes:
            row = {"upstream": size, "queries": args.queries}
            for method in ("numpy", "bitlab"):
                cmd = [sys.executable, __file__, "--child", method, "--blocks-dir", tmp,
                       "--n-files", str(size // args.block_size), "--block-size", str(args.block_size),
                       "--query-block-size", str(args.query_block_size)]
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                row[f"{method}_peak_mib"] = res["peak_mib"]
                row[f"{method}_top1_sum"] = res["top1_sum"]
            assert row["numpy_top1_sum"] == row["bitlab_top1_sum"], "methods disagree"
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--upstream", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=1280, help="efficientnet_lite0 pre-logits width")
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--query-block-size", type=int, default=1024)
    p.add_argument("--sizes", type=int, nargs=2, default=[32_768, 131_072], help="upstream sizes for memory")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", choices=["numpy", "bitlab"], help=argparse.SUPPRESS)
    p.add_argument("--blocks-dir", help=argparse.SUPPRESS)
    p.add_argument("--n-files", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if any(s % args.block_size for s in args.sizes):
        p.error("--sizes must be multiples of --block-size")
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
               f"({torch.get_num_threads()} threads)")
    print(f"machine: {machine}")
    s = speed(args)
    print(f"speed: {s['queries']} queries x {s['upstream']} upstream x {s['dim']} dims, top-{K}")
    print(f"  numpy brute force   {s['numpy_brute_force_s']:8.3f} s  {s['numpy_pairs_per_s']:.3g} pairs/s")
    print(f"  bitlab blocked      {s['bitlab_blocked_s']:8.3f} s  {s['bitlab_pairs_per_s']:.3g} pairs/s  "
          f"(x{s['speedup']} vs numpy; same top-{K})")
    print(f"memory: peak RSS above baseline, {args.queries} queries, block {args.block_size}")
    for r in memory(args):
        print(f"  upstream {r['upstream']:>8}: numpy {r['numpy_peak_mib']:8.1f} MiB   "
              f"bitlab {r['bitlab_peak_mib']:6.1f} MiB")


if __name__ == "__main__":
    main()
