"""The BiT ResNet-v2: pre-activation bottlenecks with Group Norm and Weight Standardisation.

Numerics follow the official `bit_pytorch/models.py` (google-research/big_transfer) exactly:
weight standardisation with the *biased* variance and eps 1e-10 inside the square root; GroupNorm
with 32 groups and eps 1e-5; the stride on the 3x3 conv; the projection fed the pre-activated
input; a root of 7x7/2 conv -> zero pad 1 -> 3x3/2 max-pool without padding; a head of
GN -> ReLU -> global average pool -> 1x1 conv with bias. Module names mirror the official ones
(`root.conv`, `body.block1.unit01.gn1`, `head.conv`) so the checkpoint key table stays readable.

The paper's Tables 4-5 ablate the two ingredients, so both are switchable: `norm` in
{"group", "batch"} and `conv` in {"std", "plain"}.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bitlab.data.transforms import DataConfig

# Official BiT value, also bit_jax/bit_tf2 and big_vision's bit_paper: the standardised kernel is
# (w - mean) / sqrt(var + 1e-10). timm uses 1e-8, which changes logits when the stored kernels'
# variance is small (trained WS nets with weight decay can have tiny raw kernels).
WS_EPS = 1e-10
# nn.GroupNorm(32, C) with PyTorch's default eps, as the official code builds it.
GN_GROUPS = 32
GN_EPS = 1e-5

NORMS = ("group", "batch")
CONVS = ("std", "plain")


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised per output channel before use (WS).

    Statistics run over (in, kH, kW) with the biased variance; there is no learnable gain.

    Where no gradient of the kernel is needed (`torch.no_grad()`, `torch.inference_mode()`, or a
    frozen weight), the standardised kernel is computed once and reused until the weight changes:
    in evaluation every batch would otherwise redo the same work (all 23.5 M backbone weights of an
    R50x1 on every forward). A change is seen through the weight's identity: its autograd version
    counter (bumped by every in-place write: optimiser steps, `load_state_dict`, `copy_` under
    `no_grad`), its storage address and strides; `.to()`, `.half()` and memory-format conversions
    drop the cache (`_apply`). Writes through `.data` bypass the
    version counter, for autograd as for this cache: after one, call `clear_kernel_cache()`.
    Memory: one copy of the standardised kernel per conv while cached (an R50x1 backbone: 94 MB in
    float32); a forward that needs the kernel's gradient (training) drops it and builds the
    autograd graph through the standardisation as before. `bitlab.models.fuse_weight_standardization`
    folds the kernels into plain convs instead, for a model that will not be trained again.
    """

    def __init__(self, *args, eps: float = WS_EPS, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps
        # (weight identity, the weight's storage held so that its address cannot be reused by a
        # later weight while compared, the standardised kernel); never in the state dict.
        self._kernel_cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def standardize(self, w: torch.Tensor) -> torch.Tensor:
        """(w - mean) / sqrt(biased var + eps) over each output channel of `w` (a kernel shaped like the weight)."""
        # layer_norm over each output channel's (in, kH, kW) values is exactly the official
        # (w - mean) / sqrt(biased var + eps), in one fused kernel: ~9x faster on CPU than
        # var_mean + sub + div (and ~2.5x faster than the batch_norm trick timm uses).
        flat = w.reshape(w.shape[0], -1)
        return F.layer_norm(flat, flat.shape[1:], eps=self.eps).reshape_as(w)

    def standardized_weight(self) -> torch.Tensor:
        """The standardised kernel: cached where no gradient flows to the weight (see the class)."""
        w = self.weight
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or not _cacheable(w):
            return self.standardize(w)  # traced graphs must compute it (or constant-fold it) themselves
        if torch.is_grad_enabled() and w.requires_grad:
            self._kernel_cache = None  # training: a new kernel every step, so keep no copy
            return self.standardize(w)
        # Cheap to build (~3 us; w.device alone costs 7): dtype, device and memory-format changes
        # go through _apply, which drops the cache, and another tensor assigned to the weight
        # cannot sit at this address while the cache holds the old one's storage.
        key = (w._version, w.data_ptr(), w.stride(), self.eps)
        cache = self._kernel_cache
        if cache is None or cache[0] != key:
            # A normal tensor even inside inference_mode, so that a later forward under plain
            # no_grad (or with a frozen weight and an input that needs its gradient) can use it;
            # in the weight's memory format, which the conv would otherwise convert it to per call.
            with torch.inference_mode(False), torch.no_grad():
                kernel = torch.empty_like(w).copy_(self.standardize(w))
                cache = self._kernel_cache = (key, w.detach(), kernel)
        return cache[2]

    def clear_kernel_cache(self) -> None:
        self._kernel_cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), .cuda(), memory formats
        self._kernel_cache = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # deepcopy and pickle (DDP spawn, torch.save) carry no cache
        return {**self.__dict__, "_kernel_cache": None}

    def __setstate__(self, state: dict) -> None:  # modules pickled before the cache existed
        super().__setstate__({"_kernel_cache": None, **state})


def _cacheable(w: torch.Tensor) -> bool:
    """Real storage with a version counter: not meta, fake or other subclass tensors (export,
    FSDP), nor an inference tensor (created under inference_mode: it has no version counter)."""
    return type(w) in (nn.Parameter, torch.Tensor) and not w.is_meta and not w.is_inference()


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm == "group":
        return partial(nn.GroupNorm, GN_GROUPS, eps=GN_EPS)
    if norm == "batch":
        return nn.BatchNorm2d
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _conv_layer(conv: str, ws_eps: float) -> Callable[..., nn.Conv2d]:
    if conv == "std":
        return partial(StdConv2d, eps=ws_eps, bias=False)
    if conv == "plain":
        return partial(nn.Conv2d, bias=False)
    raise ValueError(f"conv must be one of {CONVS}, got {conv!r}")


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (ResNet-v2) with the stride on the 3x3 conv.

    `gnK` precedes `convK`; the projection (`downsample`) sees the *pre-activated* input; there is
    no activation after the addition.
    """

    def __init__(self, cin: int, cout: int, cmid: int, stride: int,
                 conv: Callable[..., nn.Conv2d], norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.gn1 = norm(cin)
        self.conv1 = conv(cin, cmid, kernel_size=1)
        self.gn2 = norm(cmid)
        self.conv2 = conv(cmid, cmid, kernel_size=3, stride=stride, padding=1)  # "Original code has it on conv1!!"
        self.gn3 = norm(cmid)
        self.conv3 = conv(cmid, cout, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = conv(cin, cout, kernel_size=1, stride=stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.gn1(x))
        residual = self.downsample(out) if self.downsample is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.gn2(out)))
        out = self.conv3(self.relu(self.gn3(out)))
        return out + residual


@dataclass(frozen=True)
class ResNetV2Config:
    """Everything that defines the architecture (saved inside bitlab checkpoints)."""

    block_units: tuple[int, ...] = (3, 4, 6, 3)
    width_factor: float = 1
    num_classes: int = 1000
    norm: str = "group"
    conv: str = "std"
    ws_eps: float = WS_EPS

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_units"] = list(self.block_units)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ResNetV2Config":
        return cls(**{**d, "block_units": tuple(d["block_units"])})


class ResNetV2(nn.Module):
    """BiT ResNet-v2. Inputs are RGB in [-1, 1] (mean = std = 0.5), NCHW.

    `num_classes=0` drops the classifier: `forward` then returns the pre-logits features.
    `data_config` (how the model wants its input; BiT's normalisation at 224 px by default) and
    `model_name` (the registry name it was built as, if any) travel with the model, as with
    every model `bitlab.models.create_model` returns.
    """

    def __init__(self, config: ResNetV2Config = ResNetV2Config(), zero_head: bool = False, *,
                 data_config: DataConfig = DataConfig(), name: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.data_config = data_config
        self.model_name = name
        wf = config.width_factor
        conv = _conv_layer(config.conv, config.ws_eps)
        norm = _norm_layer(config.norm)
        root_width = int(64 * wf)
        self.root = nn.Sequential(OrderedDict(
            conv=conv(3, root_width, kernel_size=7, stride=2, padding=3),
            # Zero pad then VALID pool: MaxPool2d(padding=1) pads with -inf and differs at the
            # border, because the root conv output (no activation yet) can be negative.
            pad=nn.ConstantPad2d(1, 0.0),
            pool=nn.MaxPool2d(kernel_size=3, stride=2, padding=0),
        ))
        blocks = OrderedDict()
        cin = root_width
        for b, units in enumerate(config.block_units, start=1):
            cmid = int(64 * wf * 2 ** (b - 1))
            cout = 4 * cmid
            stride = 1 if b == 1 else 2
            blocks[f"block{b}"] = nn.Sequential(OrderedDict(
                (f"unit{u:02d}", PreActBottleneck(cin if u == 1 else cout, cout, cmid,
                                                  stride if u == 1 else 1, conv, norm))
                for u in range(1, units + 1)
            ))
            cin = cout
        self.body = nn.Sequential(blocks)
        self.num_features = cin
        self.head = nn.Sequential(OrderedDict(
            gn=norm(cin),
            relu=nn.ReLU(inplace=True),
            avg=nn.AdaptiveAvgPool2d(1),
            conv=self._classifier(config.num_classes),
        ))
        self._init_weights(zero_head)

    def _classifier(self, num_classes: int) -> nn.Module:
        # The head is a plain conv with bias: never standardised, whatever `conv` says.
        return nn.Conv2d(self.num_features, num_classes, kernel_size=1, bias=True) if num_classes else nn.Identity()

    def _init_weights(self, zero_head: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.reset_classifier(self.config.num_classes, zero_init=zero_head)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def get_classifier(self) -> nn.Module:
        """The classifier (timm's name for the query): the head's 1x1 conv, Identity without a head."""
        return self.head.conv

    def reset_classifier(self, num_classes: int, zero_init: bool = True) -> None:
        """New head for `num_classes`; BiT-HyperRule zero-initialises it (`zero_init=True`)."""
        device = self.head.gn.weight.device
        head = self._classifier(num_classes).to(device)
        if isinstance(head, nn.Conv2d):
            if zero_init:
                nn.init.zeros_(head.weight)
            else:
                nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
        self.head.conv = head
        self.config = replace(self.config, num_classes=num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Body output (N, C, h, w), before the head's GroupNorm."""
        return self.body(self.root(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Head on a feature map: logits (N, classes), or pooled features (N, C) if `pre_logits`."""
        x = self.head.avg(self.head.relu(self.head.gn(x)))
        if pre_logits:
            return x.flatten(1)
        return self.head.conv(x).flatten(1)

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> pooled features (N, C): embeddings for probes and duplicate search."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def count_params(model: nn.Module, backbone_only: bool = False) -> int:
    """Parameter count; `backbone_only` leaves out the classifier conv (the paper's convention)."""
    skip = set()
    if backbone_only and hasattr(model, "get_classifier"):  # bitlab's ResNetV2 and timm models
        skip = {id(p) for p in model.get_classifier().parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
