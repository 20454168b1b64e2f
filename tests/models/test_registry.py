"""The registry: the 12 official BiT names, the ILSVRC-2012 fine-tuned ones, architectures, ablations."""
import pytest
import torch

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
        assert create_model("BiT-M-R50x1").head.conv.out_channels == 21843
        assert create_model("BiT-M-R50x1", num_classes=10).head.conv.out_channels == 10
