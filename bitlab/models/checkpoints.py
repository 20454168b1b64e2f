"""Checkpoints: the official BiT `.npz` schema, timm state dicts and bitlab files, with strict checks.

Key tables (the official `ResNetV2.load_from` in big_transfer's bit_pytorch/models.py and timm's
`_load_weights`), bitlab names on the left:

    root.conv.weight                     resnet/root_block/standardized_conv2d/kernel   stem.conv.weight
    body.blockB.unitNN.gnK.{weight,bias} resnet/blockB/unitNN/{a,b,c}/group_norm/{gamma,beta}
                                                                 stages.(B-1).blocks.(NN-1).normK.*
    body.blockB.unitNN.convK.weight      resnet/blockB/unitNN/{a,b,c}/standardized_conv2d/kernel
                                                                 stages.(B-1).blocks.(NN-1).convK.weight
    body.blockB.unitNN.downsample.weight resnet/blockB/unitNN/a/proj/standardized_conv2d/kernel
                                                                 stages.(B-1).blocks.(NN-1).downsample.conv.weight
    head.gn.{weight,bias}                resnet/group_norm/{gamma,beta}                  norm.*
    head.conv.{weight,bias}              resnet/head/conv2d/{kernel,bias}                head.fc.*

npz kernels are HWIO; torch weights are OIHW (`transpose(3, 2, 0, 1)` and back). Every file is
read safely (`np.load(allow_pickle=False)`, `torch.load(weights_only=True)`) and once; its format
comes from its magic bytes. npz and timm files carry no config: they imply GN+WS (norm=group,
conv=std). bitlab's ResNetV2 and timm's `resnetv2_*_bit` load all three formats.
"""
from __future__ import annotations

import logging
import math
import re
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from bitlab import fileio
from bitlab.errors import BitlabError
from bitlab.models.resnetv2 import ResNetV2, ResNetV2Config

log = logging.getLogger(__name__)

NPZ_PREFIX = "resnet/"
FORMAT_TAG = "bitlab-model"
TRAIN_FORMAT_TAG = "bitlab-train-checkpoint"  # a training run's checkpoint.pt (`bitlab.train.checkpoint`)
Format = Literal["npz", "timm", "bitlab"]
HEAD_KEYS = ("head.conv.weight", "head.conv.bias")


class CheckpointError(BitlabError):
    """A checkpoint that cannot be read or does not fit the model: names the file and the key."""


class CheckpointMismatch(CheckpointError):
    """The file's keys or shapes differ from the model's (often a checkpoint of another architecture)."""


# ----------------------------------------------------------------------------- key tables
_LETTER = {"1": "a", "2": "b", "3": "c"}
_NUMBER = {v: k for k, v in _LETTER.items()}
_NPZ_PARAM = {"weight": "gamma", "bias": "beta"}
_TORCH_PARAM = {v: k for k, v in _NPZ_PARAM.items()}


def _bitlab_to_npz_key(key: str) -> str:
    if key == "root.conv.weight":
        return "resnet/root_block/standardized_conv2d/kernel"
    if m := re.fullmatch(r"head\.gn\.(weight|bias)", key):
        return f"resnet/group_norm/{_NPZ_PARAM[m[1]]}"
    if m := re.fullmatch(r"head\.conv\.(weight|bias)", key):
        return f"resnet/head/conv2d/{'kernel' if m[1] == 'weight' else 'bias'}"
    if m := re.fullmatch(r"body\.(block\d+)\.(unit\d+)\.(.+)", key):
        unit, rest = f"resnet/{m[1]}/{m[2]}", m[3]
        if rest == "downsample.weight":
            return f"{unit}/a/proj/standardized_conv2d/kernel"
        if c := re.fullmatch(r"conv([123])\.weight", rest):
            return f"{unit}/{_LETTER[c[1]]}/standardized_conv2d/kernel"
        if g := re.fullmatch(r"gn([123])\.(weight|bias)", rest):
            return f"{unit}/{_LETTER[g[1]]}/group_norm/{_NPZ_PARAM[g[2]]}"
    raise CheckpointError(f"no official npz key for parameter {key!r} (npz holds GN+WS models only)")


def _npz_to_bitlab_key(key: str) -> str | None:
    if key == "resnet/root_block/standardized_conv2d/kernel":
        return "root.conv.weight"
    if m := re.fullmatch(r"resnet/group_norm/(gamma|beta)", key):
        return f"head.gn.{_TORCH_PARAM[m[1]]}"
    if m := re.fullmatch(r"resnet/head/conv2d/(kernel|bias)", key):
        return f"head.conv.{'weight' if m[1] == 'kernel' else 'bias'}"
    if m := re.fullmatch(r"resnet/(block\d+)/(unit\d+)/(.+)", key):
        unit, rest = f"body.{m[1]}.{m[2]}", m[3]
        if rest == "a/proj/standardized_conv2d/kernel":
            return f"{unit}.downsample.weight"
        if c := re.fullmatch(r"([abc])/standardized_conv2d/kernel", rest):
            return f"{unit}.conv{_NUMBER[c[1]]}.weight"
        if g := re.fullmatch(r"([abc])/group_norm/(gamma|beta)", rest):
            return f"{unit}.gn{_NUMBER[g[1]]}.{_TORCH_PARAM[g[2]]}"
    return None


def _bitlab_to_timm_key(key: str) -> str:
    if key.startswith("root.conv."):
        return "stem.conv." + key[len("root.conv."):]
    if key.startswith("head.gn."):
        return "norm." + key[len("head.gn."):]
    if key.startswith("head.conv."):
        return "head.fc." + key[len("head.conv."):]
    if m := re.fullmatch(r"body\.block(\d+)\.unit(\d+)\.(.+)", key):
        rest = re.sub(r"^gn([123])\.", r"norm\1.", m[3])
        rest = re.sub(r"^downsample\.", "downsample.conv.", rest)
        return f"stages.{int(m[1]) - 1}.blocks.{int(m[2]) - 1}.{rest}"
    raise CheckpointError(f"no timm key for parameter {key!r}")


def _timm_to_bitlab_key(key: str) -> str:
    if key.startswith("stem.conv."):
        return "root.conv." + key[len("stem.conv."):]
    if key.startswith("norm."):
        return "head.gn." + key[len("norm."):]
    if key.startswith("head.fc."):
        return "head.conv." + key[len("head.fc."):]
    if m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", key):
        rest = re.sub(r"^norm([123])\.", r"gn\1.", m[3])
        rest = re.sub(r"^downsample\.conv\.", "downsample.", rest)
        return f"body.block{int(m[1]) + 1}.unit{int(m[2]) + 1:02d}.{rest}"
    raise CheckpointError(f"timm key {key!r} is not part of a BiT ResNetV2")


def bitlab_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """bitlab ResNetV2 state dict -> timm `resnetv2_*_bit` state dict (a pure rename)."""
    return {_bitlab_to_timm_key(k): v for k, v in state_dict.items()}


def timm_to_bitlab(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm `resnetv2_*_bit` state dict -> bitlab ResNetV2 state dict (a pure rename)."""
    return {_timm_to_bitlab_key(k): v for k, v in state_dict.items()}


def npz_to_state_dict(arrays: dict[str, np.ndarray], source: str = "npz") -> dict[str, torch.Tensor]:
    """Official npz arrays -> bitlab state dict (HWIO -> OIHW). Unknown keys, non-float or non-finite
    arrays are an error."""
    out: dict[str, torch.Tensor] = {}
    file_key: dict[str, str] = {}
    for key, value in arrays.items():
        # Some exported files number their convs `standardized_conv2d_N`; big_vision's loader
        # (maybe_convert_big_transfer_format in big_vision/models/bit.py) renames them back.
        name = _npz_to_bitlab_key(re.sub(r"/standardized_conv2d_\d+/", "/standardized_conv2d/", key))
        if name is None:
            raise CheckpointError(f"{source}: unexpected key {key!r} (not in the official BiT schema)")
        if name in out:
            raise CheckpointError(f"{source}: keys {file_key[name]!r} and {key!r} are the same parameter")
        value = np.asarray(value)
        if value.dtype.kind != "f":
            raise CheckpointError(f"{source}: key {key!r} has dtype {value.dtype}, expected floating-point weights")
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        out[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        _check_tensor(source, key, out[name])
        file_key[name] = key
    return out


def state_dict_to_npz(state_dict: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """bitlab state dict -> official npz arrays (OIHW -> HWIO)."""
    out = {}
    for name, tensor in state_dict.items():
        value = tensor.detach().cpu().numpy()
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        out[_bitlab_to_npz_key(name)] = np.ascontiguousarray(value)
    return out


# ----------------------------------------------------------------------------- reading files
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first member header / an empty zip
# torch's legacy (pre-1.6, non-zip) files open with the pickled magic number 0x1950a86a20f9469cfc6c.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
# Official npz and timm BiT files carry no config: both only ever hold GN+WS weights.
_BIT_VARIANT = {"norm": "group", "conv": "std"}
ROOT_NPZ_KEY = "resnet/root_block/standardized_conv2d/kernel"
# The most one npz may decode to: 16 GiB, over 3x the largest official file (BiT-M-R152x4, 4.4 GB),
# so that a header declaring petabytes is refused before numpy tries to allocate them.
MAX_NPZ_BYTES = 16 << 30
# Deflate expands at most ~1032:1, so a member claiming more than that over its compressed size lies.
_MAX_DEFLATE_RATIO = 1100
GN_GROUPS = 32  # every GroupNorm has 32 groups (paper §3.1), so every width is a multiple of 32


def _container(path: Path) -> Literal["npz", "torch"]:
    """'npz' or 'torch' from the file's magic bytes and zip member names, without loading it.

    Both formats are zip archives (npz: only `*.npy` members; torch: `<archive>/data.pkl`), so a
    damaged archive is reported as such instead of as torch's or numpy's internal errors.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_TORCH_MAGIC))
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return "torch"
    if head[:4] not in _ZIP_MAGIC:
        raise CheckpointError(f"{path}: not a checkpoint (neither an npz archive nor a torch file; "
                              f"{_looks_like(head)})")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: truncated or damaged zip archive ({e}); copy or download it again") from None
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "torch"
    raise CheckpointError(f"{path}: a zip archive that is neither an npz (only .npy arrays) nor a torch checkpoint")


def _looks_like(head: bytes) -> str:
    """What a file that is no checkpoint seems to be, from its first bytes."""
    if not head:
        return "an empty file"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return ("a bare Python pickle, which bitlab never loads because unpickling can run code; save the "
                "weights as tensors instead: np.savez for arrays, torch.save(model.state_dict()) for a model")
    if head.lstrip()[:1] == b"<":
        return f"it starts with {head[:8]!r}, an HTML or XML page (an error page saved in place of the file?)"
    return f"it starts with {head[:4]!r}"


def npz_headers(path: str | Path, source: str | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array's (shape, dtype) in an npz, from the `.npy` headers alone (no data is read).

    Checks what would otherwise fail inside numpy, or allocate first: a readable header without
    pickled objects, a shape whose bytes are what the member holds, and at most `MAX_NPZ_BYTES`
    in all. Errors name `source` (default: the path) and the key.
    """
    source = source or str(path)
    out, total = {}, 0
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{source}: truncated or damaged zip archive ({e})") from None
    with zf:
        for info in zf.infolist():
            key = info.filename.removesuffix(".npy")
            deflated = info.compress_type != zipfile.ZIP_STORED
            if deflated and info.file_size > _MAX_DEFLATE_RATIO * max(info.compress_size, 1):
                raise CheckpointError(f"{source}: key {key!r} claims {info.file_size} bytes from "
                                      f"{info.compress_size} compressed, more than compression can give")
            shape, dtype, header_len = _npy_header(zf, info, source, key)
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes != info.file_size - header_len:
                raise CheckpointError(f"{source}: key {key!r} declares shape {shape} of {dtype} ({nbytes} bytes), "
                                      f"but holds {info.file_size - header_len} bytes of data")
            total += nbytes
            if total > MAX_NPZ_BYTES:
                raise CheckpointError(f"{source}: its arrays add up to more than {MAX_NPZ_BYTES} bytes, over 3x the "
                                      "largest official BiT checkpoint; not a BiT npz")
            out[key] = (shape, dtype)
    return out


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: str, key: str
                ) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of one `.npy` member, read with numpy's own header parser."""
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):  # 3.0 only adds UTF-8 field names: never plain weights
                raise ValueError(f".npy format version {version[0]}.{version[1]}")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            header_len = f.tell()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{source}: key {key!r} has no readable .npy header ({e})") from None
    if dtype.hasobject or dtype.kind != "f":
        raise CheckpointError(f"{source}: key {key!r} has dtype {dtype}, expected floating-point weights")
    if len(shape) > 4 or any(not isinstance(n, int) or n < 0 for n in shape):
        raise CheckpointError(f"{source}: key {key!r} has shape {shape}; BiT weights have at most 4 dimensions")
    return tuple(shape), dtype, header_len


def check_npz(path: str | Path, source: str | None = None) -> None:
    """That `path` is an official-schema BiT npz, from its headers alone (the weights are not read):
    every key a BiT key, a root kernel of a BiT shape, body blocks. For downloads and conversions."""
    source = source or str(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] not in _ZIP_MAGIC:
        raise CheckpointError(f"{source}: not an npz archive ({_looks_like(head)})")
    headers = npz_headers(path, source)
    names = {}
    for key in headers:
        name = _npz_to_bitlab_key(re.sub(r"/standardized_conv2d_\d+/", "/standardized_conv2d/", key))
        if name is None:
            raise CheckpointError(f"{source}: unexpected key {key!r} (not in the official BiT schema)")
        names[name] = key
    if "root.conv.weight" not in names:
        raise CheckpointError(f"{source}: no {ROOT_NPZ_KEY!r}: not a BiT checkpoint")
    hwio = headers[names["root.conv.weight"]][0]
    oihw = (hwio[3], hwio[2], hwio[0], hwio[1]) if len(hwio) == 4 else hwio
    _check_root_kernel(source, names["root.conv.weight"], oihw, hwio=hwio)
    _block_units(names, source)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    check_npz(path)  # before numpy allocates what the headers declare
    arrays = {}
    with np.load(path, allow_pickle=False) as f:
        for key in f.files:
            try:
                arrays[key] = f[key]
            except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise CheckpointError(f"{path}: key {key!r} is unreadable ({type(e).__name__}: {e})") from None
    return arrays


def _saved_config(path: Path, obj: dict, key: str) -> ResNetV2Config:
    try:
        config = ResNetV2Config.from_dict(obj[key])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: key {key!r} is not a ResNetV2 config ({type(e).__name__}: {e})") from None
    _check_config(config, f"{path}: key {key!r}")
    return config


def _check_config(config: ResNetV2Config, where: str) -> None:
    """Types and ranges of a config read from a file, before a model is built from it."""
    def whole(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    units, wf = config.block_units, config.width_factor
    problems = []
    if not units or not all(whole(u) and u >= 1 for u in units):
        problems.append(f"block_units must be positive whole numbers, got {list(units)!r}")
    if not (isinstance(wf, (int, float)) and not isinstance(wf, bool) and math.isfinite(wf) and wf > 0
            and 64 * wf == int(64 * wf)):
        problems.append(f"width_factor must be a positive number with 64 x width_factor whole, got {wf!r}")
    elif config.norm == "group" and int(64 * wf) % GN_GROUPS:
        problems.append(f"width_factor {wf} gives {int(64 * wf)} root channels, not a multiple of GroupNorm's "
                        f"{GN_GROUPS} groups")
    if not (whole(config.num_classes) and config.num_classes >= 0):
        problems.append(f"num_classes must be a whole number >= 0, got {config.num_classes!r}")
    if config.norm not in ("group", "batch") or config.conv not in ("std", "plain"):
        problems.append(f"norm/conv must be group|batch / std|plain, got {config.norm!r} / {config.conv!r}")
    if not (isinstance(config.ws_eps, float) and math.isfinite(config.ws_eps) and config.ws_eps > 0):
        problems.append(f"ws_eps must be a positive number, got {config.ws_eps!r}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


def _check_config_fits(config: ResNetV2Config, state_dict: dict[str, torch.Tensor], where: str) -> None:
    """A saved config must describe the weights saved with it, so that building its model allocates
    no more than the file holds (a width_factor of 1e6 beside R50x1 weights is a damaged file)."""
    root = state_dict.get("root.conv.weight")
    if root is None:
        raise CheckpointError(f"{where}: the state dict has no 'root.conv.weight'")
    units = _block_units(state_dict, where)
    head = state_dict.get("head.conv.weight")
    saved = (tuple(config.block_units), int(64 * config.width_factor), config.num_classes)
    found = (units, int(root.shape[0]), int(head.shape[0]) if head is not None else 0)
    if saved != found:
        raise CheckpointError(f"{where}: the config (block_units {list(saved[0])}, {saved[1]} root channels, "
                              f"{saved[2]} classes) does not describe the saved weights (block_units "
                              f"{list(found[0])}, {found[1]} root channels, {found[2]} classes)")


def _check_root_kernel(source: str, key: str, oihw: tuple[int, ...], hwio: tuple[int, ...] | None = None) -> None:
    """A BiT root kernel: 7x7 over RGB, into a multiple of GroupNorm's 32 groups (64 x width)."""
    ok = len(oihw) == 4 and oihw[1:] == (3, 7, 7) and oihw[0] >= GN_GROUPS and oihw[0] % GN_GROUPS == 0
    if not ok:
        shown = hwio if hwio is not None else oihw
        layout = "(7, 7, 3, 64 x width) as HWIO" if hwio is not None else "(64 x width, 3, 7, 7)"
        raise CheckpointError(f"{source}: key {key!r} has shape {tuple(shown)}; a BiT root kernel is {layout}, "
                              f"with 64 x width a multiple of {GN_GROUPS} (GroupNorm's groups)")


def _block_units(keys, source: str) -> tuple[int, ...]:
    """Units per block from bitlab key names; blocks and units must run 1, 2, ... without gaps, so
    that a key such as `unit9999999` cannot make a model of ten million units."""
    units: dict[int, set[int]] = {}
    for key in keys:
        if m := re.match(r"body\.block(\d+)\.unit(\d+)\.", key):
            units.setdefault(int(m[1]), set()).add(int(m[2]))
    if not units:
        raise CheckpointError(f"{source}: no body blocks: not a BiT ResNetV2")
    if sorted(units) != list(range(1, len(units) + 1)):
        raise CheckpointError(f"{source}: blocks {sorted(units)} do not run 1..{len(units)}")
    for b, found in sorted(units.items()):
        if sorted(found) != list(range(1, len(found) + 1)):
            missing = sorted(set(range(1, max(found) + 1)) - found)
            raise CheckpointError(f"{source}: block{b} has unit{max(found):02d} but no unit{missing[0]:02d}")
    return tuple(len(units[b]) for b in sorted(units))


def _check_tensor(source: str | Path, key: str, value: object) -> None:
    """A tensor with finite weights: NaN/inf weights would load silently and only show as NaN logits."""
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{source}: key {key!r} holds a {type(value).__name__}, not a tensor")
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise CheckpointError(f"{source}: key {key!r} has non-finite values (NaN or inf)")


def _read(path: str | Path) -> tuple[Format, dict[str, torch.Tensor], ResNetV2Config | None]:
    """(format, bitlab-named state dict, config saved in or implied by the file); loads the file once."""
    path = Path(path)
    if _container(path) == "npz":
        state_dict = npz_to_state_dict(_read_npz(path), source=str(path))
        return "npz", state_dict, infer_config(state_dict, str(path), **_BIT_VARIANT)
    obj = fileio.torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    config, config_key = None, ""
    if obj.get("format") == FORMAT_TAG:
        config_key = "config"
        config = None if obj.get("config") is None else _saved_config(path, obj, config_key)
        obj = obj.get("state_dict")
    elif isinstance(obj.get("model_config"), dict):  # bitlab training checkpoint
        config_key = "model_config"
        config = _saved_config(path, obj, config_key)
    for key in ("model", "state_dict"):  # training checkpoint / timm checkpoint wrapper
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: no state dict in the file (found {type(obj).__name__})")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}  # DDP / DataParallel prefixes
    for key, value in obj.items():
        _check_tensor(path, key, value)
    if any(k.startswith("stem.") for k in obj):
        state_dict = timm_to_bitlab(obj)
        return "timm", state_dict, infer_config(state_dict, str(path), **_BIT_VARIANT)
    if config is not None:
        _check_config_fits(config, obj, f"{path}: key {config_key!r}")
    return "bitlab", obj, config


def detect_format(path: str | Path) -> Format:
    """'npz' for the official numpy archive; 'timm' or 'bitlab' for a torch file, by its key names."""
    return "npz" if _container(Path(path)) == "npz" else _read(path)[0]


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], ResNetV2Config | None]:
    """Any supported file -> (bitlab-named state dict, config).

    Accepts the official npz, bitlab model files, bitlab training checkpoints (`model` entry) and
    timm state dicts (bare or under `state_dict`). The config is the one saved in bitlab files;
    npz and timm files imply GN+WS (norm=group, conv=std) and the architecture of their tensors;
    a bare bitlab-named state dict has none (its conv type cannot be told from its keys).
    """
    _, state_dict, config = _read(path)
    return state_dict, config


def infer_config(state_dict: dict[str, torch.Tensor], source: str, **overrides) -> ResNetV2Config:
    """Architecture from a bitlab state dict: units per block, width, classes, norm type."""
    if "root.conv.weight" not in state_dict:
        raise CheckpointError(f"{source}: state dict is not a BiT ResNetV2 (no root.conv.weight)")
    root = state_dict["root.conv.weight"]
    _check_root_kernel(source, "root.conv.weight", tuple(root.shape))
    width = root.shape[0] / 64
    head = state_dict.get("head.conv.weight")
    cfg = dict(
        block_units=_block_units(state_dict, source),
        width_factor=int(width) if width == int(width) else width,
        num_classes=int(head.shape[0]) if head is not None else 0,
        norm="batch" if any(k.endswith("running_mean") for k in state_dict) else "group",
    )
    cfg.update(overrides)
    return ResNetV2Config(**cfg)


def is_timm_bit(model: nn.Module) -> bool:
    """timm's BiT ResNetV2 (`resnetv2_*_bit`: StdConv2d stem, GroupNorm): bitlab's layout under timm names."""
    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2 as TimmResNetV2

    return (isinstance(model, TimmResNetV2) and isinstance(getattr(model.stem, "conv", None), StdConv2d)
            and isinstance(model.norm, nn.GroupNorm))


def bit_variant(model: nn.Module) -> tuple[str, str] | None:
    """(norm, conv) of a BiT ResNetV2, None for any other model: bitlab's carry their
    `ResNetV2Config`, timm's `resnetv2_*_bit` are GN+WS by construction."""
    config = getattr(model, "config", None)
    if isinstance(config, ResNetV2Config):
        return config.norm, config.conv
    return ("group", "std") if is_timm_bit(model) else None


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
              *, keep_model_head: bool = False) -> None:
    """Copy a bitlab-named state dict into a bitlab ResNetV2 or timm's BiT ResNetV2, strictly.

    Missing, unexpected or mis-shaped keys raise `CheckpointMismatch` naming the key and `source`.
    The classifier is the one exception: when the file has no head, a head of another size, or
    `keep_model_head`, the model keeps its own (freshly initialised) head and this is logged.
    """
    own = model.state_dict()
    timm_names = "stem.conv.weight" in own  # timm's name for the root conv
    if timm_names:
        own = timm_to_bitlab(own)
    file_head = state_dict.get("head.conv.weight")
    model_head = own.get("head.conv.weight")
    skip_head = keep_model_head or file_head is None or model_head is None or file_head.shape != model_head.shape
    if skip_head:
        state_dict = {k: v for k, v in state_dict.items() if k not in HEAD_KEYS}
        own = {k: v for k, v in own.items() if k not in HEAD_KEYS}
    for key, ref in own.items():
        if key not in state_dict:
            raise CheckpointMismatch(f"{source}: missing key {key!r} (expected shape {tuple(ref.shape)})")
        if state_dict[key].shape != ref.shape:
            raise CheckpointMismatch(f"{source}: key {key!r} has shape {tuple(state_dict[key].shape)}, "
                                     f"model expects {tuple(ref.shape)}")
    if extra := sorted(set(state_dict) - set(own)):
        raise CheckpointMismatch(f"{source}: unexpected key {extra[0]!r}"
                                 + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    model.load_state_dict(bitlab_to_timm(state_dict) if timm_names else state_dict, strict=not skip_head)
    if skip_head and model_head is not None:
        why = ("a new head was asked for (zero_head)" if keep_model_head
               else "the file has no head" if file_head is None
               else f"the file's head has {file_head.shape[0]} classes")
        log.info("%s: %s: the model's %d-class head keeps its %s initialisation", source, why,
                 model_head.shape[0], "random" if model_head.any() else "zero")


def load_weights(model: nn.Module, path: str | Path, *, keep_model_head: bool = False) -> nn.Module:
    """Load any supported checkpoint file into `model` (strict; see `load_into`).

    BiT models, bitlab's or timm's `resnetv2_*_bit`, take npz, bitlab and timm files alike; other
    models take a torch state dict of their own (bare, or under `model` / `state_dict`).
    """
    if bit_variant(model) is not None:
        state_dict, config = read_state_dict(path)
        load_resnetv2(model, state_dict, config, str(path), keep_model_head=keep_model_head)
        return model
    if _container(Path(path)) == "npz":
        raise CheckpointError(f"{path}: an official BiT npz loads into BiT ResNetV2 models only, "
                              f"not {type(model).__name__}")
    obj = fileio.torch_load(path)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    try:
        model.load_state_dict(obj, strict=True)
    except RuntimeError as e:
        raise CheckpointMismatch(f"{path}: does not fit {type(model).__name__}: {e}") from None
    return model


def load_resnetv2(model: nn.Module, state_dict: dict[str, torch.Tensor], config: ResNetV2Config | None,
                  source: str, *, keep_model_head: bool = False) -> None:
    """`load_into`, after refusing weights of another norm/conv variant: WS kernels through a
    plain conv, or GroupNorm weights in a BatchNorm net, would give meaningless outputs."""
    norm, conv = bit_variant(model)
    if config is not None and (config.norm, config.conv) != (norm, conv):
        raise CheckpointError(f"{source}: holds norm={config.norm}, conv={config.conv} weights, the model is "
                              f"norm={norm}, conv={conv}; weights only fit the variant they were trained as "
                              "(official npz and timm BiT files are always norm=group, conv=std)")
    load_into(model, state_dict, source, keep_model_head=keep_model_head)


def head_size(state_dict: dict[str, torch.Tensor]) -> int | None:
    """Number of classes of a bitlab-named state dict's head (None when it has no head)."""
    head = state_dict.get("head.conv.weight")
    return None if head is None else int(head.shape[0])


# ----------------------------------------------------------------------------- writing files
def save_npz(model: ResNetV2, path: str | Path) -> Path:
    """Write the official schema (`resnet/...` keys, HWIO kernels); GN+WS models only."""
    if (model.config.norm, model.config.conv) != ("group", "std"):
        raise CheckpointError(f"{path}: the official npz schema holds GN+WS models only "
                              f"(this one has norm={model.config.norm}, conv={model.config.conv}); "
                              "save it as a bitlab file instead")
    arrays = state_dict_to_npz(model.state_dict())
    with fileio.atomic_write(path, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def save_bitlab(model: nn.Module, path: str | Path, name: str | None = None, record: dict | None = None) -> Path:
    """bitlab model file: the model's name, its architecture config (a ResNetV2 then loads without a
    name; None for other models, which their name rebuilds), `record` (what a training run knows
    about the model: `read_record`) and the state dict."""
    config = getattr(model, "config", None)
    fileio.torch_save({"format": FORMAT_TAG, "version": 2, "name": name,
                   "config": config.to_dict() if isinstance(config, ResNetV2Config) else None,
                   **(record or {}), "state_dict": model.state_dict()}, path)
    return Path(path)


def read_record(path: str | Path) -> dict:
    """What a bitlab model file or training checkpoint says about its model beside the weights: its
    `name`, and what the run recorded: `classes` (names in head order), `data_config` (the view its
    validation used, a `DataConfig` dict), `pretraining_data`. Empty for npz files and bare state
    dicts; the weights themselves are not read (memory-mapped)."""
    path = Path(path)
    if _container(path) == "npz":
        return {}
    with open(path, "rb") as f:  # torch maps only zip-format files; a legacy one is read whole
        legacy = f.read(len(_LEGACY_TORCH_MAGIC)).startswith(_LEGACY_TORCH_MAGIC)
    obj = fileio.torch_load(path, mmap=not legacy)
    if not isinstance(obj, dict) or obj.get("format") not in (FORMAT_TAG, TRAIN_FORMAT_TAG):
        return {}
    name = obj.get("name" if obj["format"] == FORMAT_TAG else "model_name")
    out = {}
    for key, ok, what in (("name", lambda v: isinstance(v, str) and v, "a model name"),
                          ("classes", lambda v: isinstance(v, list) and v and all(isinstance(c, str) for c in v),
                           "a list of class names"),
                          ("data_config", lambda v: isinstance(v, dict), "a data config"),
                          ("pretraining_data", lambda v: isinstance(v, str), "text")):
        value = obj.get(key) if key != "name" else name
        if value is not None and not ok(value):
            raise CheckpointError(f"{path}: key {key!r} is not {what} (found {type(value).__name__})")
        if value is not None:
            out[key] = value
    return out


def save_timm(model: ResNetV2, path: str | Path) -> Path:
    """timm `resnetv2_*_bit` state dict (GN+WS models; loads with `timm.create_model(...).load_state_dict`)."""
    if (model.config.norm, model.config.conv) != ("group", "std"):
        raise CheckpointError(f"{path}: timm's BiT models are GN+WS; this one has "
                              f"norm={model.config.norm}, conv={model.config.conv}")
    fileio.torch_save(bitlab_to_timm(model.state_dict()), path)
    return Path(path)


def convert(src: str | Path, dst: str | Path, to: Format | None = None) -> Path:
    """Convert between official npz, timm and bitlab files; `to` defaults from `dst`'s suffix
    (.npz -> npz, anything else -> bitlab). The architecture is read from the file itself."""
    to = to or ("npz" if str(dst).endswith(".npz") else "bitlab")
    state_dict, config = read_state_dict(src)
    model = ResNetV2(config or infer_config(state_dict, str(src)))
    load_into(model, state_dict, str(src))
    writer = {"npz": save_npz, "timm": save_timm, "bitlab": save_bitlab}[to]
    return writer(model, dst)
