"""`bitlab demo`."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded offline sample")
    p.add_argument("--out", default="demo_out", help="working folder (default: ./demo_out)")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> None:
    from bitlab import demo

    result = demo.classify_sample(Path(args.out))
    for row in result["rows"]:
        top = ", ".join(f"{n} {p:.2f}" for n, p in list(row.values())[1][:3])
        print(f"{row['image']}: {top}")
    print(f"predictions: {result['file']}")
