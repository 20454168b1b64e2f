"""`bitlab evaluate` and `bitlab report`."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a model on an out-of-context set or an ILSVRC-2012 validation folder",
                       description="Scores a model's top-1/top-5 on out-of-context images or a validation set. "
                       "A model is a registry name with the weights it stands for (official BiT names and timm "
                       "names download them into the cache on first use), a weights file (--pretrained), or a "
                       "`bitlab finetune`/`pretrain` run directory (--model RUN_DIR): its final.pt brings the "
                       "architecture, the head and the class names, which map to ILSVRC-2012 by wnid, ILSVRC "
                       "class name or class-table folder/alias (no --label-map needed). A head over a subset of "
                       "the 1000 classes is scored over its own classes, on the images of those classes: an "
                       "easier task than the paper's 1000-way models, which summary.json, the terminal and the "
                       "report's figures say.")
    p.add_argument("--model", help="model name (see `bitlab models`; any timm name works) or a training run "
                   "directory (its final.pt, classes and evaluation view); may be left out when --pretrained is a "
                   "run's final.pt or checkpoint.pt")
    p.add_argument("--pretrained", metavar="FILE", help="weights file (official .npz, bitlab or timm; default: the "
                   "weights the name stands for, fetched into the cache on first use)")
    p.add_argument("--random-init", action="store_true", help="random weights (seed 0) instead of pretrained ones; "
                   "the results and figures are labelled '(random weights)'")
    p.add_argument("--data", required=True, help="make-ooc output, official OOC class folders, "
                   "ILSVRC ImageFolder (wnid folders) or any folder with manifest.csv")
    p.add_argument("--out", required=True, help="results folder (predictions.csv, summary.json, config.json)")
    p.add_argument("--num-classes", type=int, help="head size of the weights file, if not the name's default")
    p.add_argument("--image-size", type=int, help="evaluation resolution (default: the model's)")
    p.add_argument("--classes", help="class table for class folders "
                   "(default: DATA/classes.csv, then ooc_dataset/classes.csv)")
    p.add_argument("--label-map", help="text file mapping each model output to an ILSVRC-2012 wnid ('-' for none); "
                   "overrides a run's class names")
    p.add_argument("--role", choices=["ooc", "val"], help="what the data is to the report (default: from its layout)")
    p.add_argument("--label", help="model name shown in figures")
    p.add_argument("--pretraining-data", help="pre-training data shown in figures (default: from the model name)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--workers", type=int,
                   help="decoding processes, 0: none (default: the CPU cores this process may use)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("report", help="draw the robustness figures from evaluation results")
    p.add_argument("results", nargs="+", metavar="RESULTS_DIR", help="folders written by `bitlab evaluate`; "
                   "the first two OOC results are compared image by image (baseline first)")
    p.add_argument("--out", default="figures", help="folder for the figures (default: ./figures)")
    p.add_argument("--images", nargs="+", metavar="IMAGE", help="images for Fig. 13 (paths as in predictions.csv; "
                   "default: where the first model errs and the second does not)")
    p.add_argument("--num-images", type=int, default=4, help="images in Fig. 13 when chosen automatically (default: 4)")
    p.set_defaults(func=_report)


def _evaluate(args: argparse.Namespace) -> None:
    from bitlab.eval.evaluate import EvaluateConfig, evaluate

    cfg = EvaluateConfig(model=args.model, data=args.data, out=args.out, pretrained=args.pretrained,
                         random_init=args.random_init, num_classes=args.num_classes, image_size=args.image_size,
                         classes=args.classes, label_map=args.label_map, role=args.role, label=args.label,
                         pretraining_data=args.pretraining_data, batch_size=args.batch_size,
                         workers=args.workers, device=args.device, progress=args.progress)
    s = evaluate(cfg)
    d, k = s["dataset"], max(int(key[3:]) for key in s if key.startswith("top") and key[3:].isdigit())
    print(f"{s['model']['label']} on {d['path']} ({d['num_images']} images, {d['role']}): "
          f"top-1 {s['top1']:.1%}, top-{k} {s[f'top{k}']:.1%}")
    if s["model"]["random_init"]:
        print("  random weights (--random-init): these scores are chance, not a trained model's")
    if s["task"]["note"]:
        left = s["task"]["images_left_out"]
        print(f"  {s['task']['note']}" + (f"; {left} images of other classes left out" if left else ""))
    for part in ("out_of_context", "excluding_usual_context", "in_context"):
        if part in s:
            print(f"  {part.replace('_', '-')}: top-1 {s[part]['top1']:.1%} ({s[part]['n']} images)")
    if fg := s.get("per_foreground"):
        print(f"  objects fooled by at least one background: {fg['fooled_by_any']} of {fg['count']} "
              f"(mean share of backgrounds that fool: {fg['mean_fooled_fraction']:.0%})")
    for row in s.get("most_fooling_backgrounds", [])[:3]:
        print(f"  most fooling background: {row['background']} (top-1 error {row['top1_error']:.0%})")
    print(f"results: {Path(args.out)}")


def _report(args: argparse.Namespace) -> None:
    from bitlab import report
    from bitlab.eval.results import load_results

    files = report.make_report(args.results, args.out, images=args.images, num_images=args.num_images)
    for f in files:
        print(f"figure: {f}")
    table = report.results_table([load_results(r) for r in args.results])
    print(table.to_string(index=False, float_format="{:.3f}".format))
    print(f"figures in {Path(args.out)}")
