"""Fused models compute the same function as the models they come from, within float32 rounding
measured against float64 (tests/fixtures/numerics.py); prepared models are in evaluation mode,
channels-last and on their device."""
import copy

import cv2
import pytest
import timm
import torch
from torch import nn

from bitlab.errors import BitlabError
from bitlab.models import (ResNetV2, ResNetV2Config, StdConv2d, create_model, fold_batch_norm, fuse_weight_standardization,
                           prepare_for_inference)
from tests.fixtures import numerics

TINY = ResNetV2Config(block_units=(1, 1, 1, 1), width_factor=0.5, num_classes=10)


def _random(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (GN affine and head too), small kernels so that WS's eps counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _ws_convs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (StdConv2d, timm.layers.StdConv2d))]


def test_fused_resnetv2_is_the_same_function_with_plain_convs():
    model, x = _random(ResNetV2(TINY)), torch.randn(4, 3, 64, 64)
    exact, floor = numerics.exact_and_floor(model, x)
    fused = fuse_weight_standardization(model)
    assert not _ws_convs(fused) and len(_ws_convs(model)) == 17  # a copy: the original keeps WS
    assert all(type(m) is nn.Conv2d for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert fused.state_dict().keys() == model.state_dict().keys()
    assert fused.data_config == model.data_config and fused.num_classes == 10
    with torch.no_grad():
        got = fused(x)
    numerics.assert_near_exact(got, exact, floor, "fused")
    assert (got - exact).abs().max() > 0  # float32: not a float64 model by mistake
    with torch.no_grad():  # the same weights run without fusing are far off: the test can tell
        unstandardised = ResNetV2(ResNetV2Config(**{**TINY.to_dict(), "conv": "plain"})).eval()
        unstandardised.load_state_dict(model.state_dict())
        assert (unstandardised(x).double() - exact).abs().max() > 1e3 * numerics.MARGIN * floor


def test_fused_kernels_are_standardised_so_they_load_back_as_the_std_model():
    """Standardising a standardised kernel changes it by ~eps/var: a fused model's weights are the
    weights of the same WS model."""
    model, x = _random(ResNetV2(TINY)), torch.randn(2, 3, 64, 64)
    exact, floor = numerics.exact_and_floor(model, x)
    fused = fuse_weight_standardization(model)
    k = fused.body.block2.unit01.conv2.weight.detach().double().flatten(1)
    torch.testing.assert_close(k.mean(1), torch.zeros(len(k), dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(k.var(1, unbiased=False), torch.ones(len(k), dtype=torch.float64), rtol=0, atol=1e-5)
    reloaded = ResNetV2(TINY).eval()
    reloaded.load_state_dict(fused.state_dict())
    with torch.no_grad():
        numerics.assert_near_exact(reloaded(x), exact, floor, "fused weights in a WS model")


def test_fuses_timm_bit_models_with_their_own_eps():
    """timm's BiT standardises with eps 1e-8; with tiny kernels the eps changes the logits, so a
    fold with another eps would fail here."""
    torch.manual_seed(0)
    model = timm.create_model("resnetv2_50x1_bit", num_classes=5).eval()
    with torch.no_grad():
        for m in _ws_convs(model):
            m.weight.mul_(1e-3)  # raw variance ~1e-9..1e-8: near timm's eps
    x = torch.randn(2, 3, 64, 64)
    exact, floor = numerics.exact_and_floor(model, x)
    fused = fuse_weight_standardization(model)
    assert not _ws_convs(fused)
    with torch.no_grad():
        numerics.assert_near_exact(fused(x), exact, floor, "fused timm BiT")
        for m in _ws_convs(model):
            m.eps = 1e-10
        assert (model(x).double() - exact).abs().max() > 1e3 * floor  # the eps matters on these kernels


def test_a_model_without_weight_standardisation_is_left_as_it_is():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=3).eval()
    fused = fuse_weight_standardization(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    assert fuse_weight_standardization(model, inplace=True) is model


def test_prepare_for_inference_fuses_in_place_and_is_idempotent():
    model, x = _random(ResNetV2(TINY)).train(), torch.randn(2, 3, 64, 64)
    exact, floor = numerics.exact_and_floor(copy.deepcopy(model).eval(), x)
    prepared = prepare_for_inference(model, "cpu", fuse=True)
    assert prepared is model and not prepared.training and not _ws_convs(prepared)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last)
               for m in prepared.modules() if isinstance(m, nn.Conv2d))
    assert prepare_for_inference(prepared, "cpu", fuse=True) is prepared
    with torch.inference_mode():
        numerics.assert_near_exact(prepared(x.contiguous(memory_format=torch.channels_last)), exact, floor, "prepared")


def test_prepare_for_inference_without_fuse_keeps_weight_standardisation():
    """A model the caller may train again keeps its StdConv2d (their kernel cache does the work once)."""
    model = _random(ResNetV2(TINY)).train()
    assert prepare_for_inference(model, "cpu") is model and len(_ws_convs(model)) == 17 and not model.training


def test_prepare_for_inference_refuses_a_bad_device():
    with pytest.raises(BitlabError, match="not a torch device"):
        prepare_for_inference(ResNetV2(TINY), "gpu0")


@pytest.mark.parametrize("fuse", [False, True])
def test_prepared_inside_inference_mode_the_model_stays_trainable(fuse):
    """`bitlab.eval.predict` prepares the caller's model inside inference_mode: its converted
    weights must still be normal tensors (and StdConv2d's kernels cacheable)."""
    model, x = _random(ResNetV2(TINY)), torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        prepare_for_inference(model, "cpu", fuse=fuse)(x)
    assert not any(p.is_inference() for p in model.parameters())
    assert fuse or all(m._kernel_cache is not None for m in _ws_convs(model))
    model.train()(x).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------- BatchNorm folding
def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _random_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from 0 / 1, so that a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in _norms(model):
            n = bn.num_features
            bn.running_mean.copy_(0.5 * torch.randn(n, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(n, generator=g))
            bn.weight.copy_(1.0 + 0.3 * torch.randn(n, generator=g))
            bn.bias.copy_(0.3 * torch.randn(n, generator=g))
    return model.eval()


def test_folded_efficientnet_is_the_same_function_without_batch_norm(photos):
    """The real offline EfficientNet-Lite0: every BatchNorm (timm's BatchNormAct2d, with its ReLU6)
    folded into the conv before it, the same logits within float32 rounding of float64, the same
    top-1 on real photos, the same class and methods; the original untouched (a copy)."""
    model = create_model("efficientnet_lite0.offline_in1k", pretrained=True).eval()
    x = torch.stack([torch.from_numpy(cv2.resize(photos[name], (224, 224), interpolation=cv2.INTER_AREA))
                     .permute(2, 0, 1).float() / 127.5 - 1 for name in ("chelsea", "coffee", "astronaut")])
    exact, floor = numerics.exact_and_floor(model, x)
    folded = fold_batch_norm(model)
    assert len(_norms(model)) == 49 and not _norms(folded) and type(folded) is type(model)
    with torch.no_grad():
        numerics.assert_near_exact(folded(x), exact, floor, "folded")
        assert folded.forward_head(folded.forward_features(x), pre_logits=True).shape[1:] == (model.num_features,)
    cat, espresso = exact.argmax(1).tolist()[:2]
    assert cat in (281, 282, 285) and espresso == 967  # tabby / tiger / Egyptian cat: the real weights
    assert fold_batch_norm(folded, inplace=True) is folded  # nothing left to fold


class _Shapes(nn.Module):
    """conv -> BN pairs that must not fold: a BN before its conv (pre-activation), a conv whose
    output a skip also reads, a conv used twice; and one plain pair that must."""

    def __init__(self) -> None:
        super().__init__()
        self.pre_bn, self.pre_conv = nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3, padding=1)
        self.read_twice, self.bn_twice = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.shared, self.bn_shared_a, self.bn_shared_b = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.plain, self.bn_plain = nn.Conv2d(8, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.pre_conv(self.pre_bn(x))
        y = self.read_twice(x)
        x = self.bn_twice(y) + y
        x = self.bn_shared_a(self.shared(x)) + self.bn_shared_b(self.shared(x))
        return self.bn_plain(self.plain(x))


def test_fold_batch_norm_folds_only_a_conv_read_by_its_batch_norm_alone():
    model, x = _random_norms(_Shapes()), torch.randn(2, 3, 16, 16)
    exact, floor = numerics.exact_and_floor(model, x)
    folded = fold_batch_norm(model)
    assert {n for n, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)} == {
        "pre_bn", "bn_twice", "bn_shared_a", "bn_shared_b"}
    assert isinstance(folded.bn_plain, nn.Identity) and folded.plain.bias is not None
    with torch.no_grad():
        numerics.assert_near_exact(folded(x), exact, floor, "folded")


def test_fold_batch_norm_leaves_training_and_untraceable_models_alone():
    class Branchy(nn.Module):  # control flow on a tensor's value: fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    assert len(_norms(fold_batch_norm(Branchy().eval()))) == 1
    assert len(_norms(fold_batch_norm(_Shapes().train()))) == 5  # batch statistics are no fixed scale


def test_prepare_for_inference_folds_batch_norm_after_convs_only_when_fusing():
    """BiT's BN ablation (pre-activation units: BN, ReLU, conv): the BNs between a unit's convs fold,
    those reading a unit's input (which the shortcut reads too) and the final one (after the sum) stay."""
    bn_model = _random_norms(_random(create_model("R14x0.5-bn", num_classes=10, pretrained=False)))
    x = torch.randn(2, 3, 32, 32)
    exact, floor = numerics.exact_and_floor(bn_model, x)
    prepared = prepare_for_inference(copy.deepcopy(bn_model), "cpu", fuse=True)
    assert len(_norms(bn_model)) == 13 and not _ws_convs(prepared)
    assert sorted(n.rsplit(".", 1)[-1] for n, m in prepared.named_modules() if isinstance(m, nn.BatchNorm2d)) == [
        "gn", "gn1", "gn1", "gn1", "gn1"]  # (module names follow the official GN checkpoints)
    with torch.no_grad():
        numerics.assert_near_exact(prepared(x.contiguous(memory_format=torch.channels_last)), exact, floor, "prepared")
    lite = create_model("efficientnet_lite0.offline_in1k", pretrained=True)
    assert len(_norms(prepare_for_inference(copy.deepcopy(lite), "cpu"))) == 49
    assert not _norms(prepare_for_inference(lite, "cpu", fuse=True))


# ----------------------------------------------------------------------------- its callers
def _fused_channels_last(model: nn.Module) -> bool:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return (not _ws_convs(model) and not model.training
            and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs))


def test_evaluate_predicts_with_a_fused_channels_last_model(tmp_path, photos, monkeypatch):
    from bitlab.eval import evaluate as ev
    from bitlab.eval import predict
    from tests.fixtures.ooc_sets import build_tiny_ooc

    seen, real = [], predict.iter_probs_many

    def spy(models, *args, **kwargs):  # records the models, then runs the real prediction
        seen.extend(models)
        return real(models, *args, **kwargs)

    monkeypatch.setattr(predict, "iter_probs_many", spy)
    summary = ev.evaluate(ev.EvaluateConfig(model="R14x0.5", data=str(build_tiny_ooc(tmp_path / "ooc", photos)),
                                            out=str(tmp_path / "res"), workers=0, progress=False,
                                            random_init=True))
    assert summary["dataset"]["num_images"] == 12 and seen and all(_fused_channels_last(m) for m in seen)


def test_dedup_embeds_with_a_fused_channels_last_model():
    from bitlab.eval import dedup

    assert _fused_channels_last(dedup.make_embedding("model:R14x0.5", random_init=True).model)
