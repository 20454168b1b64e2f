"""Official npz, timm and bitlab files: schema, round trips, strict checks, parity with timm."""
import pickle

import cv2
import numpy as np
import pytest
import timm
import torch

from bitlab.data.transforms import normalize, to_chw_tensor
from bitlab.errors import BitlabError
from bitlab.models import bitlab_to_timm, checkpoints, create_model, timm_to_bitlab
from bitlab.models.checkpoints import CheckpointError
from tests.fixtures import numerics


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, GN affine and head included, so nothing matches by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _batch(photos, size=128):
    x = torch.stack([to_chw_tensor(cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA))
                     for img in photos.values()])
    return normalize(x)


def _timm_bit(num_classes: int) -> torch.nn.Module:
    model = timm.create_model("resnetv2_50x1_bit", num_classes=num_classes, pretrained=False)
    for m in model.modules():  # timm's BiT uses eps 1e-8; the official value is 1e-10
        if isinstance(m, timm.layers.StdConv2d):
            m.eps = 1e-10
    return model.eval()


def test_official_key_schema_and_hwio(tmp_path):
    model = _randomise(create_model("BiT-M-R50x1", pretrained=False))
    path = checkpoints.save_npz(model, tmp_path / "BiT-M-R50x1.npz")
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
        root = f["resnet/root_block/standardized_conv2d/kernel"]
        head = f["resnet/head/conv2d/kernel"]
    assert len(keys) == 153  # R50: 153 keys with the head, as the official load_from reads them
    assert root.shape == (7, 7, 3, 64) and head.shape == (1, 1, 2048, 21843)
    assert {"resnet/group_norm/gamma", "resnet/group_norm/beta", "resnet/head/conv2d/bias",
            "resnet/block1/unit01/a/proj/standardized_conv2d/kernel",
            "resnet/block4/unit03/c/group_norm/beta", "resnet/block3/unit06/b/standardized_conv2d/kernel"} <= keys
    assert not any("proj" in k for k in keys if "unit01" not in k)
    np.testing.assert_array_equal(root, model.root.conv.weight.detach().numpy().transpose(2, 3, 1, 0))


def test_npz_round_trip_is_exact(tmp_path):
    model = _randomise(create_model("R14x0.5", num_classes=7, pretrained=False))
    a = checkpoints.save_npz(model, tmp_path / "a.npz")
    reloaded = create_model("R14x0.5", num_classes=7, pretrained=a)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    b = checkpoints.save_npz(reloaded, tmp_path / "b.npz")
    with np.load(a) as fa, np.load(b) as fb:
        assert fa.files == fb.files and all(np.array_equal(fa[k], fb[k]) for k in fa.files)


def test_npz_loads_into_bitlab_and_timm_with_same_predictions(tmp_path, photos):
    """Parity: the same random weights give the same logits in bitlab and timm (eps matched)."""
    bit = _randomise(create_model("BiT-S-R50x1", pretrained=False))
    path = checkpoints.save_npz(bit, tmp_path / "BiT-S-R50x1.npz")
    ours = create_model("BiT-S-R50x1", pretrained=path).eval()
    theirs = _timm_bit(1000)
    theirs.load_pretrained(str(path))  # timm's own npz reader (official key schema)
    x = _batch(photos)
    exact, floor = numerics.exact_and_floor(ours, x)
    with torch.no_grad():
        numerics.assert_near_exact(theirs(x), exact, floor, "timm")
    assert exact.std() > 1e-2  # logits are not trivially equal


def test_timm_conversion_both_ways(photos):
    bit = _randomise(create_model("R50x1", num_classes=10, pretrained=False), seed=3)
    theirs = _timm_bit(10)
    theirs.load_state_dict(bitlab_to_timm(bit.state_dict()), strict=True)
    back = create_model("R50x1", num_classes=10, pretrained=False)
    back.load_state_dict(timm_to_bitlab(theirs.state_dict()), strict=True)
    x = _batch(photos)
    exact, floor = numerics.exact_and_floor(bit, x)
    with torch.no_grad():
        numerics.assert_near_exact(theirs(x), exact, floor, "timm")
        assert torch.equal(bit(x), back.eval()(x))


def test_convert_cli_chain_npz_timm_bitlab_npz(tmp_path):
    model = _randomise(create_model("R14x0.5", num_classes=3, pretrained=False))
    src = checkpoints.save_npz(model, tmp_path / "m.npz")
    checkpoints.convert(src, tmp_path / "m_timm.pth", to="timm")
    checkpoints.convert(tmp_path / "m_timm.pth", tmp_path / "m.pt")
    checkpoints.convert(tmp_path / "m.pt", tmp_path / "back.npz")
    with np.load(src) as fa, np.load(tmp_path / "back.npz") as fb:
        assert sorted(fa.files) == sorted(fb.files) and all(np.array_equal(fa[k], fb[k]) for k in fa.files)
    assert checkpoints.detect_format(tmp_path / "m_timm.pth") == "timm"
    assert checkpoints.detect_format(tmp_path / "m.pt") == "bitlab"


def test_head_replaced_or_kept_and_headless_files(tmp_path):
    upstream = _randomise(create_model("BiT-M-R50x1", pretrained=False))  # 21843-class head
    path = checkpoints.save_npz(upstream, tmp_path / "BiT-M-R50x1.npz")
    tuned = create_model("BiT-M-R50x1", num_classes=10, pretrained=path, zero_head=True)
    assert torch.count_nonzero(tuned.head.conv.weight) == 0 and tuned.head.conv.weight.shape[0] == 10
    assert torch.equal(tuned.body.block4.unit03.conv3.weight, upstream.body.block4.unit03.conv3.weight)
    same = create_model("BiT-M-R50x1", pretrained=path)
    assert torch.equal(same.head.conv.weight, upstream.head.conv.weight)
    headless = {k: v for k, v in np.load(path).items() if not k.startswith("resnet/head/")}
    np.savez(tmp_path / "headless.npz", **headless)
    model = create_model("BiT-M-R50x1", num_classes=5, pretrained=tmp_path / "headless.npz")
    assert torch.equal(model.root.conv.weight, upstream.root.conv.weight)


def test_strict_errors_name_the_key_and_the_file(tmp_path):
    model = _randomise(create_model("R14x0.5", num_classes=3, pretrained=False))
    arrays = checkpoints.state_dict_to_npz(model.state_dict())
    missing = dict(arrays)
    del missing["resnet/block2/unit01/b/group_norm/gamma"]
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(CheckpointError, match=r"missing\.npz: missing key 'body\.block2\.unit01\.gn2\.weight'"):
        create_model("R14x0.5", num_classes=3, pretrained=tmp_path / "missing.npz")
    np.savez(tmp_path / "extra.npz", **arrays, **{"resnet/block9/unit01/x": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"extra\.npz.*'resnet/block9/unit01/x'"):
        create_model("R14x0.5", num_classes=3, pretrained=tmp_path / "extra.npz")
    with pytest.raises(CheckpointError, match=r"extra\.npz.*unexpected key"):
        create_model("R14x0.5", num_classes=3, pretrained=tmp_path / "extra.npz")
    # a checkpoint of another architecture: every shape is named
    other = checkpoints.save_npz(_randomise(create_model("R50x1", num_classes=3, pretrained=False)),
                                 tmp_path / "r50.npz")
    with pytest.raises(CheckpointError, match=r"r50\.npz: key 'root\.conv\.weight' has shape \(64, 3, 7, 7\)"):
        create_model("R14x0.5", num_classes=3, pretrained=other)


def test_files_are_read_without_pickle(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    import zipfile
    with zipfile.ZipFile(tmp_path / "evil.npz", "w") as zf:
        zf.write(tmp_path / "obj.npy", "resnet/root_block/standardized_conv2d/kernel.npy")
    with pytest.raises(BitlabError, match="evil.npz"):
        create_model("R14x0.5", pretrained=tmp_path / "evil.npz")

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": Payload()}, tmp_path / "evil.pt", pickle_module=pickle)
    with pytest.raises(BitlabError, match="evil.pt"):
        create_model("R14x0.5", pretrained=tmp_path / "evil.pt")


def test_bitlab_file_keeps_ablation_config_and_npz_refuses_it(tmp_path):
    bn = _randomise(create_model("R14x0.5-bn-plain", num_classes=4, pretrained=False))
    bn.train()(torch.randn(4, 3, 32, 32))  # populate running stats
    path = checkpoints.save_bitlab(bn, tmp_path / "bn.pt", name="R14x0.5-bn-plain")
    state, config = checkpoints.read_state_dict(path)
    assert config == bn.config and config.norm == "batch" and config.conv == "plain"
    assert torch.equal(state["body.block1.unit01.gn1.running_mean"], bn.body.block1.unit01.gn1.running_mean)
    with pytest.raises(CheckpointError, match="GN\\+WS"):
        checkpoints.save_npz(bn, tmp_path / "bn.npz")
    with pytest.raises(CheckpointError, match="norm=batch"):
        create_model("R14x0.5", num_classes=4, pretrained=path)
    assert not (tmp_path / "bn.npz").exists()


def test_fine_tuned_file_brings_its_head_size(tmp_path):
    tuned = _randomise(create_model("BiT-M-R50x1", num_classes=37, pretrained=False))
    path = checkpoints.save_bitlab(tuned, tmp_path / "final.pt", name="BiT-M-R50x1")
    model = create_model("BiT-M-R50x1", pretrained=path)  # no num_classes: 37 from the file, not 21843
    assert model.num_classes == 37 and torch.equal(model.head.conv.bias, tuned.head.conv.bias)
    headless = create_model("R14x0.5", num_classes=0, pretrained=False)
    path = checkpoints.save_bitlab(headless, tmp_path / "headless.pt")
    assert create_model("R14x0.5", pretrained=path).num_classes == 1000  # no head in the file: the name's default


# ----------------------------------------------------------------------------- variants, timm names, bad files
@pytest.mark.parametrize("suffix", ["-plain", "-bn", "-bn-plain"])
def test_npz_and_timm_files_refuse_other_norm_or_conv(tmp_path, suffix):
    """npz and timm files carry no config but only ever hold GN+WS weights: raw WS kernels through a
    plain conv (or GN weights in BN) would load and give meaningless outputs."""
    model = _randomise(create_model("R14x0.5", num_classes=3, pretrained=False))
    npz = checkpoints.save_npz(model, tmp_path / "m.npz")
    timm_file = checkpoints.save_timm(model, tmp_path / "m_timm.pth")
    for path in (npz, timm_file):
        with pytest.raises(CheckpointError, match=rf"{path.name}: holds norm=group, conv=std weights, the model is "
                                                  rf"norm={'batch' if '-bn' in suffix else 'group'}"):
            create_model(f"R14x0.5{suffix}", num_classes=3, pretrained=path)
    assert torch.equal(create_model("R14x0.5", pretrained=timm_file).root.conv.weight, model.root.conv.weight)


def test_timm_names_load_npz_and_bitlab_files_with_parity(tmp_path, photos, caplog):
    """`resnetv2_50x1_bit` takes the official npz and bitlab files (timm loads the npz itself too)."""
    from bitlab.train.finetune import build_model

    ours = _randomise(create_model("R50x1", num_classes=5, pretrained=False), seed=4)
    files = [checkpoints.save_npz(ours, tmp_path / "m.npz"), checkpoints.save_bitlab(ours, tmp_path / "m.pt")]
    x = _batch(photos, size=64)
    ref, floor = numerics.exact_and_floor(ours.eval(), x)
    for path in files:
        theirs = create_model("resnetv2_50x1_bit", num_classes=5, pretrained=path).eval()
        for m in theirs.modules():  # timm's BiT uses eps 1e-8; the official value is 1e-10
            if isinstance(m, timm.layers.StdConv2d):
                m.eps = 1e-10
        with torch.no_grad():
            numerics.assert_near_exact(theirs(x), ref, floor, str(path))
    assert ref.std() > 1e-2
    with caplog.at_level("INFO"):  # timm's default 1000-class head: the body loads, the head stays as built
        other = create_model("resnetv2_50x1_bit", pretrained=files[0])
    assert "the file's head has 5 classes: the model's 1000-class head keeps its random initialisation" in caplog.text
    assert torch.equal(other.stem.conv.weight, ours.root.conv.weight)
    tuned = build_model("resnetv2_50x1_bit", 4, str(files[0]))  # `finetune --model resnetv2_50x1_bit --pretrained`
    assert torch.equal(tuned.stages[3].blocks[2].conv3.weight, ours.body.block4.unit03.conv3.weight)
    assert tuned.get_classifier().out_channels == 4 and not tuned.get_classifier().weight.any()
    bn = checkpoints.save_bitlab(create_model("R50x1-bn", num_classes=5, pretrained=False), tmp_path / "bn.pt")
    with pytest.raises(CheckpointError, match=r"bn\.pt: holds norm=batch, conv=std weights, the model is norm=group"):
        create_model("resnetv2_50x1_bit", num_classes=5, pretrained=bn)


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d, m: _truncated(checkpoints.save_npz(m, d / "f.npz")), r"f\.npz: truncated or damaged zip archive"),
    (lambda d, m: _truncated(checkpoints.save_bitlab(m, d / "f.pt")), r"f\.pt: truncated or damaged zip archive"),
    (lambda d, m: (d / "f.bin").write_bytes(bytes(range(101, 201))) and d / "f.bin",
     r"f\.bin: not a checkpoint \(neither an npz archive nor a torch file"),
    (lambda d, m: (d / "f.pt").write_bytes(b"") or d / "f.pt", r"f\.pt: not a checkpoint .*an empty file"),
    (lambda d, m: np.savez(d / "f.npz", **{**checkpoints.state_dict_to_npz(m.state_dict()),
                                          "resnet/group_norm/beta": np.array(["a"] * 1024)}) or d / "f.npz",
     r"f\.npz: key 'resnet/group_norm/beta' has dtype <U1, expected floating-point weights"),
    (lambda d, m: torch.save({"format": "bitlab-model", "config": {"depth": 50}, "state_dict": {}}, d / "f.pt")
     or d / "f.pt", r"f\.pt: key 'config' is not a ResNetV2 config"),
    (lambda d, m: torch.save({"root.conv.weight": 3}, d / "f.pt") or d / "f.pt",
     r"f\.pt: key 'root\.conv\.weight' holds a int, not a tensor"),
])
def test_bad_files_are_named_with_the_key(tmp_path, make, message):
    path = make(tmp_path, create_model("R14x0.5", num_classes=3, pretrained=False))
    with pytest.raises(CheckpointError, match=message):
        create_model("R14x0.5", num_classes=3, pretrained=path)


def test_convert_and_build_model_name_the_file_and_hint_only_on_mismatch(tmp_path):
    from bitlab.train.finetune import build_model

    torch.save({"a": torch.zeros(1)}, tmp_path / "notsd.pt")
    with pytest.raises(CheckpointError, match=r"notsd\.pt: state dict is not a BiT ResNetV2"):
        checkpoints.convert(tmp_path / "notsd.pt", tmp_path / "x.npz")
    with pytest.raises(CheckpointError, match=r"nothing\.npz: no such checkpoint file$"):
        build_model("R14x0.5", 3, str(tmp_path / "nothing.npz"))
    with pytest.raises(CheckpointError,
                       match=r"notsd\.pt: missing key 'root\.conv\.weight'.*another architecture than R14x0\.5"):
        build_model("R14x0.5", 3, str(tmp_path / "notsd.pt"))


def test_a_torch_file_is_loaded_once(tmp_path, monkeypatch):
    path = checkpoints.save_bitlab(create_model("R14x0.5", num_classes=3, pretrained=False), tmp_path / "m.pt")
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    create_model("R14x0.5", pretrained=path)
    assert len(calls) == 1
    assert checkpoints.detect_format(path) == "bitlab" and len(calls) == 2


def test_random_weights_asked_for_are_built_quietly_and_fresh_heads_are_logged(tmp_path, caplog):
    with caplog.at_level("INFO"), torch.device("meta"):
        create_model("BiT-M-R50x1-ILSVRC2012", pretrained=False)  # asked for by name: nothing to say
        create_model("R50x1", pretrained=False)
    assert caplog.records == []
    headless = checkpoints.save_npz(_randomise(create_model("R14x0.5", num_classes=0, pretrained=False)),
                                    tmp_path / "headless.npz")
    for zero_head, init in ((False, "random"), (True, "zero")):
        caplog.clear()
        with caplog.at_level("INFO"):
            create_model("R14x0.5", num_classes=5, pretrained=headless, zero_head=zero_head)
        why = "a new head was asked for (zero_head)" if zero_head else "the file has no head"
        assert f"headless.npz: {why}: the model's 5-class head keeps its {init} initialisation" in caplog.text


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    model = _randomise(create_model("R14x0.5", num_classes=3, pretrained=False))
    arrays = checkpoints.state_dict_to_npz(model.state_dict())
    arrays["resnet/block3/unit01/b/standardized_conv2d/kernel"][0, 0, 0, 0] = bad
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"bad\.npz: key 'resnet/block3/unit01/b/standardized_conv2d/kernel' "
                                              r"has non-finite values"):
        create_model("R14x0.5", num_classes=3, pretrained=tmp_path / "bad.npz")
    with torch.no_grad():
        model.head.conv.bias[1] = bad
    checkpoints.save_bitlab(model, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: key 'head\.conv\.bias' has non-finite values"):
        create_model("R14x0.5", pretrained=tmp_path / "bad.pt")


def test_numbered_standardized_conv2d_keys_are_accepted(tmp_path):
    """Some exported npz files name kernels `standardized_conv2d_N` (big_vision renames them back)."""
    model = _randomise(create_model("R14x0.5", num_classes=3, pretrained=False))
    arrays = checkpoints.state_dict_to_npz(model.state_dict())
    numbered = {k.replace("/standardized_conv2d/", f"/standardized_conv2d_{i}/"): v
                for i, (k, v) in enumerate(arrays.items())}
    assert numbered.keys() != arrays.keys()
    np.savez(tmp_path / "numbered.npz", **numbered)
    loaded = create_model("R14x0.5", pretrained=tmp_path / "numbered.npz")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    root = "resnet/root_block/standardized_conv2d/kernel"
    np.savez(tmp_path / "twice.npz", **arrays, **{root.replace("conv2d/", "conv2d_1/"): arrays[root]})
    with pytest.raises(CheckpointError, match=r"twice\.npz: keys '.*root_block/standardized_conv2d.*/kernel' and "
                                              r"'.*' are the same parameter"):
        create_model("R14x0.5", pretrained=tmp_path / "twice.npz")


def test_bit_variant_asks_the_model_what_it_is():
    """Weights load by what a model says it is (its ResNetV2 config, or timm's GN+WS BiT layout),
    so a subclass of bitlab's ResNetV2 loads files like its parent."""
    from bitlab.models import ResNetV2

    class Tagged(ResNetV2):
        pass

    with torch.device("meta"):
        assert checkpoints.bit_variant(create_model("R14x0.5-bn-plain", pretrained=False)) == ("batch", "plain")
        assert checkpoints.bit_variant(Tagged(create_model("R14x0.5", pretrained=False).config)) == ("group", "std")
        assert checkpoints.bit_variant(timm.create_model("resnetv2_50x1_bit")) == ("group", "std")
        assert checkpoints.bit_variant(timm.create_model("resnetv2_50")) is None  # pre-act, but BatchNorm
        assert checkpoints.bit_variant(timm.create_model("resnet18")) is None


# ----------------------------------------------------------------------------- hostile files through the CLI
def _convert_cli(src, dst, capsys) -> str:
    from bitlab.cli import main

    assert main(["convert", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not dst.exists()
    return err


def test_a_pickled_checkpoint_is_explained_without_inviting_unsafe_loading(tmp_path, capsys):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole model, pickled
    err = _convert_cli(tmp_path / "module.pt", tmp_path / "out.pt", capsys)
    assert f"{tmp_path / 'module.pt'}: a torch file holding pickled Python objects besides tensors " \
           "(torch.nn.modules.linear.Linear)" in err
    assert "torch.save(model.state_dict(), 'weights.pt')" in err and "can run arbitrary code" in err
    assert "weights_only" not in err and "add_safe_globals" not in err
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump({"root": np.zeros(3)}, f)
    err = _convert_cli(tmp_path / "raw.pkl", tmp_path / "out.pt", capsys)
    assert f"{tmp_path / 'raw.pkl'}: not a checkpoint (neither an npz archive nor a torch file; a bare Python pickle" in err
    assert "weights_only" not in err


def _npz_with(tmp_path, name, **replace) -> "Path":
    arrays = checkpoints.state_dict_to_npz(create_model("R14x0.5", num_classes=3, pretrained=False).state_dict())
    np.savez(tmp_path / name, **{**arrays, **replace})
    return tmp_path / name


def _npy_member(header: dict, data: bytes) -> bytes:
    import io as pyio

    buf = pyio.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def test_npz_headers_are_checked_before_anything_is_allocated(tmp_path, capsys):
    import zipfile

    root = "resnet/root_block/standardized_conv2d/kernel"
    bad = _npz_with(tmp_path, "five.npz", **{root: np.zeros((7, 7, 3, 5), np.float32)})
    err = _convert_cli(bad, tmp_path / "out.pt", capsys)
    assert f"{bad}: key '{root}' has shape (7, 7, 3, 5); a BiT root kernel is (7, 7, 3, 64 x width)" in err
    # a member that declares 10 PiB of float32 in 64 bytes
    huge = tmp_path / "huge.npz"
    with zipfile.ZipFile(_npz_with(tmp_path, "huge.npz")) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members[f"{root}.npy"] = _npy_member({"descr": "<f4", "fortran_order": False, "shape": (1 << 48, 10)}, bytes(64))
    with zipfile.ZipFile(huge, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    err = _convert_cli(huge, tmp_path / "out.pt", capsys)
    assert f"{huge}: key '{root}' declares shape (281474976710656, 10) of float32 (11258999068426240 bytes), " \
           "but holds 64 bytes of data" in err
    # a unit number that would build ten million units
    many = _npz_with(tmp_path, "many.npz", **{"resnet/block1/unit9999999/a/group_norm/gamma": np.ones(32, np.float32)})
    assert f"{many}: block1 has unit9999999 but no unit02" in _convert_cli(many, tmp_path / "out.pt", capsys)
    # and the same checks guard --pretrained
    with pytest.raises(CheckpointError, match=r"five\.npz: key 'resnet/root_block/standardized_conv2d/kernel' has"):
        create_model("R14x0.5", num_classes=3, pretrained=bad)


@pytest.mark.parametrize("change, message", [
    ({"width_factor": 1e6}, "the config (block_units [1, 1, 1, 1], 64000000 root channels, 3 classes) does not "
                            "describe the saved weights (block_units [1, 1, 1, 1], 32 root channels, 3 classes)"),
    ({"width_factor": "abc"}, "width_factor must be a positive number with 64 x width_factor whole, got 'abc'"),
    ({"width_factor": 0.3}, "width_factor must be a positive number with 64 x width_factor whole, got 0.3"),
    ({"width_factor": 0.25}, "width_factor 0.25 gives 16 root channels, not a multiple of GroupNorm's 32 groups"),
    ({"block_units": "abc"}, "block_units must be positive whole numbers, got ['a', 'b', 'c']"),
    ({"block_units": [1, 0, 1, 1]}, "block_units must be positive whole numbers, got [1, 0, 1, 1]"),
    ({"num_classes": -3}, "num_classes must be a whole number >= 0, got -3"),
    ({"num_classes": 2.5}, "num_classes must be a whole number >= 0, got 2.5"),
    ({"norm": "layer"}, "norm/conv must be group|batch / std|plain, got 'layer' / 'std'"),
])
def test_a_bitlab_files_config_is_checked_before_a_model_is_built(tmp_path, capsys, change, message):
    model = create_model("R14x0.5", num_classes=3, pretrained=False)
    config = {**model.config.to_dict(), **change}
    torch.save({"format": "bitlab-model", "version": 1, "config": config, "state_dict": model.state_dict()},
               tmp_path / "m.pt")
    err = _convert_cli(tmp_path / "m.pt", tmp_path / "out.npz", capsys)
    assert f"{tmp_path / 'm.pt'}: key 'config': {message}" in err


def test_bitlab_files_carry_a_record_that_reads_without_the_weights(tmp_path):
    """`save_bitlab(..., record=)`: what a run knows about its model (classes in head order, ...) comes
    back from `read_record`, for ResNetV2 and for timm models (whose config is their name); npz and
    bare state dicts have none; a record of the wrong shape is an error naming the key."""
    record = {"classes": ["n02123045", "cat"], "pretraining_data": "ImageNet-21k"}
    bit = checkpoints.save_bitlab(create_model("R14x0.5", num_classes=2, pretrained=False), tmp_path / "bit.pt",
                                  name="R14x0.5", record=record)
    assert checkpoints.read_record(bit) == {"name": "R14x0.5", **record}
    torch.manual_seed(0)
    timm_model = create_model("test_resnet", num_classes=2, pretrained=False)
    path = checkpoints.save_bitlab(timm_model, tmp_path / "timm.pt", name="test_resnet", record=record)
    assert checkpoints.read_record(path) == {"name": "test_resnet", **record}
    again = create_model("test_resnet", num_classes=2, pretrained=path)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), timm_model.state_dict().values()))
    assert checkpoints.read_record(checkpoints.save_npz(create_model("R14x0.5", pretrained=False),
                                                        tmp_path / "m.npz")) == {}
    torch.save(timm_model.state_dict(), tmp_path / "bare.pt")
    torch.save(timm_model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert checkpoints.read_record(tmp_path / "bare.pt") == checkpoints.read_record(tmp_path / "legacy.pt") == {}
    bad = checkpoints.save_bitlab(timm_model, tmp_path / "bad.pt", name="test_resnet", record={"classes": "cat"})
    with pytest.raises(checkpoints.CheckpointError, match=r"bad\.pt: key 'classes' is not a list of class names"):
        checkpoints.read_record(bad)


@pytest.mark.parametrize("dst", ["m.pt", "m.npz", "m.pth"])
def test_convert_onto_a_full_disk_names_the_file(tmp_path, small_disk, capsys, dst):
    """A real 4 MiB tmpfs, a 12 MB model: `bitlab convert` says which file and that the disk is full
    (torch's own words were '[enforce fail at inline_container.cc] unexpected pos'), leaving nothing."""
    from bitlab.cli import main

    src = checkpoints.save_npz(create_model("R14x0.5", pretrained=False), tmp_path / "r14.npz")
    disk = small_disk("4M")
    args = ["convert", str(src), str(disk / dst)] + (["--to", "timm"] if dst.endswith(".pth") else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"bitlab convert: error: {disk / dst}: cannot write this file, the disk is full (errno ENOSPC" in err
    assert "inline_container" not in err and "Traceback" not in err
    assert list(disk.iterdir()) == []
