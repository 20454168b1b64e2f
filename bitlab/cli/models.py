"""`bitlab models`, `bitlab convert`, `bitlab weights`, `bitlab export`."""
from __future__ import annotations

import argparse
import json

from bitlab.cli import download_size_arg
from bitlab.errors import BitlabError
from bitlab.fileio import MAX_DOWNLOAD_BYTES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model registry with parameter counts")
    p.add_argument("--ablations", action="store_true", help="also list the BN / plain-conv variants (Tables 4-5)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_models)

    p = sub.add_parser("convert", help="convert a checkpoint between official npz, timm and bitlab files")
    p.add_argument("src", help="official .npz, bitlab .pt or timm state dict")
    p.add_argument("dst", help="output file (.npz -> official schema, else bitlab unless --to)")
    p.add_argument("--to", choices=["npz", "timm", "bitlab"], help="output format (default: from DST's suffix)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("weights", help="pretrained weights: the official BiT files and timm's, in the cache")
    wsub = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    w = wsub.add_parser("list", help="the official BiT weight files and timm's cached weights: which are cached, where")
    w.set_defaults(func=_list_weights)
    w = wsub.add_parser("download", help="fetch pretrained weights into the cache, e.g. to copy it to an offline "
                        "machine (official .npz: verified, resumable; timm names: their hub files)")
    w.add_argument("names", nargs="+", metavar="NAME", help="e.g. BiT-M-R50x1, BiT-M-R50x1-ILSVRC2012 or a timm name "
                   "such as resnet50.a1_in1k")
    w.add_argument("--out", help="folder for official .npz files (default: the cache, $BITLAB_CACHE/weights)")
    w.add_argument("--base-url", help="http(s) mirror serving <NAME>.npz (default: $BITLAB_WEIGHTS_URL, else the "
                   "official bucket)")
    w.add_argument("--sha256", help="expected sha256 (one NAME only)")
    download_size_arg(w, MAX_DOWNLOAD_BYTES, "file")
    w.set_defaults(func=_download)

    p = sub.add_parser("export", help="write a model as ONNX or TorchScript, weight standardisation folded in")
    p.add_argument("model", help="model name (see `bitlab models`; any timm name works)")
    p.add_argument("--pretrained", help="weights file (official .npz, bitlab or timm)")
    p.add_argument("--out", required=True, help="file to write (FILE.onnx, or FILE.pt with --format torchscript)")
    p.add_argument("--format", choices=["onnx", "torchscript"], help="default: onnx for a .onnx file")
    p.add_argument("--num-classes", type=int, help="head size of the weights file, if not the name's default")
    p.add_argument("--image-size", type=int, help="input resolution of the exported graph (default: the model's)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func=_export)


def _list_weights(args: argparse.Namespace) -> None:
    from bitlab import paths
    from bitlab.models import zoo

    def size(path) -> str:
        return f"{path.stat().st_size / 1e6:.1f} MB" if path.is_file() else ""

    rows = [(name, *zoo.cached_official(name)) for name in zoo.WEIGHT_NAMES]
    table = [(name, status, size(path) if status != "missing" else "", str(path) if status != "missing" else "")
             for name, status, path in rows]
    table += [(repo, "cached", f"{nbytes / 1e6:.1f} MB", str(folder))
              for repo, nbytes, folder in zoo.cached_timm_weights()]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    print(f"official BiT weights: {paths.weights_dir()} (${paths.CACHE_ENV}); timm's: {zoo.hub_cache()} "
          "(huggingface_hub's cache: HF_HOME, HF_HUB_CACHE); `bitlab weights download NAME` fills them")


def _models(args: argparse.Namespace) -> None:
    from bitlab.models import registry

    rows = [registry.describe(n) for n in registry.list_models(include_ablations=args.ablations)]
    if args.json:
        print("\n".join(json.dumps(r) for r in rows))
        return
    def millions(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"  # README's "23.50 M": always two decimals

    table = [(r["name"], r["upstream"], str(r["classes"]), str(r.get("resolution", 224)),
              millions(r.get("backbone_params_m")), millions(r.get("params_m"))) for r in rows]
    header = ("name", "upstream", "classes", "res", "backbone M", "total M")
    # Columns as wide as their longest entry; text left-aligned, numbers right-aligned.
    widths = [max(len(row[i]) for row in (header, *table)) for i in range(len(header))]
    for row in (header, *table):
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    print("Any timm model name is accepted too (e.g. resnetv2_50x1_bit, resnet50).")


def _convert(args: argparse.Namespace) -> None:
    from bitlab.models import checkpoints

    out = checkpoints.convert(args.src, args.dst, to=args.to)
    print(f"wrote {out}")


def _download(args: argparse.Namespace) -> None:
    if args.sha256 and len(args.names) != 1:
        raise BitlabError("--sha256 applies to one NAME only")
    from bitlab import paths
    from bitlab.models import registry, zoo

    for name in args.names:
        if name in zoo.WEIGHT_NAMES or name.startswith("BiT-"):  # an unknown BiT-... is named as such
            path = zoo.download_weights(name, args.out or paths.weights_dir(), base_url=args.base_url,
                                        sha256=args.sha256, max_bytes=args.max_download,
                                        folder_flag="--out" if args.out else f"the weights cache (${paths.CACHE_ENV})")
            print(f"{name}: {path}")
            continue
        if given := [flag for flag, v in (("--out", args.out), ("--base-url", args.base_url),
                                          ("--sha256", args.sha256)) if v]:
            raise BitlabError(f"{name}: {', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to official "
                              f"BiT weights only; timm's go into huggingface_hub's cache ({zoo.hub_cache()})")
        family = registry.family_of(name).name
        if family == "bit":
            raise registry.no_released_weights(name)
        if family == "offline":
            print(f"{name}: packaged with {zoo.OFFLINE_MODELS[name].package} (nothing to download)")
            continue
        registry.create_model(name)  # timm's weights into huggingface_hub's cache (a few old ones: torch's)
        source = zoo.timm_source(name)
        print(f"{name}: timm's weights ({source.hf_hub_id or source.url}) in "
              + (str(zoo.hub_cache()) if source.hf_hub_id else "torch's hub cache ($TORCH_HOME)"))


def _export(args: argparse.Namespace) -> None:
    from bitlab.models.export import ExportConfig, run_export

    out = run_export(ExportConfig(model=args.model, out=args.out, pretrained=args.pretrained, format=args.format,
                                  num_classes=args.num_classes, image_size=args.image_size, force=args.force))
    print(f"wrote {out}")
