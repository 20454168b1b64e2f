"""`bitlab evaluate` and `bitlab report`."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score models on an out-of-context set or an ILSVRC-2012 validation folder",
                       description="Scores models' top-1/top-5 on out-of-context images or a validation set, and "
                       "with make-ooc's variants beside the composites their context scores (README: 'Context "
                       "scores'). A model is a registry name with the weights it stands for (official BiT names "
                       "and timm names download them into the cache on first use), a weights file (--pretrained), "
                       "or a `bitlab finetune`/`pretrain` run directory (--model RUN_DIR): its final.pt brings the "
                       "architecture, the head and the class names, which map to ILSVRC-2012 by wnid, ILSVRC "
                       "class name or class-table folder/alias (no --label-map needed). A head over a subset of "
                       "the 1000 classes is scored over its own classes, on the images of those classes: an "
                       "easier task than the paper's 1000-way models, which summary.json, the terminal and the "
                       "report's figures say. Several models (--model repeated, or --models FILE) share one pass "
                       "over the images.")
    p.add_argument("--model", action="append", metavar="NAME",
                   help="model name (see `bitlab models`; any timm name works) or a training run directory (its "
                        "final.pt, classes and evaluation view); repeat it for several models evaluated in one "
                        "pass (results in OUT/<label>/); may be left out when --pretrained is a run's final.pt "
                        "or checkpoint.pt")
    p.add_argument("--models", metavar="FILE", help="YAML/JSON list of models, each a name or a mapping of "
                   "model, pretrained, random_init, num_classes, image_size, label_map, label, pretraining_data")
    p.add_argument("--pretrained", metavar="FILE", help="weights file (official .npz, bitlab or timm; default: the "
                   "weights the name stands for, fetched into the cache on first use); one model only")
    p.add_argument("--random-init", action="store_true", help="random weights (seed 0) instead of pretrained ones, "
                   "for every model; the results and figures are labelled '(random weights)'")
    p.add_argument("--data", required=True, help="make-ooc output, official OOC class folders, "
                   "ILSVRC ImageFolder (wnid folders) or any folder with manifest.csv")
    p.add_argument("--out", required=True, help="results folder (predictions.csv, summary.json, config.json); "
                   "with several models, one such folder per model inside it")
    p.add_argument("--variants-dir", help="make-ooc's variants (only_fg, no_fg, mixed_rand folders) when not in "
                   "DATA/variants: the context scores need them")
    p.add_argument("--num-classes", type=int, help="head size of the weights file, if not the name's default")
    p.add_argument("--image-size", type=int, help="evaluation resolution (default: the model's)")
    p.add_argument("--classes", help="class table for class folders "
                   "(default: DATA/classes.csv, then ooc_dataset/classes.csv)")
    p.add_argument("--label-map", help="text file mapping each model output to an ILSVRC-2012 wnid ('-' for none); "
                   "overrides a run's class names")
    p.add_argument("--role", choices=["ooc", "val"], help="what the data is to the report (default: from its layout)")
    p.add_argument("--label", help="model name shown in figures; one model only")
    p.add_argument("--pretraining-data", help="pre-training data shown in figures (default: from the model name)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--workers", type=int,
                   help="decoding processes, 0: none (default: on a GPU the CPU cores this process may use; on the CPU "
                        "those torch's threads leave free, else threads between batches)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("report", help="draw the robustness figures and write the comparison tables from "
                       "evaluation results")
    p.add_argument("results", nargs="+", metavar="RESULTS_DIR", help="folders written by `bitlab evaluate` "
                   "(a folder of several models stands for all of them); the first two OOC results are compared "
                   "image by image (baseline first) and every OOC result is tabulated against the first")
    p.add_argument("--out", default="figures", help="folder for the figures (default: ./figures)")
    p.add_argument("--images", nargs="+", metavar="IMAGE", help="images for Fig. 13 (paths as in predictions.csv; "
                   "default: where the first model errs and the second does not)")
    p.add_argument("--num-images", type=int, default=4, help="images in Fig. 13 when chosen automatically (default: 4)")
    p.set_defaults(func=_report)


# Per-model flags: with several models they differ per model, so they come from --models FILE.
_PER_MODEL = ("pretrained", "num_classes", "label_map", "label", "pretraining_data")


def _evaluate(args: argparse.Namespace) -> None:
    from bitlab.errors import BitlabError
    from bitlab.eval.evaluate import EvaluateConfig, evaluate, evaluate_models, read_models_file
    from bitlab.train.torchrun import env_rank

    models = [{"model": m} for m in args.model or []] + (read_models_file(args.models) if args.models else [])
    if not models and not args.pretrained:
        raise BitlabError("give a model: --model NAME (repeatable), --models FILE, or --pretrained FILE (a run's "
                          "final.pt)")
    models = models or [{"model": None}]
    several = len(models) > 1 or args.models
    if several and (given := [f for f in _PER_MODEL if getattr(args, f) is not None]):
        raise BitlabError(f"--{given[0].replace('_', '-')} applies to one model: with several, set it per model "
                          "in --models FILE")
    base = EvaluateConfig(model=models[0]["model"], data=args.data, out=args.out, pretrained=args.pretrained,
                          random_init=args.random_init, num_classes=args.num_classes, image_size=args.image_size, classes=args.classes,
                          label_map=args.label_map, role=args.role, label=args.label,
                          pretraining_data=args.pretraining_data, batch_size=args.batch_size,
                          workers=args.workers, device=args.device, progress=args.progress)
    if several:
        models = [{"image_size": args.image_size, **m} for m in models]
        summaries = evaluate_models(base, models, args.variants_dir)
    else:
        summaries = [evaluate(base, args.variants_dir)]
    if env_rank() == 0:  # under torchrun, one process speaks
        for s in summaries:
            _print_summary(s)
        print(f"results: {Path(args.out)}" + (f" (one folder per model, listed in {Path(args.out) / 'models.json'})"
                                              if several else ""))


def _pct(entry: dict, key: str = "top1") -> str:
    low, high = entry.get(f"{key}_ci") or entry.get("ci") or (None, None)
    value = entry[key] if key in entry else entry["value"]
    return f"{value:.1%}" + (f" [{low:.1%}, {high:.1%}]" if low is not None and high is not None else "")


def _print_summary(s: dict) -> None:
    d, k = s["dataset"], max(int(key[3:]) for key in s if key.startswith("top") and key[3:].isdigit())
    print(f"{s['model']['label']} on {d['path']} ({d['num_images']} images, {d['role']}): "
          f"top-1 {_pct(s)}, top-{k} {_pct(s, f'top{k}')} (95% intervals: {s.get('ci', '')})")
    if s["model"]["random_init"]:
        print("  random weights (--random-init): these scores are chance, not a trained model's")
    if s["task"]["note"]:
        left = s["task"]["images_left_out"]
        print(f"  {s['task']['note']}" + (f"; {left} images of other classes left out" if left else ""))
    for part in ("out_of_context", "excluding_usual_context", "in_context"):
        if part in s:
            print(f"  {part.replace('_', '-')}: top-1 {_pct(s[part])} ({s[part]['n']} images)")
    if fg := s.get("per_foreground"):
        print(f"  objects fooled by at least one background: {fg['fooled_by_any']} of {fg['count']} "
              f"(mean share of backgrounds that fool: {fg['mean_fooled_fraction']:.0%})")
    for row in s.get("most_fooling_backgrounds", [])[:3]:
        print(f"  most fooling background: {row['background']} (top-1 error {row['top1_error']:.0%}, "
              f"top-1 {_pct(row)} vs {row['rest_top1']:.0%} elsewhere)")
    if note := s.get("most_fooling_backgrounds_note"):
        print(f"  most fooling backgrounds: {note}")
    if c := s.get("context"):
        for name, what in (("object_alone_correct", "object alone (only_fg) right"),
                           ("fooled_by_context", "fooled by the background (right alone, wrong on it)"),
                           ("context_consistent_share_of_errors", "mistakes the background suggests (of all)")):
            if name in c:
                print(f"  {what}: {_pct(c[name], 'value')} ({c[name]['n']} images)")
        if gap := c.get("background_gap", {}).get("overall"):
            print(f"  background gap, top-1 alone - on backgrounds: {gap['value']:+.1%} "
                  f"[{gap['ci'][0]:+.1%}, {gap['ci'][1]:+.1%}], McNemar p = {gap['mcnemar_p']:.2g}")


def _report(args: argparse.Namespace) -> None:
    from bitlab import report
    from bitlab.eval.results import find_results

    files = report.make_report(args.results, args.out, images=args.images, num_images=args.num_images)
    for f in files:
        print(f"{'table' if f.suffix == '.csv' else 'figure'}: {f}")
    table = report.results_table(find_results(args.results))
    print(table.to_string(index=False, float_format="{:.3f}".format))
    print(f"figures and tables in {Path(args.out)}")
