"""Model names -> models: one registry entry per model family, in the shape of timm's `register_model`.

A family is a builder function registered with `@register_family`, together with the names it
accepts and the names `bitlab models` lists. `create_model` asks the families in registration
order; the first that accepts a name builds it:
- `bit`: the official BiT names `BiT-M-R50x1` (ImageNet-21k, 21843 classes), `BiT-S-R50x1`
  (ILSVRC-2012, 1000 classes) and `BiT-M-R50x1-ILSVRC2012` (BiT-M fine-tuned on ILSVRC-2012, 1000
  classes); architecture names `R50x1`, `R50x3`, `R101x1`, `R101x3`, `R152x2`, `R152x4`, and
  `R14x0.5`, a tiny CPU model for tests and demos (not in the paper); the paper's Table 4-5
  ablations as suffixes: `R50x1-bn` (BatchNorm + WS), `R50x1-plain` (GroupNorm + plain conv),
  `R50x1-bn-plain` (BatchNorm + plain conv), or as `norm=`/`conv=` arguments;
- `offline`: `efficientnet_lite0.offline_in1k`, `efficientnet_lite1.offline_in1k`,
  `efficientnet_lite2.offline_in1k`, real ImageNet-1k classifiers that install offline;
- `timm`: any other name, handed to `timm.create_model` (the last family: timm says whether it
  knows the name).

`pretrained` is the same in every family: True (the default) loads the weights the name stands
for (an official BiT name's `.npz` from bitlab's cache, downloaded on first use; timm's hub weights;
the offline models' packaged ones), a path loads that file, False builds random weights. A name
that stands for an architecture alone (`R50x1`, `R14x0.5`, the ablations) has no weights to load:
asking for them is an error that says how to give a file or ask for random ones.

Every model a builder returns carries `data_config` (input size, mean/std and its reference
evaluation view: interpolation, crop_pct, crop mode; `bitlab.data.transforms.eval_image` applies it)
and `model_name`: bitlab's ResNetV2 takes both in its constructor (BiT's official evaluation), and
the timm-built families set them from timm's `pretrained_cfg` where they build the model.
"""
from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from bitlab.data.transforms import DataConfig
from bitlab.errors import BitlabError
from bitlab.models import checkpoints, zoo
from bitlab.models.resnetv2 import ResNetV2, ResNetV2Config, count_params

Builder = Callable[..., nn.Module]  # (name, num_classes, pretrained, **options) -> model
Pretrained = bool | str | os.PathLike | None  # True / None: the name's own weights; a file; False: random


@dataclass(frozen=True)
class Family:
    """One registry entry: a family's builder, the names it accepts and the names it lists."""

    name: str
    build: Builder
    accepts: Callable[[str], bool]
    listed: Callable[[bool], list[str]]  # the names `bitlab models` shows (True: with the ablations)
    describe: Callable[[str], dict]  # one `bitlab models` row


FAMILIES: dict[str, Family] = {}  # in registration order, the order `create_model` asks them


def register_family(name: str, *, accepts: Callable[[str], bool],
                    listed: Callable[[bool], list[str]] = lambda ablations: [],
                    describe: Callable[[str], dict] = lambda name: {"name": name}) -> Callable[[Builder], Builder]:
    """Decorator: register `build` as the builder of the family `name`."""
    def register(build: Builder) -> Builder:
        if name in FAMILIES:
            raise ValueError(f"model family {name!r} is registered twice")
        FAMILIES[name] = Family(name, build, accepts, listed, describe)
        return build
    return register


def family_of(name: str) -> Family:
    """The registry entry that builds `name` (the `timm` family accepts every other name)."""
    return next(f for f in FAMILIES.values() if f.accepts(name))


def create_model(name: str, num_classes: int | None = None, pretrained: Pretrained = True,
                 **options) -> nn.Module:
    """Build a model by name with the weights it stands for (`pretrained=True`, the default; None
    means the same), weights from a file (npz, bitlab or timm: `pretrained=PATH`) or random weights
    (`pretrained=False`); see the module docs for where each family's weights come from.

    `num_classes` defaults to the head of the weights, else to the name's own head
    (21843 for BiT-M, 1000 otherwise). `options` depend on the family: `image_size` (the
    evaluation resolution, default the model's) for all; for BiT names `zero_head` (a head of
    another size than the file's is zero-initialised, as BiT-HyperRule does, instead of
    small-random), `norm`, `conv` and `ws_eps`; for timm names any `timm.create_model` keyword.
    The model carries `data_config` (input size and normalisation) and `model_name`.
    """
    image_size = options.get("image_size")
    if image_size is not None and image_size < 1:
        raise BitlabError(f"image_size must be at least 1, got {image_size}")
    family = family_of(name)
    params = inspect.signature(family.build).parameters.values()
    known = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    if all(p.kind is not p.VAR_KEYWORD for p in params) and (unexpected := set(options) - set(known)):
        raise BitlabError(f"{name}: unexpected arguments {sorted(unexpected)} "
                          f"(the {family.name} family takes {', '.join(known)})")
    return family.build(name, num_classes, True if pretrained is None else pretrained, **options)


def own_weights(pretrained: Pretrained) -> bool:
    """Whether `pretrained` asks for the weights the name stands for (not a file, not random)."""
    return pretrained is True or pretrained is None


RANDOM_WEIGHTS = "none (random weights)"  # the pre-training data of a model with random weights


def pretraining_data(name: str, pretrained: Pretrained = True) -> str:
    """What `name`'s weights were pre-trained on, for legends: the official names' upstream data
    (whatever file holds their weights), ILSVRC-2012 for the offline models, timm's pretrained tag's
    data for timm's own weights, `RANDOM_WEIGHTS` for `pretrained=False`, else 'unknown'."""
    if pretrained is False:
        return RANDOM_WEIGHTS
    if name in zoo.OFFLINE_MODELS:
        return "ILSVRC-2012" if own_weights(pretrained) else "unknown"
    if (spec := resolve(name)) is not None:
        return spec.upstream or "unknown"
    return zoo.timm_pretraining_data(name) if own_weights(pretrained) else "unknown"


def no_released_weights(name: str) -> BitlabError:
    return BitlabError(f"{name} names an architecture, and no weights were released for it: give a weights file "
                       "with --pretrained FILE (pretrained=FILE in Python), or --random-init (pretrained=False) "
                       "for random weights")


def data_config_of(model: nn.Module) -> DataConfig:
    """How `model` wants its input: its own `data_config` (every registry model has one), else
    BiT's (a module built outside the registry)."""
    return getattr(model, "data_config", None) or DataConfig()


def list_models(include_ablations: bool = False) -> list[str]:
    return [name for family in FAMILIES.values() for name in family.listed(include_ablations)]


def describe(name: str) -> dict:
    """Registry row for `bitlab models`."""
    return family_of(name).describe(name)


# ----------------------------------------------------------------------------- BiT ResNet-v2
# name -> (block units, width factor): the official registry (`KNOWN_MODELS` in
# big_transfer's bit_pytorch/models.py).
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
    # Twice as deep: the few-shot notebook's second architecture for Fig. 5 on a CPU.
    "R26x0.5": ((2, 2, 2, 2), 0.5),
}
UPSTREAM = {"S": ("ILSVRC-2012", 1000), "M": ("ImageNet-21k", 21843)}
ABLATIONS = {"": ("group", "std"), "-bn": ("batch", "std"), "-plain": ("group", "plain"), "-bn-plain": ("batch", "plain")}
# BiT-HyperRule's resolution for images >= 96x96 (bit_hyperrule.get_resolution): fine-tuned
# ILSVRC-2012 models are evaluated at 480. Upstream checkpoints were trained at 224.
FINETUNED_RESOLUTION = 480
UPSTREAM_RESOLUTION = 224


@dataclass(frozen=True)
class ModelSpec:
    """A BiT ResNetV2 name, resolved."""

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
    """The spec for `name`, or None if it is not a BiT ResNetV2 name."""
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


def _bit_names(include_ablations: bool) -> list[str]:
    names = official_names() + [f"BiT-M-{a}-ILSVRC2012" for a in zoo.BIT_ARCHS] + list(ARCHITECTURES)
    if include_ablations:
        names += [a + s for a in ARCHITECTURES for s in ABLATIONS if s]
    return names


def _describe_bit(name: str) -> dict:
    """Sizes are counted on the meta device (no memory used)."""
    spec = resolve(name)
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


@register_family("bit", accepts=lambda name: resolve(name) is not None, listed=_bit_names, describe=_describe_bit)
def bit(name: str, num_classes: int | None = None, pretrained: Pretrained = True, *,
        zero_head: bool = False, norm: str | None = None, conv: str | None = None, ws_eps: float | None = None,
        image_size: int | None = None) -> ResNetV2:
    """A BiT ResNet-v2; `pretrained` may be an official npz, a bitlab or a timm file; True: the
    official npz of an official name (`zoo.official_weights`: the cache, downloaded on first use)."""
    spec = resolve(name)
    overrides = {k: v for k, v in dict(norm=norm, conv=conv, ws_eps=ws_eps).items() if v is not None}
    if own_weights(pretrained):
        if spec.upstream is None:
            raise no_released_weights(name)
        pretrained = zoo.official_weights(name)
    state = saved = None
    if pretrained is not False:
        state, saved = checkpoints.read_state_dict(pretrained)
        if num_classes is None:  # a fine-tuned file brings its own head size
            num_classes = checkpoints.head_size(state)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    # The official bit_pytorch evaluation: Resize((s, s)) of the PIL image (bilinear), no crop, [-1, 1].
    data_config = DataConfig(input_size=image_size or spec.resolution, interpolation="bilinear", crop_pct=1.0,
                             crop_mode="squash")
    model = ResNetV2(spec.config(**overrides), zero_head=zero_head, data_config=data_config, name=name)
    if state is not None:
        checkpoints.load_resnetv2(model, state, saved, str(pretrained), keep_model_head=zero_head)
    return model


# ----------------------------------------------------------------------------- timm-built families
def timm_data_config(model: nn.Module) -> DataConfig:
    """timm's evaluation pre-processing for a timm-built model, from its `pretrained_cfg` (what
    `timm.data.resolve_data_config` gives `create_transform`)."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    return DataConfig(input_size=cfg["input_size"][-1], mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                      interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"])


def _with_data_config(model: nn.Module, name: str, image_size: int | None) -> nn.Module:
    """What every registry model carries, given to a timm model by the builder that made it."""
    data_config = timm_data_config(model)
    model.data_config = replace(data_config, input_size=image_size) if image_size else data_config
    model.model_name = name
    return model


@register_family("offline", accepts=lambda name: name in zoo.OFFLINE_MODELS,
                 listed=lambda ablations: list(zoo.OFFLINE_MODELS),
                 describe=lambda name: {"name": name, "upstream": "ILSVRC-2012 (offline weights)", "classes": 1000})
def offline(name: str, num_classes: int | None = None, pretrained: Pretrained = True, *,
            image_size: int | None = None) -> nn.Module:
    """A real ImageNet-1k classifier whose weights install as a Python package (`zoo.OFFLINE_MODELS`)."""
    if num_classes not in (None, 1000):
        raise BitlabError(f"{name} is a 1000-class ImageNet model; num_classes={num_classes} is not supported")
    model = zoo.offline_model(name, pretrained=own_weights(pretrained))
    if not own_weights(pretrained) and pretrained is not False:
        checkpoints.load_weights(model, pretrained)
    return _with_data_config(model, name, image_size)


@register_family("timm", accepts=lambda name: True)
def timm_model(name: str, num_classes: int | None = None, pretrained: Pretrained = True, *,
               image_size: int | None = None, **timm_kwargs) -> nn.Module:
    """`timm.create_model(name)` with timm's pre-processing for it; True: timm's pretrained weights
    (`zoo.timm_pretrained`: huggingface_hub's cache, downloaded on first use)."""
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise BitlabError(f"unknown model {name!r}: not a bitlab name ({', '.join(list_models()[:3])}, ...; "
                          "see `bitlab models`) nor a timm model")
    zoo.timm_source(name)  # an unknown pretrained tag is refused by name, whatever the weights
    if num_classes is not None:
        timm_kwargs["num_classes"] = num_classes
    if own_weights(pretrained):
        model = zoo.timm_pretrained(name, **timm_kwargs)
    else:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        if pretrained is not False:
            checkpoints.load_weights(model, pretrained)
    return _with_data_config(model, name, image_size)
