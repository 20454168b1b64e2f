"""`bitlab demo`: the main flow on the embedded offline sample, in about a minute on 2 cores.

make-ooc on the sample (with its variants: each object alone on grey, each background alone, each
object on a random other background) -> evaluate four models together on it and on the sample's
source photos (the stand-in for the ILSVRC-2012 validation set, which does not ship) -> the report's
figures and tables (context.png and the context scores among them) -> `summary.json`, what the
figures show in numbers.

The sample (ooc_dataset/README.md): nine real photos of objects of the paper's classes with real
masks (Tux Paint stamps cut out by their alpha channel, and a lighthouse) on twelve real scenes.
Its source photos are each object on flat grey (its neutral version) or, for the lighthouse, in
its own scene.

The models: the three real ImageNet-1k classifiers that install offline, EfficientNet-Lite0 (the
baseline, on the left of the top-5 figures), -Lite2 (the largest, on the right) and -Lite1, and a
bitlab BiT-S-R50x1 that goes through the official npz format and back. No official BiT weights
install offline, so the BiT model has random weights and is labelled so in every figure: it shows
the machinery, not the paper's result.
"""
from __future__ import annotations

import csv
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bitlab import fileio, report
from bitlab.data import imagenet
from bitlab.eval import context
from bitlab.eval.evaluate import EvaluateConfig, evaluate_many
from bitlab.eval.results import Results, load_results
from bitlab.models import create_model, save_npz
from bitlab.ooc.build import build_demo
from bitlab.paths import SAMPLE_DIR

log = logging.getLogger(__name__)

# Random weights only mark chance level, so the smallest input that keeps the R50x1's shape: at 64 px
# its pass costs ~0.35 GFLOPs an image, less than Lite0's at 224 px (0.4); at 128 px it was the
# costliest of the demo's four models (~1.3), a third of the demo's evaluation time.
BIT_DEMO_SIZE = 64
BIT_DEMO_LABEL = "BiT-S-R50x1 (random weights)"
BASELINE = "efficientnet_lite0.offline_in1k"  # the paper's ILSVRC-2012 model: left in Fig. 12 left / 13
COMPARED = "efficientnet_lite2.offline_in1k"  # the largest offline model: right
# The report compares the first two out-of-context results: the baseline, then the compared model.
OFFLINE = [BASELINE, COMPARED, "efficientnet_lite1.offline_in1k"]
# What every figure and table calls the offline models (the notebooks' names), not their registry ids.
LABELS = {BASELINE: "EfficientNet-Lite0", COMPARED: "EfficientNet-Lite2", "efficientnet_lite1.offline_in1k": "EfficientNet-Lite1"}
FIG13_IMAGES = 4
SUMMARY = "summary.json"


def sample_photos(sample_dir: Path = SAMPLE_DIR) -> list[Path]:
    photos = sorted((sample_dir / "openimages" / "validation").glob("*.jpg"))
    if not photos:
        raise FileNotFoundError(f"{sample_dir}: the embedded sample is missing (it ships with bitlab: "
                                "ooc_dataset/sample in the source tree, bitlab/ooc_dataset/sample in a wheel)")
    return photos


def in_context_set(ooc: Path, out: Path, sample_dir: Path = SAMPLE_DIR) -> Path:
    """The source photos behind `ooc`'s foregrounds, as a manifest folder with their classes:
    each object in its own photo (for the sample: on flat grey, or in its own scene)."""
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
    with fileio.atomic_write(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
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
    summary: dict = field(default_factory=dict)  # what the figures show (`demo_summary`), as in OUT/summary.json


def run_demo(out: Path, figures: Path, sample_dir: Path = SAMPLE_DIR) -> DemoResult:
    """make-ooc (with variants) -> evaluate (offline ImageNet models, BiT-S-R50x1 via npz) -> report
    -> summary."""
    fileio.check_can_create_folder(out, "--out")  # before the minute of work, not after it
    fileio.check_can_create_folder(figures, "--figures")
    out = Path(out)
    with fileio.lock_folder(out, "demo"):  # one demo fills a folder at a time
        return _run_demo(out, figures, sample_dir)


def _run_demo(out: Path, figures: Path, sample_dir: Path) -> DemoResult:
    same_as = ["bitlab", "make-ooc", "--demo", "--out", str(out / "ooc")] if sample_dir == SAMPLE_DIR else None
    ooc = build_demo(out / "ooc", sample_dir, command=same_as)  # `bitlab make-ooc --demo`
    res = DemoResult(ooc, in_context_set(ooc, out / "in_context", sample_dir))
    torch.manual_seed(0)
    npz = save_npz(create_model("BiT-S-R50x1", pretrained=False), out / "BiT-S-R50x1-random.npz")
    models = [dict(model=name, label=LABELS[name]) for name in OFFLINE] + [
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
    # The baseline's mistakes that fit the background: its top-1 among its top 5 on the bare
    # background (the no_fg variant evaluate scored beside the composites).
    a, b = load_results(dirs[BASELINE, "ooc"]), load_results(dirs[COMPARED, "ooc"])
    fits = report.fitting_mistakes(a)
    bare = context.background_topk(a.variant_predictions[a.variant_predictions["variant"] == "no_fg"])
    chosen = report.choose_images(a, b, FIG13_IMAGES, fits)
    # Baseline first: the report's top-5 figures put the first model on the left.
    res.figures = report.make_report([dirs[m["model"], role] for m in models for role in ("ooc", "val")], figures,
                                     images=chosen, fits=fits)
    res.summary = demo_summary(a, b, load_results(dirs[BASELINE, "val"]), chosen, fits, bare,
                               [load_results(d) for d in dirs.values()])
    fileio.write_json(out / SUMMARY, res.summary)
    return res


def demo_summary(a: Results, b: Results, a_val: Results, chosen: list[str], fits: set[str],
                 bare: dict[str, list[int]], results: list[Results]) -> dict:
    """What the demo's figures show, in numbers (written to OUT/summary.json, checked by tests):
    Fig. 13's images with both models' top-1 and why each is there, the objects the baseline gets
    right in their own photo and wrong out of context, the heat maps' background effect and every
    model's top-1 with its interval and context scores."""
    names = imagenet.names()
    pa, pb = (r.predictions.set_index("image") for r in (a, b))
    fig13 = [{"image": img, "class": pa.at[img, "class"], "background": pa.at[img, "background"],
              "baseline_top1": pa.at[img, "top1_name"], "baseline_right": bool(pa.at[img, "top1_correct"]),
              "compared_top1": pb.at[img, "top1_name"], "compared_right": bool(pb.at[img, "top1_correct"]),
              "meets_rule": img in set(report.telling_images(a, b)), "fits_background": img in fits,
              "background_top5": [names[i] for i in bare[pa.at[img, "bg_uid"]]]} for img in chosen]
    own = a_val.predictions.set_index("fg_uid")
    fooled = []
    for uid, g in a.predictions[~a.predictions["usual_context"].astype(bool)].groupby("fg_uid", sort=True):
        wrong = g[~g["top1_correct"]]
        if uid in own.index and own.at[uid, "top1_correct"] and len(wrong):
            fooled.append({"fg_uid": uid, "class": g["class"].iloc[0], "own_photo_top1": own.at[uid, "top1_name"],
                           "wrong_on": {r.background: r.top1_name for r in wrong.itertuples()},
                           "right_on": sorted(g.loc[g["top1_correct"], "background"])})
    models = {}
    for r in results:
        s = r.summary
        entry = models.setdefault(r.label, {"pretraining_data": s["model"]["pretraining_data"]})
        entry[f"{r.role}_top1"], entry[f"{r.role}_top1_ci"] = s["top1"], s["top1_ci"]
        if r.role == "ooc":
            entry["ooc_top1_excluding_usual_context"] = s.get("excluding_usual_context", s)["top1"]
            entry["background_effect"] = s.get("background_effect")
            if c := r.context:  # the same objects alone, and the mistakes their backgrounds suggest
                entry["context"] = {k: c[k] for k in ("object_alone_correct", "fooled_by_context",
                                                      "context_consistent_share_of_errors") if k in c}
                if "background_gap" in c:
                    entry["context"]["background_gap"] = c["background_gap"]["overall"]
    return {"baseline": a.label, "compared": b.label, "fig12_left": chosen[:1], "fig13": fig13,
            "fig13_meet_rule": sum(f["meets_rule"] for f in fig13),
            "fig13_fit_background": sum(f["fits_background"] for f in fig13),
            "baseline_fooled_out_of_context": fooled,
            "baseline_background_top5": {uid: [names[i] for i in ids] for uid, ids in sorted(bare.items())},
            "models": models}
