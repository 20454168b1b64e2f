"""`bitlab hyperrule`, `bitlab finetune`, `bitlab fewshot`."""
from __future__ import annotations

import argparse
import json
import logging
import signal

from bitlab import hyperrule
from bitlab.cli.flags import add_config, add_settings, settings_from_args
from bitlab.train.config import FewShotConfig, FinetuneConfig
from bitlab.train.torchrun import env_rank, under_torchrun

log = logging.getLogger(__name__)

# Flags by group, in help order; each flag's type, default and help come from the settings
# dataclasses (bitlab.train.config), which tests/test_cli_settings.py checks are all offered.
WHAT = ("model", "pretrained", "random_init", "data", "out", "val_data", "val_split", "val_fraction", "seed",
        "split_seed")
RULE = ("batch_size", "batch_split", "base_lr", "schedule", "scale_schedule", "mixup", "image_size", "resolution",
        "square_resize", "random_crop", "flip")
RUNNING = ("eval_every", "checkpoint_every", "log_every", "eval_batch_size", "workers", "device", "precision",
           "channels_last", "compile", "skip_bad_images", "stop_after", "progress")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hyperrule", help="print what BiT-HyperRule chooses for a task")
    p.add_argument("--dataset-size", type=int, required=True, metavar="N", help="training examples actually used")
    p.add_argument("--image-size", type=int, nargs=2, required=True, metavar=("H", "W"), help="typical image size")
    p.add_argument("--batch-size", type=int, default=hyperrule.REFERENCE_BATCH,
                   help="global batch (default %(default)s, the rule's)")
    p.add_argument("--base-lr", type=float, default=hyperrule.BASE_LR, help="peak lr (default %(default)s, the "
                   "rule's at batch 512; not scaled with the batch, as officially)")
    p.add_argument("--scale-schedule", action="store_true", help="scale step counts by 512/batch (not official)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_hyperrule)

    p = sub.add_parser("finetune", help="fine-tune a model on an image dataset by BiT-HyperRule")
    _add_finetune_args(p, FinetuneConfig, what=(*WHAT, "examples_per_class"), running=(*RUNNING, "resume"))
    p.set_defaults(func=_finetune)

    p = sub.add_parser("fewshot", help="few-shot fine-tuning over several K and seeds; median and spread per K")
    _add_finetune_args(p, FewShotConfig, what=tuple(n for n in WHAT if n != "seed") + ("shots", "seeds"),
                       running=(*RUNNING, "jobs"))
    # Set per run by the sweep: refused by name (else argparse would take --seed as short for --seeds).
    p.add_argument("--seed", nargs=1, action=_NotInSweep, why="each run's seed comes from --seeds")
    p.add_argument("--resume", nargs=0, action=_NotInSweep, why="a sweep resumes its stopped runs by itself")
    p.set_defaults(func=_fewshot)


def _add_finetune_args(p: argparse.ArgumentParser, cls: type, *, what: tuple[str, ...], running: tuple[str, ...]
                       ) -> None:
    add_settings(p.add_argument_group("what"), cls, what)
    add_settings(p.add_argument_group("BiT-HyperRule (defaults: the rule's choices)"), cls, RULE)
    g = p.add_argument_group("running")
    add_settings(g, cls, running)
    add_config(g)


class _NotInSweep(argparse.Action):
    """A finetune flag that a few-shot sweep sets per run: refused (exit 2) with `why`, not shown in help."""

    def __init__(self, option_strings: list[str], dest: str, *, why: str, **kwargs) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.why = why

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} is not a fewshot flag: {self.why}")


def _hyperrule(args: argparse.Namespace) -> None:
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


def _report(r, how_to_continue: str = "rerun with --resume to continue") -> int:
    """Print a fine-tuning run's result (`loop.TrainResult`); the exit code."""
    code = report_unfinished(r, r.total_steps, how_to_continue)
    if code is not None or env_rank() != 0:
        return code or 0
    m = r.metrics
    print(f"{r.step} steps on {r.plan.dataset_size} images, {r.plan.num_classes} classes: "
          f"top-1 {m['top1']:.4f}, top-5 {m['top5']:.4f}, loss {m['loss']:.4f} ({m['n']} validation images)")
    print(f"run directory: {r.run_dir} (final.pt, metrics.csv, summary.json)")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from bitlab.train.finetune import finetune

    return _report(finetune(settings_from_args(FinetuneConfig, args)))


def _fewshot(args: argparse.Namespace) -> int:
    from bitlab.train.finetune import fewshot

    out = fewshot(settings_from_args(FewShotConfig, args))
    if out.stopped is not None:
        return _report(out.stopped, "rerun the same command to continue")
    print(f"{'K':>4} {'runs':>4} {'top-1 median':>12} {'min':>7} {'max':>7} {'std':>7}")
    for row in out.summary:
        print(f"{row['k']:>4} {row['runs']:>4} {row['top1_median']:>12.4f} {row['top1_min']:>7.4f} "
              f"{row['top1_max']:>7.4f} {row['top1_std']:>7.4f}")
    print(f"per run: {out.csv}; per K: {out.summary_csv}")
    return 0
