"""The registry: the 12 official BiT names, the ILSVRC-2012 fine-tuned ones, architectures, ablations."""
import pytest
import torch

from bitlab.errors import BitlabError
from bitlab.models import registry
from bitlab.models.registry import create_model, describe, resolve

ARCHS = ["R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4"]


def test_the_twelve_official_names_with_their_upstream_heads():
    assert registry.official_names() == [f"BiT-{u}-{a}" for u in "MS" for a in ARCHS]
    for arch in ARCHS:
        m, s, ft = resolve(f"BiT-M-{arch}"), resolve(f"BiT-S-{arch}"), resolve(f"BiT-M-{arch}-ILSVRC2012")
        assert (m.arch, m.num_classes, m.upstream, m.resolution) == (arch, 21843, "ImageNet-21k", 224)
        assert (s.arch, s.num_classes, s.upstream, s.resolution) == (arch, 1000, "ILSVRC-2012", 224)
        assert (ft.arch, ft.num_classes, ft.resolution) == (arch, 1000, 480)  # fine-tuned at HyperRule's 480
        assert all((x.norm, x.conv) == ("group", "std") for x in (m, s, ft))
    assert resolve("BiT-S-R50x1-ILSVRC2012") is None  # never released
    assert resolve("BiT-M-R34x1") is None and resolve("resnet50") is None  # left to timm


@pytest.mark.parametrize("suffix, norm, conv", [("", "group", "std"), ("-bn", "batch", "std"),
                                                ("-plain", "group", "plain"), ("-bn-plain", "batch", "plain")])
def test_ablation_names(suffix, norm, conv):
    spec = resolve(f"R101x3{suffix}")
    assert (spec.arch, spec.norm, spec.conv, spec.upstream) == ("R101x3", norm, conv, None)


def test_listing_and_description():
    names = registry.list_models(include_ablations=True)
    assert len(set(names)) == len(names)
    assert {f"BiT-M-{a}-ILSVRC2012" for a in ARCHS} <= set(names) and "R50x1-bn-plain" in names
    assert set(registry.official_names()) <= set(names) and "efficientnet_lite0.offline_in1k" in names
    row = describe("BiT-M-R152x4")  # built on the meta device: no 3.7 GB of weights in memory
    assert row["classes"] == 21843 and row["backbone_params_m"] == 928.34


def test_official_name_builds_its_upstream_head_unless_told_otherwise():
    with torch.device("meta"):
        assert create_model("BiT-M-R50x1", pretrained=False).head.conv.out_channels == 21843
        assert create_model("BiT-M-R50x1", num_classes=10, pretrained=False).head.conv.out_channels == 10


def test_one_decorated_entry_per_family_in_dispatch_order():
    assert list(registry.FAMILIES) == ["bit", "offline", "timm"]
    assert registry.family_of("BiT-M-R50x1").build is registry.bit
    assert registry.family_of("R14x0.5-bn").name == "bit"
    assert registry.family_of("efficientnet_lite0.offline_in1k").build is registry.offline
    assert registry.family_of("resnet50").build is registry.timm_model  # timm's own BiT names too
    assert registry.family_of("resnetv2_50x1_bit").name == "timm"
    assert registry.list_models() == [n for f in registry.FAMILIES.values() for n in f.listed(False)]


def test_a_registered_family_builds_its_names_first(monkeypatch):
    """A new family is one decorated builder: `create_model` asks it before the ones registered earlier
    only if it is registered earlier; here it goes first, and the others keep working behind it."""
    from torch import nn

    from bitlab.data.transforms import DataConfig

    earlier = dict(registry.FAMILIES)
    monkeypatch.setattr(registry, "FAMILIES", {})

    @registry.register_family("toy", accepts=lambda name: name.startswith("toy-"), listed=lambda ablations: ["toy-1"])
    def toy(name, num_classes=None, pretrained=None, *, image_size=None):
        model = nn.Linear(3, num_classes or 2)
        model.data_config, model.model_name = DataConfig(input_size=image_size or 8), name
        return model

    registry.FAMILIES.update(earlier)
    model = create_model("toy-1", num_classes=5)
    assert (model.out_features, model.data_config.input_size, model.model_name) == (5, 8, "toy-1")
    assert registry.list_models()[0] == "toy-1" and create_model("R14x0.5", pretrained=False).model_name == "R14x0.5"
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_family("toy", accepts=lambda name: False)(toy)
    with pytest.raises(BitlabError, match=r"toy-1: unexpected arguments \['zero_head'\] \(the toy family takes "
                                          r"image_size\)"):
        create_model("toy-1", zero_head=True)


# Each family's pre-processing: size, mean, std, then the evaluation view (interpolation, crop_pct,
# crop mode): BiT's official bit_pytorch evaluation (Resize((s, s)) bilinear, no crop) and, for the
# timm-built families, what timm's pretrained_cfg says (the offline EfficientNet-Lites included).
BIT, IMAGENET = ((0.5,) * 3, (0.5,) * 3), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BIT_VIEW = ("bilinear", 1.0, "squash")
DATA_CONFIGS = [
    ("R14x0.5", {}, (224, *BIT, *BIT_VIEW)),
    ("BiT-M-R50x1-ILSVRC2012", {}, (480, *BIT, *BIT_VIEW)),
    ("BiT-S-R50x1", {"image_size": 128}, (128, *BIT, *BIT_VIEW)),
    ("efficientnet_lite0.offline_in1k", {}, (224, *IMAGENET, "bicubic", 0.875, "center")),
    ("efficientnet_lite1.offline_in1k", {}, (240, *IMAGENET, "bicubic", 0.882, "center")),
    ("efficientnet_lite2.offline_in1k", {"image_size": 300}, (300, *IMAGENET, "bicubic", 0.89, "center")),
    ("resnet18", {}, (224, *IMAGENET, "bicubic", 0.95, "center")),
    ("resnetv2_50x1_bit", {}, (224, *BIT, "bicubic", 0.875, "center")),  # its default tag: goog_distilled_in1k
    ("vit_tiny_patch16_224", {}, (224, *BIT, "bicubic", 0.9, "center")),
]


@pytest.mark.parametrize("name, options, expected", DATA_CONFIGS, ids=[c[0] for c in DATA_CONFIGS])
def test_every_model_carries_its_name_and_data_config(name, options, expected):
    from bitlab.models import data_config_of

    device = "cpu" if registry.family_of(name).name == "offline" else "meta"  # real weights load on the CPU
    with torch.device(device):
        model = create_model(name, **options, pretrained=False)
    cfg = model.data_config
    assert (cfg.input_size, cfg.mean, cfg.std, cfg.interpolation, cfg.crop_pct, cfg.crop_mode) == expected
    assert model.model_name == name and data_config_of(model) is cfg


@pytest.mark.parametrize("name", [c[0] for c in DATA_CONFIGS if registry.family_of(c[0]).name != "bit"])
def test_timm_built_models_take_timms_pretrained_config(name):
    """The data config of a timm-built model is what timm's own transform would be built from."""
    import timm.data

    device = "cpu" if registry.family_of(name).name == "offline" else "meta"
    with torch.device(device):
        model = create_model(name, pretrained=False)  # the config comes from the name, not the weights
    ref = timm.data.resolve_data_config({}, model=model)
    cfg = model.data_config
    assert (cfg.interpolation, cfg.crop_pct, cfg.crop_mode, cfg.mean, cfg.std, cfg.input_size) == (
        ref["interpolation"], ref["crop_pct"], ref["crop_mode"], tuple(ref["mean"]), tuple(ref["std"]),
        ref["input_size"][-1])


def test_resnetv2_takes_its_data_config_in_the_constructor_and_modules_without_one_get_bits():
    from torch import nn

    from bitlab.data.transforms import DataConfig
    from bitlab.models import ResNetV2, ResNetV2Config, data_config_of

    with torch.device("meta"):
        plain = ResNetV2(ResNetV2Config(block_units=(1, 1, 1, 1), width_factor=0.5))
        sized = ResNetV2(plain.config, data_config=DataConfig(input_size=96), name="mine")
    assert plain.data_config == DataConfig() and plain.model_name is None
    assert (sized.data_config.input_size, sized.model_name) == (96, "mine")
    assert data_config_of(nn.Linear(2, 2)) == DataConfig()  # a module from elsewhere: BiT's [-1, 1] at 224


@pytest.mark.parametrize("name", ["R14x0.5", "efficientnet_lite0.offline_in1k", "resnet18"])
def test_image_size_below_one_is_refused_for_every_family(name):
    with pytest.raises(BitlabError, match="image_size must be at least 1, got 0"):
        create_model(name, image_size=0)


def test_options_of_another_family_are_refused_by_name():
    with pytest.raises(BitlabError, match=r"R14x0.5: unexpected arguments \['drop_rate'\] \(the bit family takes "
                                          r"zero_head, norm, conv, ws_eps, image_size\)"):
        create_model("R14x0.5", drop_rate=0.1)
    with pytest.raises(BitlabError, match=r"unexpected arguments \['norm', 'zero_head'\] \(the offline family"):
        create_model("efficientnet_lite0.offline_in1k", zero_head=True, norm="batch")
