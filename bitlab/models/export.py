"""`bitlab export`: a model as a deployable file (ONNX or TorchScript), with its weight
standardisation folded into plain convolutions (`fuse_weight_standardization`).

The exported graph takes normalised images, float32 (N, 3, S, S) with S the model's resolution
(or `image_size`) and any batch size N, and returns logits (or pre-logits for a headless model).
How to prepare images travels with the file: ONNX metadata `bitlab.data_config` (JSON: the
`DataConfig` fields: input_size, mean, std and the evaluation view: interpolation, crop_pct,
crop_mode), and for TorchScript the extra file `bitlab.json`; both also name the model.
ONNX export needs the `export` extra (onnx and onnxscript; onnxruntime runs the file).

Files appear whole or not at all (written beside the target, then renamed); an existing file is
replaced only with `force`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from bitlab import fileio
from bitlab.errors import BitlabError
from bitlab.models.inference import fuse_weight_standardization
from bitlab.models.registry import create_model, data_config_of

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
# An ONNX file is one protobuf, which cannot exceed 2 GiB: larger models keep their weights in
# FILE.data beside it (R152x4, 3.7 GB in float32).
ONNX_INLINE_LIMIT = 2**31 - 2**26


@dataclass
class ExportConfig:
    model: str
    out: str
    pretrained: str | None = None
    format: str | None = None  # "onnx" | "torchscript"; None: from the suffix of `out` (.onnx -> onnx)
    num_classes: int | None = None
    image_size: int | None = None
    force: bool = False  # replace an existing file

    def resolved_format(self) -> str:
        fmt = self.format or ("onnx" if Path(self.out).suffix.lower() == ".onnx" else None)
        if fmt is None:
            raise BitlabError(f"--out {self.out}: say which format with --format ({' or '.join(FORMATS)}; "
                              "a .onnx file is ONNX)")
        if fmt not in FORMATS:
            raise BitlabError(f"--format {fmt}: not one of {', '.join(FORMATS)}")
        return fmt


def check_destination(out: str | os.PathLike, force: bool) -> Path:
    """Refuse, before any work, an output that exists (without `force`) or is a folder."""
    path = Path(out)
    if path.is_dir():
        raise BitlabError(f"--out {path}: is a folder; give a file name")
    if path.exists() and not force:
        raise BitlabError(f"--out {path}: exists (pass --force to replace it)")
    fileio.check_can_create_folder(path.parent, "--out")
    return path


def run_export(cfg: ExportConfig) -> Path:
    """Build `cfg.model` (with its weights) and write it as `cfg.format`; returns the file written."""
    check_destination(cfg.out, cfg.force)
    fmt = cfg.resolved_format()
    if cfg.image_size is not None and cfg.image_size < 1:
        raise BitlabError(f"--image-size must be at least 1, got {cfg.image_size}")
    model = create_model(cfg.model, num_classes=cfg.num_classes, pretrained=cfg.pretrained, image_size=cfg.image_size)
    return export(model, cfg.out, fmt, force=cfg.force)


def export(model: nn.Module, out: str | os.PathLike, fmt: str, *, force: bool = False) -> Path:
    """Write `model` (fused, in evaluation mode, on the CPU, float32) to `out` as ONNX or TorchScript."""
    path = check_destination(out, force)
    if fmt not in FORMATS:
        raise BitlabError(f"format {fmt!r}: not one of {', '.join(FORMATS)}")
    data_config = data_config_of(model)
    fused = fuse_weight_standardization(model).eval().to("cpu", torch.float32)
    example = torch.zeros(2, 3, data_config.input_size, data_config.input_size)  # batch 2: a dynamic batch axis
    metadata = {"bitlab.model": str(getattr(model, "model_name", None) or type(model).__name__),
                "bitlab.data_config": json.dumps(data_config.to_dict()),
                "bitlab.input": "float32 (N, 3, S, S) RGB, (pixel / 255 - mean) / std"}
    if fmt == "onnx":
        _onnx(_without_zero_pads(fused), example, path, metadata)
    else:
        _torchscript(fused, example, path, metadata)
    log.info("%s: %s model, input %d px", path, fmt, data_config.input_size)
    return path


class ZeroPad2d(nn.Module):
    """Zero padding by concatenating zeros: no ONNX `Pad` node. onnxruntime's graph optimiser (at
    every level above none) folds a `Pad` with 0 into a following `MaxPool`'s own padding, which
    pads with -inf: BiT's root (zero pad, then a 3x3/2 max-pool of conv outputs that can be
    negative) then changes at the border (5e-3 on logits of a random R14x0.5; the known fusion
    bug of onnx optimisers, onnx/optimizer PR 318)."""

    def __init__(self, padding: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.padding = padding  # left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right, top, bottom = self.padding
        n, c, h, w = x.shape
        x = torch.cat([x.new_zeros(n, c, h, left), x, x.new_zeros(n, c, h, right)], dim=3)
        return torch.cat([x.new_zeros(n, c, top, w + left + right), x, x.new_zeros(n, c, bottom, w + left + right)],
                         dim=2)


def _without_zero_pads(model: nn.Module) -> nn.Module:
    """`model` (a fused copy: changed in place) with each zero `nn.ConstantPad2d` as a `ZeroPad2d`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.ConstantPad2d and child.value == 0 and min(child.padding) >= 0:
                setattr(parent, name, ZeroPad2d(child.padding))
    return model


def _onnx(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    try:
        import onnx  # noqa: F401 (torch's exporter needs both; say so here rather than in its traceback)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise BitlabError(f"ONNX export needs the export extra (pip install 'bitlab[export]'): {e}") from None
    with _quiet("onnxscript", "onnx_ir"):  # their graph passes log every rewrite at INFO
        program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=["images"],
                                    output_names=["outputs"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.model.metadata_props.update(metadata)
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > ONNX_INLINE_LIMIT
    # Written under its final name in a temp folder beside it (an external-data file records its
    # model's name), then renamed into place: the weights file first, the model file last.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        program.save(str(tmp / path.name), external_data=external)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == path.name):
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Only warnings from these loggers while the block runs."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(max(saved[name], logging.WARNING))
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _torchscript(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    log.warning("TorchScript is deprecated by PyTorch (still what libtorch C++ loads); ONNX is the "
                "maintained format: --format onnx")
    with warnings.catch_warnings():
        # One FutureWarning per jit call (trace, trace_method, save) repeats the line above; the
        # TracerWarning is about an input check inside F.group_norm, not about the traced graph.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example)
        with fileio.atomic_write(path, "wb") as f:
            torch.jit.save(traced, f, _extra_files={"bitlab.json": json.dumps(metadata)})
