"""Model names -> models: the official BiT names, architecture names, ablations, timm and the offline model.

Names accepted by `create_model`:
- official BiT names: `BiT-M-R50x1` (ImageNet-21k, 21843 classes), `BiT-S-R50x1` (ILSVRC-2012,
  1000 classes), and `BiT-M-R50x1-ILSVRC2012` (BiT-M fine-tuned on ILSVRC-2012, 1000 classes);
- architecture names: `R50x1`, `R50x3`, `R101x1`, `R101x3`, `R152x2`, `R152x4`, and `R14x0.5`, a
  tiny CPU model for tests and demos (not in the paper);
- the paper's Table 4-5 ablations as suffixes: `R50x1-bn` (BatchNorm + WS), `R50x1-plain`
  (GroupNorm + plain conv), `R50x1-bn-plain` (BatchNorm + plain conv); or `norm=`/`conv=` arguments;
- `efficientnet_lite0.offline_in1k`, `efficientnet_lite1.offline_in1k`, `efficientnet_lite2.offline_in1k`:
  real ImageNet-1k classifiers that install offline;
- any other name is handed to `timm.create_model`.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bitlab.data.transforms import DataConfig
from bitlab.errors import BitlabError
from bitlab.models import checkpoints, zoo
from bitlab.models.resnetv2 import ResNetV2, ResNetV2Config, count_params

log = logging.getLogger(__name__)

# name -> (block units, width factor); reference notes §2.7.
ARCHITECTURES: dict[str, tuple[tuple[int, ...], float]] = {
    "R50x1": ((3, 4, 6, 3), 1),
    "R50x3": ((3, 4, 6, 3), 3),
    "R101x1": ((3, 4, 23, 3), 1),
    "R101x3": ((3, 4, 23, 3), 3),
    "R152x2": ((3, 8, 36, 3), 2),
    "R152x4": ((3, 8, 36, 3), 4),
    # Not in the paper: one unit per stage at half width (32-channel root, so GN's 32 groups
    # still divide every layer). Small enough to train in seconds on a CPU.
    "R14x0.5": ((1, 1, 1, 1), 0.5),
}
UPSTREAM = {"S": ("ILSVRC-2012", 1000), "M": ("ImageNet-21k", 21843)}
ABLATIONS = {"": ("group", "std"), "-bn": ("batch", "std"), "-plain": ("group", "plain"), "-bn-plain": ("batch", "plain")}
# BiT-HyperRule's resolution for images >= 96x96 (bit_hyperrule.get_resolution): fine-tuned
# ILSVRC-2012 models are evaluated at 480. Upstream checkpoints were trained at 224.
FINETUNED_RESOLUTION = 480
UPSTREAM_RESOLUTION = 224


@dataclass(frozen=True)
class ModelSpec:
    """A bitlab-registered ResNetV2 name, resolved."""

    name: str
    arch: str
    norm: str
    conv: str
    num_classes: int
    upstream: str | None  # pre-training data for official names
    resolution: int

    def config(self, **overrides) -> ResNetV2Config:
        units, wf = ARCHITECTURES[self.arch]
        return ResNetV2Config(**{"block_units": units, "width_factor": wf, "num_classes": self.num_classes,
                                 "norm": self.norm, "conv": self.conv, **overrides})


_OFFICIAL = re.compile(r"BiT-([SM])-(R\d+x\d+)(-ILSVRC2012)?")
_ARCH = re.compile(r"(R\d+x[\d.]+)(-bn-plain|-bn|-plain)?")


def resolve(name: str) -> ModelSpec | None:
    """The bitlab spec for `name`, or None if it is not a bitlab ResNetV2 name."""
    if (m := _OFFICIAL.fullmatch(name)) and m[2] in ARCHITECTURES:
        if m[3] and m[1] == "S":
            return None  # only BiT-M was released fine-tuned on ILSVRC-2012
        data, classes = UPSTREAM[m[1]]
        if m[3]:
            classes = 1000
        return ModelSpec(name, m[2], "group", "std", classes, data,
                         FINETUNED_RESOLUTION if m[3] else UPSTREAM_RESOLUTION)
    if (m := _ARCH.fullmatch(name)) and m[1] in ARCHITECTURES:
        norm, conv = ABLATIONS[m[2] or ""]
        return ModelSpec(name, m[1], norm, conv, 1000, None, UPSTREAM_RESOLUTION)
    return None


def official_names() -> list[str]:
    """The 12 official upstream names, BiT-M first, as the official registry orders them."""
    return [f"BiT-{u}-{a}" for u in "MS" for a in zoo.BIT_ARCHS]


def list_models(include_ablations: bool = False) -> list[str]:
    names = official_names() + [f"BiT-M-{a}-ILSVRC2012" for a in zoo.BIT_ARCHS] + list(ARCHITECTURES)
    if include_ablations:
        names += [a + s for a in ARCHITECTURES for s in ABLATIONS if s]
    return names + list(zoo.OFFLINE_MODELS)


def create_model(
    name: str,
    num_classes: int | None = None,
    pretrained: str | Path | None = None,
    *,
    zero_head: bool = False,
    norm: str | None = None,
    conv: str | None = None,
    ws_eps: float | None = None,
    image_size: int | None = None,
    **timm_kwargs,
) -> nn.Module:
    """Build a model by name, optionally loading weights from a file (npz, bitlab or timm).

    `num_classes` defaults to the head of the `pretrained` file, else to the name's own head
    (21843 for BiT-M, 1000 otherwise). When the file's head has a different size, the new head is zero-initialised with `zero_head=True`
    (BiT-HyperRule) or small-random otherwise. The returned model carries `data_config`
    (input size and normalisation) for pre-processing.
    """
    spec = resolve(name)
    if spec is not None:
        if timm_kwargs:
            raise BitlabError(f"{name}: unexpected arguments {sorted(timm_kwargs)}")
        overrides = {k: v for k, v in dict(norm=norm, conv=conv, ws_eps=ws_eps).items() if v is not None}
        state = None
        if pretrained is not None:
            state, saved = checkpoints.read_state_dict(pretrained)
            if num_classes is None:  # a fine-tuned file brings its own head size
                num_classes = checkpoints.head_size(state)
        elif spec.upstream is not None:  # an official name promises trained weights: say it has none
            log.warning("%s: no pretrained file given: random weights (the official ones: "
                        "`bitlab weights download %s`)", name, name)
        if num_classes is not None:
            overrides["num_classes"] = num_classes
        model = ResNetV2(spec.config(**overrides), zero_head=zero_head)
        if state is not None:
            checkpoints.load_resnetv2(model, state, saved, str(pretrained), keep_model_head=zero_head)
        model.data_config = DataConfig(input_size=image_size or spec.resolution)
        model.model_name = name
        return model
    if name in zoo.OFFLINE_MODELS:
        if num_classes not in (None, 1000):
            raise BitlabError(f"{name} is a 1000-class ImageNet model; num_classes={num_classes} is not supported")
        model = zoo.offline_model(name)
        if pretrained is not None:
            checkpoints.load_weights(model, pretrained)
    else:
        model = _create_timm(name, num_classes, pretrained, **timm_kwargs)
    if image_size is not None:
        if image_size < 1:
            raise BitlabError(f"image_size must be at least 1, got {image_size}")
        model.data_config = DataConfig(**{**model.data_config.to_dict(), "input_size": image_size})
    model.model_name = name
    return model


def _create_timm(name: str, num_classes: int | None, pretrained, **kwargs) -> nn.Module:
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise BitlabError(f"unknown model {name!r}: not a bitlab name ({', '.join(list_models()[:3])}, ...; "
                          "see `bitlab models`) nor a timm model")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = timm.create_model(name, pretrained=False, **kwargs)
    if pretrained is not None:
        checkpoints.load_weights(model, pretrained)
    cfg = timm.data.resolve_data_config({}, model=model)
    model.data_config = DataConfig(input_size=cfg["input_size"][-1], mean=tuple(cfg["mean"]),
                                   std=tuple(cfg["std"]), crop_pct=cfg["crop_pct"])
    return model


def describe(name: str) -> dict:
    """Registry row for `bitlab models`: sizes are counted on the meta device (no memory used)."""
    spec = resolve(name)
    if spec is None:
        return {"name": name, "upstream": "ILSVRC-2012 (offline weights)", "classes": 1000}
    with torch.device("meta"):
        model = ResNetV2(spec.config())
    return {
        "name": name,
        "arch": spec.arch,
        "norm": spec.norm,
        "conv": spec.conv,
        "upstream": spec.upstream or "-",
        "classes": spec.num_classes,
        "resolution": spec.resolution,
        "backbone_params_m": round(count_params(model, backbone_only=True) / 1e6, 2),
        "params_m": round(count_params(model) / 1e6, 2),
    }
