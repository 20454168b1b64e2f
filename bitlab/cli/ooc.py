"""`bitlab openimages fetch`, `bitlab backgrounds fetch`, `bitlab make-ooc [plan]`."""
from __future__ import annotations

import argparse
from pathlib import Path

from bitlab.cli import download_size_arg
from bitlab.errors import BitlabError
from bitlab.paths import OOC_DATASET_DIR

_CLASSES = str(OOC_DATASET_DIR / "classes.csv")
_CATEGORIES = str(OOC_DATASET_DIR / "backgrounds.csv")
_SELECTION = str(OOC_DATASET_DIR / "selection.csv")


def register(sub: argparse._SubParsersAction) -> None:
    _register_openimages(sub)
    _register_backgrounds(sub)
    _register_make_ooc(sub)


def _register_openimages(sub: argparse._SubParsersAction) -> None:
    from bitlab.fileio import MAX_DOWNLOAD_BYTES

    p = sub.add_parser("openimages", help="OpenImages segmentation data for make-ooc")
    osub = p.add_subparsers(dest="openimages_command", metavar="ACTION", required=True)
    f = osub.add_parser("fetch", help="download the CSVs, only the needed mask zips/members and JPEGs "
                        "(checksummed, resumable)")
    f.add_argument("out_pos", nargs="?", metavar="OUT", help="the OpenImages tree to fill (same as --out)")
    f.add_argument("--out", help="the OpenImages tree to fill")
    f.add_argument("--classes", default=_CLASSES, help=f"class table (default: {_CLASSES})")
    f.add_argument("--split", default="validation",
                   help="train, validation or test (default: validation: ~43 MB of CSVs, then 3-4 MB per mask zip)")
    f.add_argument("--selection", help="fetch exactly the foregrounds of this selection.csv")
    f.add_argument("--max-per-class", type=int, default=25, help="candidate instances to download per class")
    f.add_argument("--seed", type=int, default=0, help="which candidates (seeded order)")
    f.add_argument("--base-url", help="mirror of the annotation bucket")
    f.add_argument("--images-url", help="mirror of the image bucket (<URL>/<split>/<ImageID>.jpg)")
    f.add_argument("--no-pins", action="store_true",
                   help="do not require the md5s bitlab pins for upstream files (observed 2020-07-15)")
    f.add_argument("--workers", type=int, default=8, help="parallel image downloads")
    download_size_arg(f, MAX_DOWNLOAD_BYTES, "file")
    _filter_args(f)
    f.set_defaults(func=_openimages_fetch)


def _register_backgrounds(sub: argparse._SubParsersAction) -> None:
    from bitlab.ooc.backgrounds import MAX_IMAGE_DOWNLOAD

    p = sub.add_parser("backgrounds", help="background photos for make-ooc")
    bsub = p.add_subparsers(dest="backgrounds_command", metavar="ACTION", required=True)
    f = bsub.add_parser("fetch", help="openly licensed backgrounds from Openverse (or a folder), with licences")
    f.add_argument("--out", required=True, help="backgrounds root (<category>/<file> + backgrounds.csv)")
    f.add_argument("--spec", default=_CATEGORIES, help=f"category table with search terms (default: {_CATEGORIES})")
    f.add_argument("--per-category", type=int, help="searching: images per category (default 3); with --folder: "
                   "the least each category needs (default 1), as every image of its folder is imported")
    f.add_argument("--categories", default="", help="comma-separated subset of categories")
    f.add_argument("--licenses", default="cc0,pdm,by,by-sa",
                   help="Openverse licence codes to accept (must allow modification; default cc0,pdm,by,by-sa)")
    f.add_argument("--min-side", type=int, default=512, help="smallest acceptable shorter side in px")
    f.add_argument("--folder", help="import every image of <FOLDER>/<category>/ instead of searching")
    f.add_argument("--api-url", help="Openverse images endpoint, http(s) (default: the public API)")
    download_size_arg(f, MAX_IMAGE_DOWNLOAD, "image file")
    f.set_defaults(func=_backgrounds_fetch)


def _register_make_ooc(sub: argparse._SubParsersAction) -> None:
    # The step is optional (no step: build), which argparse's "STEP ..." would hide: say both forms.
    p = sub.add_parser("make-ooc", help="build the out-of-context dataset (or `make-ooc plan` its selection)",
                       usage="%(prog)s [options]         build (--demo, or --openimages and --backgrounds)\n"
                             "       %(prog)s plan [options]    choose the selection first (see plan --help)")
    p.add_argument("--demo", action="store_true", help="build from the embedded offline sample (seconds)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--openimages", help="OpenImages tree (see `bitlab openimages fetch`)")
    p.add_argument("--backgrounds", help="backgrounds root (see `bitlab backgrounds fetch`)")
    p.add_argument("--selection", default=_SELECTION, help=f"selection from `make-ooc plan` (default: {_SELECTION})")
    p.add_argument("--classes", default=_CLASSES, help=f"class table (default: {_CLASSES})")
    p.add_argument("--background-categories", default=_CATEGORIES,
                   help=f"background categories with `usual_for` (default: {_CATEGORIES})")
    p.add_argument("--size", type=int, default=512, help="output side in px (default 512)")
    p.add_argument("--object-scale", type=float, default=0.8,
                   help="object's longest side / output side (default 0.8, the paper's)")
    p.add_argument("--placement", choices=["center", "random"], default="center",
                   help="where the object goes (default: centred; random is seeded)")
    p.add_argument("--feather", type=float, default=0.0, help="Gaussian sigma in px for a soft edge (default: hard)")
    p.add_argument("--erode", type=int, default=0, help="shrink the mask by N px before pasting")
    p.add_argument("--seed", type=int, default=0, help="seed for --placement random")
    p.add_argument("--format", choices=["png", "jpg"], default="png",
                   help="png (default, lossless) or jpg (about 2.4x faster to build and 4x smaller; lossy)")
    p.add_argument("--png", choices=["fast", "opencv", "small"], default="fast",
                   help="PNG encoding, all lossless: fast (default; bitlab's writer, ~3x OpenCV's speed), "
                        "opencv (OpenCV's default), small (OpenCV level 9: ~10%% smaller, slow)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality for --format jpg (default 95)")
    p.add_argument("--workers", type=int, default=0, help="threads (default: one per core)")
    p.add_argument("--skip-bad", action="store_true", help="skip unusable inputs and report them instead of stopping")
    p.add_argument("--variants", nargs="*", metavar="VARIANT",
                   help="controls to build beside the composites in OUT/variants/: only_fg (the object on grey "
                        "128), no_fg (each background alone), mixed_rand (the object on a random background of "
                        "another category); default: none, or all three with --demo; `--variants` alone: none")
    p.set_defaults(func=_make_ooc)
    _register_plan(p.add_subparsers(dest="make_ooc_step", metavar="[plan]", prog=p.prog))  # not from the usage above


def _register_plan(psub: argparse._SubParsersAction) -> None:
    q = psub.add_parser("plan", help="choose foregrounds and backgrounds; write selection.csv (+ .json)")
    q.add_argument("--out", required=True, help="the selection.csv to write")
    q.add_argument("--openimages", required=True, help="OpenImages tree")
    q.add_argument("--backgrounds", required=True, help="backgrounds root")
    q.add_argument("--classes", default=_CLASSES, help=f"class table (default: {_CLASSES})")
    q.add_argument("--background-categories", default=_CATEGORIES,
                   help=f"background category table (default: {_CATEGORIES})")
    q.add_argument("--split", default="validation",
                   help="the OpenImages split to choose foregrounds from (default: validation)")
    q.add_argument("--seed", type=int, default=0, help="which candidates are chosen (seeded order; default 0)")
    q.add_argument("--per-class", type=int, help="foregrounds per class (default: classes.csv n_foregrounds)")
    q.add_argument("--per-category", type=int, default=1, help="background files per category (default 1)")
    q.add_argument("--min-object-px", type=int, default=200, help="smallest longest side of an object, in px")
    q.add_argument("--min-mask-fill", type=float, default=0.15, help="smallest mask area / tight-box area")
    q.add_argument("--min-background-px", type=int, default=512, help="smallest shorter side of a background")
    _filter_args(q)
    q.set_defaults(func=_plan)


def _filter_args(p: argparse.ArgumentParser) -> None:
    from bitlab.ooc.openimages import AnnotationFilter

    d = AnnotationFilter()
    g = p.add_argument_group("annotation filters")
    g.add_argument("--min-iou", type=float, default=d.min_predicted_iou,
                   help=f"smallest PredictedIoU (default {d.min_predicted_iou}; 0 also accepts empty values)")
    g.add_argument("--min-box-fraction", type=float, default=d.min_box_fraction,
                   help=f"smallest annotation box side / image side (default {d.min_box_fraction})")
    g.add_argument("--allow-group-of", action="store_true", help="accept IsGroupOf boxes")
    g.add_argument("--allow-depiction", action="store_true", help="accept IsDepiction boxes")
    g.add_argument("--allow-truncated", action="store_true", help="accept IsTruncated boxes")
    g.add_argument("--no-occluded", action="store_true", help="reject IsOccluded boxes")
    g.add_argument("--allow-unmatched-boxes", action="store_true",
                   help="accept masks whose box is missing from the box CSV")


def _filters(args: argparse.Namespace):
    from bitlab.ooc.openimages import AnnotationFilter

    return AnnotationFilter(min_predicted_iou=args.min_iou, min_box_fraction=args.min_box_fraction,
                            allow_group_of=args.allow_group_of, allow_depiction=args.allow_depiction,
                            allow_truncated=args.allow_truncated, allow_occluded=not args.no_occluded,
                            require_box_match=not args.allow_unmatched_boxes)


def _openimages_fetch(args: argparse.Namespace) -> None:
    from bitlab.ooc import openimages

    out = args.out or args.out_pos
    if not out or (args.out and args.out_pos and args.out != args.out_pos):
        raise BitlabError("give the tree folder once, as OUT or --out")
    cfg = openimages.FetchConfig(out=out, classes=args.classes, split=args.split, selection=args.selection,
                                 max_per_class=args.max_per_class, seed=args.seed, filters=_filters(args),
                                 workers=args.workers, max_download=args.max_download)
    if args.base_url:
        cfg.base_url = args.base_url.rstrip("/")
    if args.images_url:
        cfg.images_url = args.images_url.rstrip("/")
    if args.no_pins:
        cfg.pins = {}
    s = openimages.fetch(cfg)
    print(f"{out}: {s['instances']} instance(s); mask zips downloaded/extracted: {s['mask_zips']}; "
          f"images: {s['images']}")


def _backgrounds_fetch(args: argparse.Namespace) -> None:
    from bitlab.ooc import backgrounds

    cfg = backgrounds.BackgroundsConfig(out=args.out, spec=args.spec, per_category=args.per_category,
                                        categories=[c for c in args.categories.split(",") if c],
                                        licenses=[x.strip() for x in args.licenses.split(",") if x.strip()],
                                        min_side=args.min_side, folder=args.folder,
                                        max_download=args.max_download)
    if args.api_url:
        cfg.api_url = args.api_url
    s = backgrounds.fetch(cfg)
    print(f"{args.out}: {sum(s['counts'].values())} image(s) in {len(s['counts'])} categories")
    for why in s["skipped"]:
        print(f"  skipped, does not decode: {why}")


def _plan(args: argparse.Namespace) -> None:
    from bitlab.ooc import select

    cfg = select.PlanConfig(out=args.out, openimages=args.openimages, backgrounds=args.backgrounds,
                            classes=args.classes, background_categories=args.background_categories, split=args.split,
                            seed=args.seed, per_class=args.per_class, per_category=args.per_category,
                            filters=_filters(args), min_object_px=args.min_object_px,
                            min_mask_fill=args.min_mask_fill, min_background_px=args.min_background_px)
    _, report = select.plan(cfg)
    print(f"{args.out}: {report['foregrounds']} foregrounds x {report['backgrounds']} backgrounds "
          f"= {report['images']} images")
    for folder, stages in report["funnel"].items():
        print(f"  {folder:<20} " + ", ".join(f"{k} {v}" for k, v in stages.items()))


def _make_ooc(args: argparse.Namespace) -> None:
    from bitlab.ooc import build

    if not args.out:
        raise BitlabError("--out is required")
    opts = dict(size=args.size, object_scale=args.object_scale, placement=args.placement, feather=args.feather,
                erode=args.erode, seed=args.seed, format=args.format, png=args.png, jpeg_quality=args.jpeg_quality,
                workers=args.workers, skip_bad=args.skip_bad)
    if args.variants is not None:
        opts["variants"] = args.variants
    if args.demo:
        cfg = build.demo_config(args.out, **opts)
    else:
        if not (args.openimages and args.backgrounds):
            raise BitlabError("--openimages and --backgrounds are required (or --demo)")
        cfg = build.MakeOOCConfig(out=args.out, openimages=args.openimages, backgrounds=args.backgrounds,
                                  selection=args.selection, classes=args.classes,
                                  background_categories=args.background_categories, **opts)
    s = build.build(cfg, command=["bitlab", *args.argv])
    print(f"{s['out']}: {s['images']} images ({s['classes']} classes, {s['foregrounds']} foregrounds x "
          f"{s['backgrounds']} backgrounds); built {s['composed']}, kept {s['reused']} in {s['seconds']} s")
    if s["variants"]:
        print("variants in " + str(Path(s["out"]) / "variants") + ": "
              + ", ".join(f"{v} {n} images" for v, n in s["variants"].items()))
    if s["skipped"]:
        print(f"skipped {len(s['skipped'])} bad input(s):")
        print("\n".join(f"  {p}" for p in s["skipped"]))
