"""`bitlab demo`: the main flow on the embedded offline sample, in about a minute on 2 cores.

make-ooc on the sample (with its variants) -> evaluate three models together on it and on the
sample's original photos (the stand-in for the ILSVRC-2012 validation set, which does not ship) ->
the report's figures and tables (context.png and the context scores among them).

The models: the two real ImageNet-1k classifiers that install offline (EfficientNet-Lite0, the
baseline on the left of the top-5 figures, and the larger Lite2), and a bitlab BiT-S-R50x1 that
goes through the official npz format and back. No official BiT weights install offline, so the
BiT model has random weights and is labelled so in every figure: it shows the machinery, not
the paper's result.
"""
from __future__ import annotations

import csv
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bitlab import io, report
from bitlab.eval.evaluate import EvaluateConfig, evaluate_many
from bitlab.models import create_model, save_npz, zoo
from bitlab.ooc.build import build_demo
from bitlab.paths import SAMPLE_DIR

log = logging.getLogger(__name__)

# 128 px keeps the R50x1 pass over the sample at a few seconds on 2 CPU cores.
BIT_DEMO_SIZE = 128
BIT_DEMO_LABEL = "BiT-S-R50x1 (random weights)"


def sample_photos(sample_dir: Path = SAMPLE_DIR) -> list[Path]:
    photos = sorted((sample_dir / "openimages" / "validation").glob("*.jpg"))
    if not photos:
        raise FileNotFoundError(f"{sample_dir}: the embedded sample is missing (it ships with bitlab: "
                                "ooc_dataset/sample in the source tree, bitlab/ooc_dataset/sample in a wheel)")
    return photos


def in_context_set(ooc: Path, out: Path, sample_dir: Path = SAMPLE_DIR) -> Path:
    """The original photos behind `ooc`'s foregrounds, as a manifest folder with their classes:
    each object in its own context."""
    with (ooc / "manifest.csv").open(newline="", encoding="utf-8") as f:
        rows = {r["fg_uid"]: r for r in csv.DictReader(f)}  # a photo may hold two foregrounds
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    manifest = []
    for _, r in sorted(rows.items()):
        src = sample_dir / "openimages" / (r.get("fg_split") or "validation") / f"{r['fg_image_id']}.jpg"
        dst = Path(r["class"]) / src.name
        (out / dst.parent).mkdir(exist_ok=True)
        shutil.copyfile(src, out / dst)
        manifest.append({"file": dst.as_posix(), "class": r["class"], "ilsvrc_wnids": r["ilsvrc_wnids"],
                         "ilsvrc_indices": r["ilsvrc_indices"], "fg_uid": r["fg_uid"]})
    with io.atomic_write(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(manifest[0]))
        w.writeheader()
        w.writerows(manifest)
    return out


@dataclass
class DemoResult:
    ooc: Path
    in_context: Path
    summaries: dict[str, dict] = field(default_factory=dict)  # results folder -> summary
    figures: list[Path] = field(default_factory=list)


def run_demo(out: Path, figures: Path, sample_dir: Path = SAMPLE_DIR) -> DemoResult:
    """make-ooc -> evaluate (offline ImageNet models, BiT-S-R50x1 via npz) -> report."""
    io.check_can_create_folder(out, "--out")  # before the minute of work, not after it
    io.check_can_create_folder(figures, "--figures")
    out = Path(out)
    same_as = ["bitlab", "make-ooc", "--demo", "--out", str(out / "ooc")] if sample_dir == SAMPLE_DIR else None
    ooc = build_demo(out / "ooc", sample_dir, command=same_as)  # `bitlab make-ooc --demo`
    res = DemoResult(ooc, in_context_set(ooc, out / "in_context", sample_dir))
    torch.manual_seed(0)
    npz = save_npz(create_model("BiT-S-R50x1"), out / "BiT-S-R50x1-random.npz")
    models = [dict(model=name) for name in zoo.OFFLINE_MODELS] + [
              dict(model="BiT-S-R50x1", pretrained=str(npz), image_size=BIT_DEMO_SIZE, label=BIT_DEMO_LABEL,
                   pretraining_data="none (random weights)")]
    dirs = {}
    for role, data in (("ooc", res.ooc), ("val", res.in_context)):
        # every model in one pass per set: each image is decoded once for all of them
        cfgs = [EvaluateConfig(data=str(data), out=str(out / "results" / f"{report.slug(m.get('label', m['model']))}_{role}"),
                               role=role, **m) for m in models]
        for cfg, summary in zip(cfgs, evaluate_many(cfgs)):
            res.summaries[cfg.out] = summary
            dirs[cfg.model, role] = Path(cfg.out)
    # Baseline first: the report's top-5 figures put the first model on the left.
    res.figures = report.make_report([dirs[m["model"], role] for m in models for role in ("ooc", "val")], figures)
    return res
