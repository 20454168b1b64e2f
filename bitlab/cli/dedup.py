"""`bitlab dedup`: near-duplicates between an upstream training set and a downstream test set."""
from __future__ import annotations

import argparse

from bitlab.errors import BitlabError

# Spelled out rather than imported from bitlab.models.zoo: `bitlab --help` must not import torch.
OFFLINE_IMAGENET_MODEL = "efficientnet_lite0.offline_in1k"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dedup", help="find test images with near-duplicates in a training set (paper App. B, Table 6)",
                       description="Embeds both sets, searches nearest neighbours block by block (the full "
                                   "distance matrix is never held) and counts test images whose best match "
                                   "passes the threshold.")
    p.add_argument("--upstream", required=True, metavar="DIR_OR_LIST",
                   help="training images: a folder (recursive) or a text file with one image path per line")
    p.add_argument("--downstream", required=True, metavar="DIR_OR_LIST", help="test images, likewise")
    p.add_argument("--embedding", default=f"model:{OFFLINE_IMAGENET_MODEL}", metavar="model:NAME|phash",
                   help="pre-logits of a model (cosine) or a 64-bit perceptual hash (Hamming) "
                        "(default: %(default)s)")
    p.add_argument("--weights", help="checkpoint for model:NAME (official .npz, bitlab or timm file; default: the "
                   "weights the name stands for, fetched into the cache on first use)")
    p.add_argument("--random-init", action="store_true", help="model:NAME with random weights (seed 0)")
    p.add_argument("--threshold", type=float,
                   help="duplicate if cosine similarity >= T (model, default 0.70) or Hamming distance <= T "
                        "(phash, default 10); see bitlab.eval.dedup for how the defaults were chosen")
    p.add_argument("--predictions", metavar="CSV",
                   help="per-test-image correctness (columns image, correct) for Table 6's Full / Dedup accuracy")
    p.add_argument("--correct-column", default="correct", help="the predictions column with 1/0 or true/false "
                   "per image (default: %(default)s)")
    p.add_argument("--topk", type=int, default=5, help="matches listed per test image (default: 5)")
    p.add_argument("--block-size", type=int, default=4096,
                   help="upstream images embedded and searched at a time; bounds memory (default: 4096)")
    p.add_argument("--query-block-size", type=int, default=1024, help="test images per matmul (default: 1024)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model batch (default: 64)")
    p.add_argument("--workers", type=int, help="image decoding processes (default: the CPU cores this process may "
                   "use; a model embedding on the CPU: those torch's threads leave free)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--cache", help="embedding cache folder, reusable between runs (default: OUT/cache)")
    p.add_argument("--gallery", type=int, default=16, help="pairs drawn in duplicates.png (0: none; default: 16)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_dedup)


def _dedup(args: argparse.Namespace) -> None:
    if args.gallery < 0:
        raise BitlabError(f"--gallery must be at least 0, got {args.gallery}")
    from bitlab import report
    from bitlab.eval.dedup import DedupConfig, run_dedup
    from bitlab.fileio import lock_folder

    cfg = DedupConfig(upstream=args.upstream, downstream=args.downstream, out=args.out, embedding=args.embedding,
                      weights=args.weights, random_init=args.random_init, threshold=args.threshold, topk=args.topk,
                      block_size=args.block_size, query_block_size=args.query_block_size, batch_size=args.batch_size,
                      workers=args.workers, device=args.device, predictions=args.predictions,
                      correct_column=args.correct_column, cache=args.cache, progress=args.progress)
    with lock_folder(args.out, "dedup"):  # the results and their gallery: one writer
        result = run_dedup(cfg)
        gallery = report.save_duplicates_gallery(result, args.gallery)
    s = result.summary
    unit = "cosine >=" if s["metric"] == "cosine" else "Hamming <="
    print(f"{s['embedding']} ({unit} {s['threshold']}): {s['dups']} of {s['downstream_images']} test images have a "
          f"near-duplicate among {s['upstream_images']} upstream images ({s['duplicate_pairs']} pairs)")
    if "full" in s:
        dedup = "n/a (every test image has a duplicate)" if s["dedup"] is None else f"{s['dedup']:.2f}"
        print(f"accuracy  Full {s['full']:.2f}  Dedup {dedup}  Dups {s['dups']}")
    print(f"wrote {args.out}/duplicates.csv, nearest.csv, summary.json" + (", duplicates.png" if gallery else ""))
