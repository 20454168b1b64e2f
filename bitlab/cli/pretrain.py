"""`bitlab pretrain` (upstream pre-training, torchrun / DDP), `bitlab shards` (tar shards) and
`bitlab shards-index` (an index for tar shards written by other tools)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from bitlab.cli.flags import add_config, add_settings, settings_from_args
from bitlab.cli.train import RUNNING, report_unfinished
from bitlab.errors import BitlabError
from bitlab.train.config import PretrainConfig
from bitlab.train.torchrun import env_rank

# Flags by group, in help order; each flag's type, default and help come from PretrainConfig.
WHAT = ("model", "data", "out", "val_data", "val_fraction", "classes", "label_sep", "seed")
RECIPE = ("preset", "epochs", "decay_epochs", "warmup_steps", "batch_size", "batch_split", "device_batch", "base_lr",
          "weight_decay", "decay_all", "crop", "crop_area_min", "flip", "head_bias")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="upstream pre-training (BiT recipe) on one or many processes",
                       description="BiT upstream pre-training. Multi-GPU / multi-node: launch with "
                       "`torchrun --nproc-per-node N -m bitlab pretrain ...` (see README), or use --nproc N.")
    add_settings(p.add_argument_group("what"), PretrainConfig, WHAT)
    add_settings(p.add_argument_group("recipe (paper §3.3; defaults: BiT-M)"), PretrainConfig, RECIPE)
    g = p.add_argument_group("running")
    g.add_argument("--nproc", type=int, metavar="N", help="launch N processes on this machine through torchrun")
    g.add_argument("--max-restarts", type=int, metavar="K",
                   help="with --nproc: restart the job up to K times when a worker dies (resumes from the checkpoint)")
    add_settings(g, PretrainConfig, (*RUNNING, "resume"))
    add_config(g)
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("shards", help="pack an image data set into WebDataset-format tar shards",
                       description="Writes DIR/shards.json and DIR/shard-NNNNNN.tar; a source with splits gets "
                       "one shard set per split (DIR/train, DIR/val). Resumable.")
    p.add_argument("--data", required=True, help="ImageFolder DIR, CSV of path,label[,split], or multi-label CSV/JSONL")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--split", help="write only this split (e.g. train)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--max-shard-mb", type=float, help="also cap shard size in MB")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the source order")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--classes", metavar="FILE", help="class list, one per line: fixes the label order")
    p.add_argument("--label-sep", help="separator inside a multi-label CSV's labels cell (default: whitespace)")
    p.add_argument("--workers", type=int, default=4, help="shards written in parallel (default 4)")
    p.add_argument("--skip-bad-images", dest="skip_bad", action="store_true",
                   help="leave out images that do not decode (listed in shards.json's skipped; default: stop, "
                   "naming the file)")
    p.add_argument("--verify", action="store_true", help="re-read every shard afterwards (sha256, counts)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_shards)

    p = sub.add_parser("shards-index", help="make WebDataset tars written by another tool a shard set",
                       description="Reads the tars in DIR once each (in name order; samples: <key>.jpg/.png/... "
                       "with a label in <key>.cls or <key>.json's labels / label / cls), checks every sample and "
                       "writes DIR/shards.json, after which DIR trains like a set from `bitlab shards`.")
    p.add_argument("dir", metavar="DIR", help="folder of tar shards")
    p.add_argument("--pattern", default="*.tar", help="shard file names in DIR (default '*.tar')")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--classes", metavar="FILE", help="class names, one per line, in class-index order")
    g.add_argument("--num-classes", type=int, metavar="N",
                   help="N classes named 0..N-1 (default: 0..the largest label found)")
    p.add_argument("--multi-label", action="store_true", help="samples carry a list of labels (any number)")
    p.add_argument("--workers", type=int, default=4, help="shards read in parallel (default 4)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_shards_index)


def _pretrain(args: argparse.Namespace) -> int:
    if args.max_restarts is not None and (args.nproc is None or args.max_restarts < 0):
        raise BitlabError("--max-restarts needs --nproc (it restarts the torchrun job that --nproc launches; "
                          "under your own torchrun pass torchrun's --max-restarts)" if args.nproc is None
                          else f"--max-restarts must be 0 or more, got {args.max_restarts}")
    if args.nproc is not None:
        if "LOCAL_RANK" in os.environ:
            raise BitlabError("--nproc launches torchrun; this process already runs under torchrun: leave it out")
        cmd = torchrun_command(sys.argv[1:], args.nproc, max_restarts=args.max_restarts or 0)
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
        os.execv(cmd[0], cmd)  # torchrun takes this process's place (signals reach it directly)
    from bitlab.train.pretrain import pretrain

    r = pretrain(settings_from_args(PretrainConfig, args))
    code = report_unfinished(r, r.total_steps, "rerun the same command to continue")
    if code is not None or env_rank() != 0:
        return code or 0
    m = r.metrics
    if "map" in m:
        print(f"validation: loss {m['loss']:.4f}, precision@1 {m['prec1']:.4f}, mAP {m['map']:.4f} ({m['n']} images)")
    elif m:
        print(f"validation: loss {m['loss']:.4f}, top-1 {m['top1']:.4f}, top-5 {m['top5']:.4f} ({m['n']} images)")
    print(f"{r.step} steps on {r.plan.num_examples} images, {r.plan.num_classes} classes; "
          f"run directory: {r.run_dir} (final.pt, metrics.csv, summary.json)")
    return 0


def torchrun_command(argv: Sequence[str], nproc: int, *, max_restarts: int = 0,
                     python: str | None = None) -> list[str]:
    """The torchrun command line equivalent to `bitlab <argv>` with `--nproc`/`--max-restarts`
    removed: `python -m torch.distributed.run --standalone --nproc-per-node N -m bitlab ...`."""
    if nproc < 1:
        raise BitlabError(f"--nproc must be at least 1, got {nproc}")
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--nproc", "--max-restarts"):
            skip = "=" not in arg
            continue
        rest.append(arg)
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "bitlab", *rest]


def _shards(args: argparse.Namespace) -> int:
    from bitlab.data import shards
    if args.max_shard_mb is not None and args.max_shard_mb <= 0:  # in MB here, in bytes for the library
        raise BitlabError(f"--max-shard-mb must be positive, got {args.max_shard_mb:g}")

    written = shards.write_source(args.data, args.out, split=args.split, label_sep=args.label_sep,
                                  classes=args.classes, shard_size=args.shard_size,
                                  max_bytes=None if args.max_shard_mb is None else int(args.max_shard_mb * 1e6),
                                  shuffle=args.shuffle, seed=args.seed, workers=args.workers, progress=args.progress,
                                  skip_bad=args.skip_bad)
    status = 0
    for split, index in written.items():
        kind = "multi-label" if index.multi_label else "single-label"
        print(f"{split}: {index.num_samples} images, {len(index.classes)} classes ({kind}) in {len(index.shards)} "
              f"shard(s) -> {index.root / shards.INDEX}")
        if index.skipped:
            print(f"  left out {len(index.skipped)} image(s) that do not decode (listed in {shards.INDEX})")
        if args.verify:
            problems = shards.verify(index, progress=args.progress)
            for problem in problems:
                print(f"  problem: {problem}", file=sys.stderr)
            status = status or (1 if problems else 0)
    return status


def _shards_index(args: argparse.Namespace) -> int:
    from bitlab.data import shards
    from bitlab.data.multilabel import read_classes
    if args.num_classes is not None and args.num_classes <= 0:
        raise BitlabError(f"--num-classes must be positive, got {args.num_classes}")
    classes = (read_classes(args.classes) if args.classes else
               None if args.num_classes is None else [str(i) for i in range(args.num_classes)])
    index = shards.index_shards(args.dir, pattern=args.pattern, classes=classes, multi_label=args.multi_label,
                                workers=args.workers, progress=args.progress)
    kind = "multi-label" if index.multi_label else "single-label"
    print(f"{index.num_samples} images, {len(index.classes)} classes ({kind}) in {len(index.shards)} shard(s) "
          f"-> {index.root / shards.INDEX}")
    return 0
