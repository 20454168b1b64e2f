"""Models made ready for inference: weight standardisation folded into plain convolutions, evaluation
mode, the device and the memory format that measured fastest.

Every StdConv2d re-standardises its kernel on each forward pass while training; in evaluation the
kernel does not change, so `fuse_weight_standardization` computes it once and stores it in a plain
`nn.Conv2d`: the same function, without the work (or the extra kernel copy that StdConv2d's own
cache keeps). The folded kernels are themselves standardised (mean 0, variance 1 per output
channel), and standardisation is idempotent to 1e-10 relative, so a fused BiT model's weights still
load as the `std` model they came from. `bitlab evaluate` and `bitlab dedup` run fused models
(`prepare_for_inference(..., fuse=True)`); `bitlab export` writes them (`bitlab.models.export`).

Likewise a BatchNorm in evaluation mode is a fixed scale and shift per channel: where it reads a
convolution's output (and nothing else reads it), `fold_batch_norm` moves it into that convolution's
kernel and bias, leaving only the activation that followed it. On the 2-core CPU that halves
EfficientNet-Lite0's forward pass at 224 px (0.79 -> 0.35 s per batch of 32), whose BatchNorms run as
separate passes over the activations (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import fx, nn

from bitlab.device import parse_device
from bitlab.models.resnetv2 import StdConv2d

log = logging.getLogger(__name__)


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


def _after_norm(bn: nn.Module) -> nn.Module | None:
    """What `bn` does after normalising, once the normalisation is folded away; None: not foldable.
    Exactly `nn.BatchNorm2d` (nothing after it) or timm's `BatchNormAct2d` (normalise, dropout,
    activation): a subclass may compute something else."""
    if type(bn) is nn.BatchNorm2d:
        after = nn.Identity()
    elif type(bn).__module__.startswith("timm.") and type(bn).__name__ == "BatchNormAct2d":
        after = nn.Sequential(bn.drop, bn.act)
    else:
        return None
    return after if bn.running_mean is not None and bn.running_var is not None else None


def _conv_with_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """`conv` then `bn` (its running statistics) as one conv, computed in float64 and rounded once."""
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    scale = inv_std * (bn.weight.double() if bn.weight is not None else 1.0)
    shift = (bn.bias.double() if bn.bias is not None else 0.0) - bn.running_mean.double() * scale
    bias = conv.bias.double() * scale + shift if conv.bias is not None else shift
    w = conv.weight.detach()
    kernel = torch.empty_like(w).copy_(w.double() * scale.reshape(-1, 1, 1, 1))  # w's dtype and strides
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode, device="meta")
    fused.weight = nn.Parameter(kernel, requires_grad=False)
    fused.bias = nn.Parameter(bias.to(w.dtype), requires_grad=False)
    return fused.train(False)


class _ConvNormTracer(fx.Tracer):
    """Traces down to convolutions and BatchNorms (timm's BatchNormAct2d included) as single calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def fold_batch_norm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """`model` with every BatchNorm that reads a plain convolution's output, and is its only reader,
    folded into that convolution (its running statistics: for inference only). The edges come from
    tracing the model's forward (torch.fx), so only real conv -> BatchNorm steps are folded, never a
    BatchNorm before a convolution (pre-activation) or one whose input something else also reads. A
    model that cannot be traced comes back unfolded. A copy unless `inplace`; the same class and
    methods (modules are swapped in place, the model is not replaced by a traced graph)."""
    if not inplace:
        model = copy.deepcopy(model)
    try:
        graph = _ConvNormTracer().trace(model)
    except Exception as e:  # data-dependent control flow and the like: nothing is known, nothing folded
        log.debug("%s: not traceable (%s), BatchNorm left unfolded", type(model).__name__, e)
        return model
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv, bn = modules[src.target], modules[node.target]
        if type(conv) is not nn.Conv2d or (after := _after_norm(bn)) is None or bn.training:
            continue
        if calls[src.target] != 1 or calls[node.target] != 1:  # a module used twice: its weights serve both
            continue
        model.set_submodule(src.target, _conv_with_norm(conv, bn))
        model.set_submodule(node.target, after)
    return model


def prepare_for_inference(model: nn.Module, device: str | torch.device | None = None, *,
                          fuse: bool = False) -> nn.Module:
    """`model` in evaluation mode on `device` (None: cuda if available), channels-last, and with
    `fuse` its weight standardisation and the BatchNorms after its convolutions folded into its
    kernels in place (`fuse_weight_standardization`, `fold_batch_norm`; for a model that is not
    trained afterwards). Without `fuse`, StdConv2d's kernel cache saves the same work at the cost of
    a kernel copy per conv. Idempotent: callers may prepare a prepared model.

    Channels-last: oneDNN's (and cuDNN's) fast layout for convolutions, the same numbers; 1.5x the
    contiguous layout for EfficientNet-Lite0 in timm's validation loop on the 2-core CPU, and for
    R50x1 1.13-1.17x in the models benchmark on an idle machine, measured before fusing
    (benchmarks/RESULTS.md).
    """
    device = parse_device(device)
    # Callers may be inside inference_mode (`bitlab.eval.predict.iter_probs`): tensors converted
    # there would be inference tensors, and the caller's model could never be trained again.
    with torch.inference_mode(False):
        model = model.eval()  # BatchNorm folds only in evaluation mode
        if fuse:
            model = fold_batch_norm(fuse_weight_standardization(model, inplace=True), inplace=True)
        return model.to(device, memory_format=torch.channels_last)
