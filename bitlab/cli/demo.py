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
    _print_summary(res.summary)
    print(f"summary: {Path(args.out) / demo.SUMMARY}")
    print("figures and tables:")
    for f in res.figures:
        if f.suffix in (".png", ".csv"):
            print(f"  {f}" + ("  (+ .pdf)" if f.suffix == ".png" else ""))
    print(f"the figures are in {Path(args.figures).resolve()}")


def _print_summary(s: dict) -> None:
    a, b = s["baseline"], s["compared"]
    print(f"\nFig. 12 left / 13, {a} (left) vs {b} (right): {s['fig13_meet_rule']} of {len(s['fig13'])} images "
          f"meet the paper's rule ({a} wrong, {b} right); in {s['fig13_fit_background']} the wrong top-1 is among "
          f"{a}'s top 5 on the background alone")
    for f in s["fig13"]:
        fit = " (fits the background)" if f["fits_background"] else ""
        print(f"  {f['class']} on {f['background']}: {a} '{f['baseline_top1']}'{fit}, {b} '{f['compared_top1']}'")
    print(f"\n{a}: right on the object's own photo, wrong on a background that is not its usual context:")
    for o in s["baseline_fooled_out_of_context"]:
        wrong = ", ".join(f"{bg}: '{top1}'" for bg, top1 in o["wrong_on"].items())
        print(f"  {o['class']} {o['fg_uid'][:8]} ('{o['own_photo_top1']}' alone) -> {wrong}")
    print("\nHeat maps: shares of the class x background top-1 table's variance explained by the class alone, "
          "by backgrounds that fool every class (permutation p) and by class-specific backgrounds:")
    for label, m in s["models"].items():
        if e := m.get("background_effect"):
            print(f"  {label:<34} class {e['class']:4.0%}  background {e['background']:4.0%} (p = {e['p_value']:.2g})  "
                  f"class x background {e['class_x_background']:4.0%}  -> background-dependent "
                  f"{e['background_dependent']:4.0%}")
