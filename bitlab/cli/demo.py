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
        low, high = s["top1_ci"]
        print(f"{s['model']['label']:<34} {d['role']:<4} {d['num_images']:>3} images  top-1 {s['top1']:6.1%} "
              f"[{low:.0%}, {high:.0%}]  top-5 {s['top5']:6.1%}  ({path})")
        if c := s.get("context"):  # the same objects alone, and the mistakes their backgrounds suggest
            alone, share = c["variants"]["only_fg"], c.get("context_consistent_share_of_errors")
            print(f"{'':<34} objects alone (only_fg) top-1 {alone['top1']:.0%} [{alone['top1_ci'][0]:.0%}, "
                  f"{alone['top1_ci'][1]:.0%}]" + (f"; mistakes the bare background suggests: {share['value']:.0%} "
                                                    f"of {share['n']}" if share and share["n"] else ""))
    print("figures and tables:")
    for f in res.figures:
        if f.suffix in (".png", ".csv"):
            print(f"  {f}" + ("  (+ .pdf)" if f.suffix == ".png" else ""))
    print(f"the figures are in {Path(args.figures).resolve()}")
