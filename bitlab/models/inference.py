"""Models made ready for inference: weight standardisation folded into plain convolutions, evaluation
mode, the device and the memory format that measured fastest.

Every StdConv2d re-standardises its kernel on each forward pass while training; in evaluation the
kernel does not change, so `fuse_weight_standardization` computes it once and stores it in a plain
`nn.Conv2d`: the same function, without the work (or the extra kernel copy that StdConv2d's own
cache keeps). The folded kernels are themselves standardised (mean 0, variance 1 per output
channel), and standardisation is idempotent to 1e-10 relative, so a fused BiT model's weights still
load as the `std` model they came from. `bitlab evaluate` and `bitlab dedup` run fused models
(`prepare_for_inference(..., fuse=True)`); `bitlab export` writes them (`bitlab.models.export`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from bitlab.device import parse_device
from bitlab.models.resnetv2 import StdConv2d


def _ws_eps(conv: nn.Module) -> float | None:
    """The eps of a weight-standardised conv (bitlab's, or timm's as in its BiT models), else None."""
    if isinstance(conv, StdConv2d):
        return conv.eps
    # A timm module exists only once timm is imported: importing it here (2-3 s) only to learn that a
    # bitlab model has no timm conv was most of `bitlab evaluate`'s fixed cost for an R50x1.
    if not type(conv).__module__.startswith("timm."):
        return None
    from timm.layers import StdConv2d as TimmStdConv2d

    # Exactly timm's StdConv2d: its subclasses and StdConv2dSame (dynamic padding, ScaledStdConv2d's
    # gain) compute something a plain conv with fixed padding does not.
    return conv.eps if type(conv) is TimmStdConv2d else None


def _folded(conv: nn.Conv2d, eps: float) -> nn.Conv2d:
    """A plain conv holding `conv`'s standardised kernel, computed in float64 and rounded once."""
    w = conv.weight.detach()
    flat = w.double().reshape(w.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    var = (flat - mean).square().mean(dim=1, keepdim=True)  # biased, as the official WS
    kernel = torch.empty_like(w).copy_(((flat - mean) / torch.sqrt(var + eps)).reshape_as(w))  # w's strides
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                      device="meta")  # no throw-away initialisation of a kernel about to be replaced
    plain.weight = nn.Parameter(kernel, requires_grad=conv.weight.requires_grad)
    plain.bias = conv.bias
    plain.train(conv.training)
    return plain


def fuse_weight_standardization(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """`model` with every weight-standardised conv replaced by a plain conv holding its standardised
    kernel: the same outputs (within float32 rounding) without standardising on each forward.

    A copy unless `inplace`. For inference and export only: training the result trains plain
    convolutions, without WS. Models without such convs come back unchanged (copied unless `inplace`).
    """
    if not inplace:
        model = copy.deepcopy(model)
    if (eps := _ws_eps(model)) is not None:
        return _folded(model, eps)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (eps := _ws_eps(child)) is not None:
                setattr(parent, name, _folded(child, eps))
    return model


def prepare_for_inference(model: nn.Module, device: str | torch.device | None = None, *,
                          fuse: bool = False) -> nn.Module:
    """`model` in evaluation mode on `device` (None: cuda if available), channels-last, and with
    `fuse` its weight standardisation folded into its kernels in place (`fuse_weight_standardization`;
    for a model that is not trained afterwards). Without `fuse`, StdConv2d's kernel cache saves the
    same work at the cost of a kernel copy per conv. Idempotent: callers may prepare a prepared model.

    Channels-last: oneDNN's (and cuDNN's) fast layout for convolutions, the same numbers; 1.5x the
    contiguous layout for EfficientNet-Lite0 in timm's validation loop on the 2-core CPU, and for
    R50x1 1.13-1.17x in the models benchmark on an idle machine, measured before fusing
    (benchmarks/RESULTS.md).
    """
    device = parse_device(device)
    # Callers may be inside inference_mode (`bitlab.eval.predict.iter_probs`): tensors converted
    # there would be inference tensors, and the caller's model could never be trained again.
    with torch.inference_mode(False):
        if fuse:
            model = fuse_weight_standardization(model, inplace=True)
        return model.eval().to(device, memory_format=torch.channels_last)
