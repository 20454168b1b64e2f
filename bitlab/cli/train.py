"""`bitlab hyperrule`, `bitlab finetune`, `bitlab fewshot`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal

from bitlab.train.torchrun import env_rank, under_torchrun

log = logging.getLogger(__name__)

HELP_DATA = ("DIR with train/ and val/ (or test/) class folders, a folder of class folders, make-ooc output "
             "(manifest.csv), a CSV of path,label[,split], or builtin:digits")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hyperrule", help="print what BiT-HyperRule chooses for a task")
    p.add_argument("--dataset-size", type=int, required=True, metavar="N", help="training examples actually used")
    p.add_argument("--image-size", type=int, nargs=2, required=True, metavar=("H", "W"), help="typical image size")
    p.add_argument("--batch-size", type=int, default=512, help="global batch (default 512, the rule's)")
    p.add_argument("--base-lr", type=float, default=0.003,
                   help="peak lr (default 0.003, the rule's at batch 512; not scaled with the batch, as officially)")
    p.add_argument("--scale-schedule", action="store_true", help="scale step counts by 512/batch (not official)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_hyperrule)

    p = sub.add_parser("finetune", help="fine-tune a model on an image dataset by BiT-HyperRule")
    _add_finetune_args(p, sweep=False)
    p.add_argument("--examples-per-class", type=int, metavar="K", help="few-shot: K training images per class")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("fewshot", help="few-shot fine-tuning over several K and seeds; median and spread per K")
    _add_finetune_args(p, sweep=True)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10], metavar="K", help="K values (default 1 5 10)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="S", help="seeds (default 0 1 2)")
    p.set_defaults(func=_fewshot)


def _add_finetune_args(p: argparse.ArgumentParser, *, sweep: bool) -> None:
    """finetune's flags; a few-shot `sweep` has no --seed (its --seeds) nor --resume (it resumes by itself)."""
    g = p.add_argument_group("what")
    g.add_argument("--model", required=True, help="bitlab name (BiT-M-R50x1, R50x1, R14x0.5, ...) or any timm name")
    g.add_argument("--pretrained", metavar="PATH", help="weights: official .npz, bitlab or timm checkpoint")
    g.add_argument("--data", required=True, help=HELP_DATA)
    g.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory")
    g.add_argument("--val-data", help="validation data from elsewhere (same forms as --data)")
    g.add_argument("--val-split", help="name of the validation split (default: val, validation, then test)")
    g.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction of each class for validation")
    if sweep:  # refused by name: else argparse would take --seed as short for --seeds
        g.add_argument("--seed", nargs=1, action=_NotInSweep, why="each run's seed comes from --seeds")
    else:
        g.add_argument("--seed", type=int, default=0, help="few-shot subset, data order, augmentation, MixUp, init")
    g.add_argument("--split-seed", type=int, default=0,
                   help="the --val-fraction hold-out's seed (default 0; not --seed, so few-shot seeds share it)")

    g = p.add_argument_group("BiT-HyperRule (defaults: the rule's choices)")
    g.add_argument("--batch-size", type=int, default=512, help="global batch (default 512)")
    g.add_argument("--batch-split", type=int, default=1,
                   help="micro-batches per step (less memory; the same result unless the model has BatchNorm)")
    g.add_argument("--base-lr", type=float, default=0.003, help="peak lr (default 0.003)")
    g.add_argument("--schedule", type=int, nargs="+", metavar="STEP",
                   help="override the steps: WARMUP DECAY1 DECAY2 DECAY3 TOTAL")
    g.add_argument("--scale-schedule", action="store_true", help="scale step counts by 512/batch (not official)")
    g.add_argument("--mixup", type=float, metavar="ALPHA", help="override MixUp alpha (0 turns it off)")
    g.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="image size the resolution rule sees (default: median of the training images)")
    g.add_argument("--resolution", type=int, nargs=2, metavar=("RESIZE", "CROP"), help="override resize and crop")
    g.add_argument("--no-square-resize", dest="square_resize", action="store_false",
                   help="keep the aspect ratio (shorter side to RESIZE) instead of squashing to a square")
    g.add_argument("--no-random-crop", dest="random_crop", action="store_false", help="centre crop instead")
    g.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal flips (e.g. text, digits)")

    g = p.add_argument_group("running")
    add_running_args(g, checkpoint_every=100, log_every=10,
                     skip_help="skip unreadable images (counted in summary.json)")
    if sweep:
        g.add_argument("--resume", nargs=0, action=_NotInSweep, why="a sweep resumes its stopped runs by itself")
    else:
        g.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")


class _NotInSweep(argparse.Action):
    """A finetune flag that a few-shot sweep sets per run: refused (exit 2) with `why`, not shown in help."""

    def __init__(self, option_strings: list[str], dest: str, *, why: str, **kwargs) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.why = why

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} is not a fewshot flag: {self.why}")


def add_running_args(g: argparse._ArgumentGroup, *, checkpoint_every: int, log_every: int, skip_help: str) -> None:
    """How a training run runs (shared by finetune and pretrain; the loop's and the device's knobs)."""
    g.add_argument("--eval-every", type=int, default=0, metavar="STEPS", help="evaluate every N steps and at the end (default 0: only at the end)")
    g.add_argument("--checkpoint-every", type=int, default=checkpoint_every, metavar="STEPS",
                   help=f"checkpoint every N steps (default {checkpoint_every})")
    g.add_argument("--log-every", type=int, default=log_every, metavar="STEPS",
                   help=f"training metrics every N steps (default {log_every})")
    g.add_argument("--eval-batch-size", type=int, help="evaluation batch per process (default: the micro-batch)")
    g.add_argument("--workers", type=int, help="data loading processes per process (default: the CPU cores)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available; torchrun ranks use their local GPU)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="autocast (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: on for GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--skip-bad-images", action="store_true", help=skip_help)
    g.add_argument("--stop-after", type=int, metavar="STEPS",
                   help="stop with a checkpoint after N steps of this invocation (a resumed run goes N steps further)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def config_from_args(cls, args: argparse.Namespace):
    """The command's config dataclass, filled from the flags of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def _hyperrule(args: argparse.Namespace) -> None:
    from bitlab import hyperrule

    rule = hyperrule.hyperrule(args.dataset_size, tuple(args.image_size), batch_size=args.batch_size,
                               base_lr=args.base_lr, scale_with_batch=args.scale_schedule)
    if args.json:
        print(json.dumps(rule.to_dict()))
        return
    warm, *decays, total = rule.supports
    print(f"dataset size   {rule.dataset_size} (image {rule.image_size[0]}x{rule.image_size[1]}, batch {rule.batch_size})")
    print(f"resolution     resize {rule.resize}x{rule.resize}, random crop {rule.crop}x{rule.crop}, flip; "
          f"test: resize {rule.crop}x{rule.crop}")
    print(f"schedule       {total} steps: warm-up {warm}, lr x0.1 after steps {', '.join(map(str, decays))}")
    print(f"optimiser      SGD lr {rule.base_lr:g}, momentum {rule.momentum}, weight decay {rule.weight_decay:g}, "
          "zero-initialised head")
    print(f"mixup          alpha {rule.mixup_alpha:g}" + ("" if rule.mixup_alpha else " (off below 20,000 examples)"))
    # the steps where the lr changes; a decay right before the end has no step after it
    points = {s for s in (0, warm // 2, warm, *decays, *(d + 1 for d in decays), total - 1) if s < total}
    print("lr             " + ", ".join(f"step {s}: {rule.lr(s):.3g}" for s in sorted(points)) + f", step {total}: end")


def report_unfinished(r, total_steps: int, how_to_continue: str) -> int | None:
    """Print (rank 0) skipped images and, for a run that stopped early, where it stopped and how to
    go on. Returns None if the run finished, else the exit code, the same on every rank: 0 after
    --stop-after; after a signal 128 + signal, as a shell reports it, except under torchrun, which
    counts any non-zero code as a failed worker and restarts the job (--max-restarts) instead of
    stopping: there a signal stop, which left a checkpoint, exits 0 and a rerun resumes."""
    main = env_rank() == 0
    if r.bad_images and main:
        print(f"skipped {len(r.bad_images)} unreadable image(s) (listed in {r.run_dir / 'summary.json'})")
    if r.completed:
        return None
    if main:
        print(f"stopped at step {r.step}/{total_steps} ({r.stopped_by}); checkpoint {r.run_dir / 'checkpoint.pt'}; "
              f"{how_to_continue}")
    if r.stopped_by not in ("SIGINT", "SIGTERM"):
        return 0
    if under_torchrun():
        if main:
            log.info("stopped on %s under torchrun: exit status 0, so that torchrun does not restart the job; "
                     "it resumes from the checkpoint when rerun", r.stopped_by)
        return 0
    return 128 + signal.Signals[r.stopped_by].value


def _report(result, how_to_continue: str = "rerun with --resume to continue") -> int:
    from bitlab.train.finetune import FinetuneResult

    r: FinetuneResult = result
    code = report_unfinished(r, r.plan["total_steps"], how_to_continue)
    if code is not None or env_rank() != 0:
        return code or 0
    m = r.metrics
    print(f"{r.step} steps on {r.plan['dataset_size']} images, {r.plan['num_classes']} classes: "
          f"top-1 {m['top1']:.4f}, top-5 {m['top5']:.4f}, loss {m['loss']:.4f} ({m['n']} validation images)")
    print(f"run directory: {r.run_dir} (final.pt, metrics.csv, summary.json)")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from bitlab.train.finetune import FinetuneConfig, finetune

    return _report(finetune(config_from_args(FinetuneConfig, args)))


def _fewshot(args: argparse.Namespace) -> int:
    from bitlab.train.finetune import FewShotConfig, fewshot

    out = fewshot(config_from_args(FewShotConfig, args))
    if out["stopped"] is not None:
        return _report(out["stopped"], "rerun the same command to continue")
    print(f"{'K':>4} {'runs':>4} {'top-1 median':>12} {'min':>7} {'max':>7} {'std':>7}")
    for row in out["summary"]:
        print(f"{row['k']:>4} {row['runs']:>4} {row['top1_median']:>12.4f} {row['top1_min']:>7.4f} "
              f"{row['top1_max']:>7.4f} {row['top1_std']:>7.4f}")
    print(f"per run: {out['csv']}; per K: {out['summary_csv']}")
    return 0
