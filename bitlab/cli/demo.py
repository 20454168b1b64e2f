"""`bitlab demo`."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="make-ooc -> evaluate -> report on the embedded offline sample")
    p.add_argument("--out", default="demo_out", help="working folder (default: ./demo_out)")
    p.add_argument("--figures", default="figures", help="where the figures go (default: ./figures)")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> None:
    from bitlab import demo

    res = demo.run_demo(Path(args.out), Path(args.figures))
    print(f"out-of-context set: {res.ooc}")
    for path, s in res.summaries.items():
        d = s["dataset"]
        print(f"{s['model']['label']:<34} {d['role']:<4} {d['num_images']:>3} images  top-1 {s['top1']:6.1%}  "
              f"top-5 {s['top5']:6.1%}  ({path})")
    print("figures:")
    for f in res.figures:
        if f.suffix == ".png":
            print(f"  {f}  (+ .pdf)")
    print(f"the figures are in {Path(args.figures).resolve()}")
