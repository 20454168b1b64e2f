"""The architecture matches the official BiT definition (big_transfer's bit_pytorch/models.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitlab.models import ResNetV2, ResNetV2Config, StdConv2d, count_params, create_model
from bitlab.models.resnetv2 import GN_EPS, GN_GROUPS, WS_EPS
from tests.fixtures import numerics

TINY = ResNetV2Config(block_units=(1, 1, 1, 1), width_factor=0.5, num_classes=10)


def test_weight_standardisation_is_biased_variance_with_eps_inside_sqrt():
    conv = StdConv2d(4, 3, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn_like(conv.weight) * 1e-4)  # small kernels: eps matters
    w = conv.weight.double()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)  # biased (population) variance
    expected = (w - mean) / torch.sqrt(var + 1e-10)
    assert WS_EPS == 1e-10
    torch.testing.assert_close(conv.standardized_weight().double(), expected, rtol=1e-5, atol=1e-5)
    unbiased = (w - mean) / torch.sqrt(w.var(dim=(1, 2, 3), keepdim=True) + 1e-10)
    assert not torch.allclose(conv.standardized_weight().double(), unbiased, atol=1e-3)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(conv(x), F.conv2d(x, expected.float(), None, 1, 1))


def test_group_norm_everywhere_with_32_groups_and_official_eps():
    model = ResNetV2(TINY)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 * 4 + 1  # three per unit, one before the head
    assert all(m.num_groups == GN_GROUPS == 32 and m.eps == GN_EPS == 1e-5 for m in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_stride_on_3x3_and_projection_only_where_shape_changes():
    model = create_model("R50x1", pretrained=False)
    for b, block in enumerate(model.body, start=1):
        for u, unit in enumerate(block, start=1):
            assert unit.conv1.stride == (1, 1) and unit.conv3.stride == (1, 1)
            assert unit.conv2.stride == ((2, 2) if b > 1 and u == 1 else (1, 1))
            assert (unit.downsample is not None) == (u == 1)
    assert isinstance(model.head.conv, nn.Conv2d) and not isinstance(model.head.conv, StdConv2d)
    assert model.head.conv.bias is not None


def test_projection_takes_the_pre_activated_input():
    unit = ResNetV2(TINY).body.block2.unit01
    with torch.no_grad():
        for p in unit.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, unit.gn1.num_channels, 8, 8)
    preact = F.relu(unit.gn1(x))
    out = unit.conv3(F.relu(unit.gn3(unit.conv2(F.relu(unit.gn2(unit.conv1(preact)))))))
    torch.testing.assert_close(unit(x), out + unit.downsample(preact))
    assert not torch.allclose(unit(x), out + unit.downsample(x), atol=1e-3)


def test_root_zero_pads_then_pools_without_padding():
    """Pins the official root: a MaxPool2d(padding=1) (pads with -inf) must not pass this test."""
    torch.manual_seed(0)
    model = ResNetV2(TINY)
    x = torch.randn(1, 3, 32, 32)
    conv_out = model.root.conv(x)
    assert (conv_out < 0).any()  # no activation before the pool, so negative values reach it
    zero_padded = F.max_pool2d(F.pad(conv_out, (1, 1, 1, 1), value=0.0), kernel_size=3, stride=2)
    inf_padded = F.max_pool2d(conv_out, kernel_size=3, stride=2, padding=1)
    got = model.root(x)
    assert not torch.allclose(zero_padded, inf_padded)  # the two paddings differ on this input
    torch.testing.assert_close(got, zero_padded)


@pytest.mark.parametrize("size, final", [(128, 4), (224, 7), (480, 15)])
def test_spatial_sizes(size, final):
    model = ResNetV2(TINY)
    assert model.root(torch.zeros(1, 3, size, size)).shape[-1] == (size // 2 + 2 - 3) // 2 + 1
    assert model.forward_features(torch.zeros(1, 3, size, size)).shape[-2:] == (final, final)


@pytest.mark.parametrize("arch, backbone_m", [
    ("R50x1", 23.50), ("R50x3", 211.17), ("R101x1", 42.49), ("R101x3", 381.79), ("R152x2", 232.24), ("R152x4", 928.34),
])
def test_parameter_counts(arch, backbone_m):
    with torch.device("meta"):  # the big ones never touch memory
        model = create_model(arch, num_classes=21843, pretrained=False)
    assert round(count_params(model, backbone_only=True) / 1e6, 2) == backbone_m
    assert count_params(model) - count_params(model, backbone_only=True) == model.num_features * 21843 + 21843


def test_backbone_count_leaves_out_the_classifier_of_timm_models_too():
    """The classifier is found by asking the model (`get_classifier`, timm's query), not by its class."""
    with torch.device("meta"):
        model = create_model("resnet18", num_classes=10, pretrained=False)
    assert count_params(model) - count_params(model, backbone_only=True) == 512 * 10 + 10
    assert create_model("R14x0.5", num_classes=3, pretrained=False).get_classifier().out_channels == 3


def test_zero_head_gives_zero_logits_and_features_are_pre_logits():
    model = ResNetV2(TINY, zero_head=True).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.count_nonzero(model(x)) == 0
    feats = model.pre_logits(x)
    assert feats.shape == (2, model.num_features) == (2, 1024)
    model.reset_classifier(5, zero_init=False)
    torch.testing.assert_close(model(x), model.head.conv(feats[:, :, None, None]).flatten(1))
    headless = ResNetV2(ResNetV2Config(**{**TINY.to_dict(), "block_units": (1, 1, 1, 1), "num_classes": 0}))
    assert headless(x).shape == (2, 1024)


@pytest.mark.parametrize("name, norm_type, conv_type", [
    ("R14x0.5", nn.GroupNorm, StdConv2d), ("R14x0.5-bn", nn.BatchNorm2d, StdConv2d),
    ("R14x0.5-plain", nn.GroupNorm, nn.Conv2d), ("R14x0.5-bn-plain", nn.BatchNorm2d, nn.Conv2d),
])
def test_ablation_variants_by_name_and_argument(name, norm_type, conv_type):
    config = create_model(name, pretrained=False).config
    for model in (create_model(name, pretrained=False),
                  create_model("R14x0.5", norm=config.norm, conv=config.conv, pretrained=False)):
        assert isinstance(model.body.block1.unit01.gn1, norm_type)
        assert type(model.body.block1.unit01.conv1) is conv_type
        assert type(model.root.conv) is conv_type
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_channels_last_matches_contiguous():
    model = ResNetV2(TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    exact, floor = numerics.exact_and_floor(model, x)
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        numerics.assert_near_exact(model(x.contiguous(memory_format=torch.channels_last)), exact, floor, "channels-last")


# ----------------------------------------------------------------------------- the standardised-kernel cache
def _trained(seed: int = 0) -> ResNetV2:
    """TINY with random weights everywhere (GN affine and head too), in evaluation mode."""
    torch.manual_seed(seed)
    model = ResNetV2(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.05 if p.ndim > 1 else 0.3) + (1.0 if p.ndim == 1 else 0.0))
    return model


def _fresh(model: ResNetV2, x: torch.Tensor) -> torch.Tensor:
    """What `model` computes from its current weights, every kernel standardised anew (a copy
    carries no cache)."""
    import copy

    with torch.no_grad():
        return copy.deepcopy(model)(x)


def _convs(model: nn.Module) -> list[StdConv2d]:
    return [m for m in model.modules() if isinstance(m, StdConv2d)]


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_kernel_is_standardised_once_while_the_weight_does_not_change(context):
    model, x = _trained(), torch.randn(2, 3, 32, 32)
    conv = model.root.conv
    with context():
        first = model(x)
        kernel = conv.standardized_weight()
        torch.testing.assert_close(model(x), first)
        assert conv.standardized_weight() is kernel  # reused, not recomputed
    torch.testing.assert_close(kernel, conv.standardize(conv.weight.detach()))
    assert all(c._kernel_cache is not None for c in _convs(model))
    with torch.no_grad():  # a kernel cached under inference_mode serves plain no_grad too
        torch.testing.assert_close(model(x), first)


def test_an_optimiser_step_in_eval_mode_is_seen_by_the_next_forward():
    model, x = _trained(), torch.randn(2, 3, 32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).square().sum().backward()  # gradients, in eval mode
    with torch.no_grad():
        before = model(x)  # caches every kernel
    opt.step()  # in place, under no_grad, in eval mode
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max() > 1e-2  # the step changed the function...
    torch.testing.assert_close(after, _fresh(model, x))  # ...and the cached forward knows it


def test_load_state_dict_is_seen_by_the_next_forward():
    model, other, x = _trained(0), _trained(1), torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        before = model(x)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        after = model(x)
    assert (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, _fresh(other, x))


def test_dtype_and_memory_format_conversions_drop_the_cache():  # .to(float64), channels-last, .half()
    model, x = _trained(), torch.randn(2, 3, 32, 32)
    exact, floor = numerics.exact_and_floor(model, x)
    with torch.no_grad():
        model(x)
        model.to(torch.float64)
        assert all(c._kernel_cache is None for c in _convs(model))
        got = model(x.double())
        assert got.dtype == torch.float64 and model.root.conv.standardized_weight().dtype == torch.float64
        torch.testing.assert_close(got, exact, rtol=0, atol=1e-12)  # float64 all the way: no float32 kernel left
        model.float().to(memory_format=torch.channels_last)
        cl = model(x.contiguous(memory_format=torch.channels_last))
        # kept in the weight's layout, which the conv would otherwise convert it to on every call
        assert model.root.conv.standardized_weight().is_contiguous(memory_format=torch.channels_last)
        model.half()
        assert all(c._kernel_cache is None for c in _convs(model))
        conv = model.root.conv
        torch.testing.assert_close(conv.standardized_weight(), conv.standardize(conv.weight))
        assert conv.standardized_weight().dtype == torch.float16
    numerics.assert_near_exact(cl, exact, floor, "channels-last after float64")


def test_training_forward_builds_the_graph_through_the_standardisation():
    """With a weight that needs its gradient, the kernel is computed in the graph (in eval mode
    too): the gradient includes WS's Jacobian, and no stale copy is kept."""
    conv = StdConv2d(4, 3, kernel_size=3, padding=1, bias=False).double().eval()  # float64: one rounding floor
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        conv(x)  # a cached kernel exists...
    conv(x).square().sum().backward()  # ...but is not used here
    assert conv._kernel_cache is None
    w = conv.weight.detach().clone().requires_grad_()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    ref = (w - mean) / torch.sqrt(((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True) + WS_EPS)
    F.conv2d(x, ref, None, 1, 1).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, w.grad, rtol=1e-9, atol=1e-9)


def test_a_frozen_weight_uses_the_cache_and_still_passes_input_gradients():
    conv = StdConv2d(4, 3, kernel_size=3, padding=1, bias=False).requires_grad_(False)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    conv(x).sum().backward()
    kernel = conv._kernel_cache[2]
    assert conv.standardized_weight() is kernel
    x2 = x.detach().clone().requires_grad_()
    F.conv2d(x2, conv.standardize(conv.weight), None, 1, 1).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_writes_through_data_need_clear_kernel_cache():
    """A tensor assigned to `.data` is seen (another storage); an in-place write through `.data`
    bypasses autograd's version counter: the documented blind spot, and its remedy."""
    model, x = _trained(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        for c in _convs(model):
            c.weight.data = torch.randn_like(c.weight) * 0.05
            c.eps = 1e-3  # a changed eps is seen too
        torch.testing.assert_close(model(x), _fresh(model, x))
    for c in _convs(model):
        c.weight.data.mul_(-1.0).add_(0.01)  # not seen by the version counter
        c.clear_kernel_cache()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _fresh(model, x))


def test_the_cache_is_not_state_and_does_not_travel():
    import copy
    import pickle

    model, x = _trained(), torch.randn(2, 3, 32, 32)
    keys = set(model.state_dict())
    size = len(pickle.dumps(model))
    with torch.no_grad():
        want = model(x)
    assert set(model.state_dict()) == keys  # no extra keys in checkpoints
    assert len(pickle.dumps(model)) == size  # pickles (DDP spawn, torch.save) carry no kernels
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(c._kernel_cache is None for c in _convs(clone))
        with torch.no_grad():
            torch.testing.assert_close(clone(x), want)


def test_torch_compile_traces_the_standardisation_not_the_cache():
    """Under dynamo the kernel is computed in the graph: compiled inference follows weight
    changes, and compiled training gets WS's gradient ("aot_eager": dynamo and AOT autograd's
    tracing, without a C++ compiler; `fullgraph`: the cache causes no graph break)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(StdConv2d(3, 8, kernel_size=3, padding=1), nn.ReLU(), StdConv2d(8, 4, kernel_size=1)).eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)  # no graph break at the cache
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x))
        net[0].weight.mul_(-1.0).add_(0.1)
        torch.testing.assert_close(compiled(x), _fresh(net, x))
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net(x).square().sum().backward()
    for got, want in zip(grads, (p.grad for p in net.parameters())):
        torch.testing.assert_close(got, want)
