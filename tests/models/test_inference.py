"""Fused models compute the same function as the models they come from, within float32 rounding
measured against float64 (tests/fixtures/numerics.py); prepared models are in evaluation mode,
channels-last and on their device."""
import copy

import pytest
import timm
import torch
from torch import nn

from bitlab.errors import BitlabError
from bitlab.models import ResNetV2, ResNetV2Config, StdConv2d, fuse_weight_standardization, prepare_for_inference
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


# ----------------------------------------------------------------------------- its callers
def _fused_channels_last(model: nn.Module) -> bool:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return (not _ws_convs(model) and not model.training
            and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs))


def test_evaluate_predicts_with_a_fused_channels_last_model(tmp_path, photos, monkeypatch):
    from bitlab.eval import evaluate as ev
    from tests.fixtures.ooc_sets import build_tiny_ooc

    seen, real = [], ev.iter_probs

    def spy(model, *args, **kwargs):  # records the model, then runs the real prediction
        seen.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ev, "iter_probs", spy)
    summary = ev.evaluate(ev.EvaluateConfig(model="R14x0.5", data=str(build_tiny_ooc(tmp_path / "ooc", photos)),
                                            out=str(tmp_path / "res"), workers=0, progress=False,
                                            random_init=True))
    assert summary["dataset"]["num_images"] == 12 and seen and all(_fused_channels_last(m) for m in seen)


def test_dedup_embeds_with_a_fused_channels_last_model():
    from bitlab.eval import dedup

    assert _fused_channels_last(dedup.make_embedding("model:R14x0.5", random_init=True).model)
