"""`bitlab export`: the exported file, run by onnxruntime or TorchScript, computes the model it came
from (weights file included) within float32 rounding measured against float64; outputs are
atomic and never replaced without --force."""
import json

import onnx
import onnxruntime
import pytest
import torch

from bitlab.cli import main
from bitlab.models import checkpoints, create_model
from tests.fixtures import numerics

SIZE = 64


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A bitlab file of R14x0.5 with random weights everywhere (GN affine and a 7-way head too)."""
    g = torch.Generator().manual_seed(0)
    model = create_model("R14x0.5", num_classes=7, pretrained=False)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if p.ndim == 1 else 0.05 * torch.randn(p.shape, generator=g))
    return checkpoints.save_bitlab(model, tmp_path_factory.mktemp("weights") / "r14.pt", name="R14x0.5")


def _reference(weights):
    """The model as bitlab runs it from the file, its float64 answer on a batch and the float32 floor."""
    model = create_model("R14x0.5", pretrained=weights, image_size=SIZE).eval()
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))  # batch 3: not the traced 2
    exact, floor = numerics.exact_and_floor(model, x)
    return x, exact, floor


def test_onnx_export_runs_in_onnxruntime_with_bitlabs_logits(weights, tmp_path, capsys):
    out = tmp_path / "deploy" / "r14.onnx"  # a folder that does not exist yet
    assert main(["export", "R14x0.5", "--pretrained", str(weights), "--image-size", str(SIZE), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["r14.onnx"]  # no temp files left
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x, exact, floor = _reference(weights)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})  # default optimisations on
    numerics.assert_near_exact(torch.from_numpy(got), exact, floor, "onnxruntime")
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["bitlab.model"] == "R14x0.5"
    assert json.loads(meta["bitlab.data_config"]) == {"input_size": SIZE, "mean": [0.5] * 3, "std": [0.5] * 3,
                                                      "interpolation": "bilinear", "crop_pct": 1.0,
                                                      "crop_mode": "squash"}
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "Conv" in ops and not ops & {"LayerNormalization", "BatchNormalization"}  # WS folded, not computed
    # No Pad for onnxruntime to fold into the root's MaxPool (which pads with -inf): with one,
    # the logits above differed by 5e-3 under onnxruntime's default optimisations.
    assert "Pad" not in ops and "MaxPool" in ops


def test_torchscript_export_loads_with_torch_jit(weights, tmp_path):
    out = tmp_path / "r14.pt"
    assert main(["export", "R14x0.5", "--pretrained", str(weights), "--image-size", str(SIZE), "--out", str(out),
                 "--format", "torchscript"]) == 0
    extra = {"bitlab.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    x, exact, floor = _reference(weights)
    with torch.no_grad():
        numerics.assert_near_exact(loaded(x), exact, floor, "TorchScript")
    assert json.loads(extra["bitlab.json"])["bitlab.model"] == "R14x0.5"
    # --force replaces the file (atomically: a new inode renamed over the old name)
    before = out.stat().st_ino
    assert main(["export", "R14x0.5", "--pretrained", str(weights), "--image-size", str(SIZE), "--out", str(out),
                 "--format", "torchscript", "--force"]) == 0
    assert out.stat().st_ino != before and sorted(p.name for p in tmp_path.iterdir()) == ["r14.pt"]


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_an_existing_file_is_kept_without_force(tmp_path, capsys):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"keep me")
    assert main(["export", "R14x0.5", "--out", str(out)]) == 2
    assert f"bitlab export: error: --out {out}: exists (pass --force to replace it)" in _err(capsys)
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("argv, message", [
    (["--out", "{tmp}/model.bin"], "--out {tmp}/model.bin: say which format with --format (onnx or torchscript"),
    (["--out", "{tmp}"], "--out {tmp}: is a folder; give a file name"),
    (["--out", "{tmp}/m.onnx", "--image-size", "0"], "--image-size must be at least 1, got 0"),
    (["--out", "{tmp}/m.onnx", "--pretrained", "{tmp}/missing.npz"], "{tmp}/missing.npz"),
])
def test_bad_arguments_are_clean_errors_and_write_nothing(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(["export", "R14x0.5", *argv]) == 2
    assert f"bitlab export: error: {message.format(tmp=tmp_path)}" in _err(capsys)
    assert list(tmp_path.iterdir()) == []
