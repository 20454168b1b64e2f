"""`bitlab evaluate` end to end with the real offline ImageNet model on a tiny OOC set from real photos."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from bitlab.cli import main
from bitlab.data.transforms import decode_image, eval_image, normalize, to_chw_tensor
from bitlab.errors import BitlabError
from tests.fixtures import numerics
from bitlab.eval import evaluate as ev_mod
from bitlab.eval import multi, predict
from bitlab.eval.evaluate import EvaluateConfig, evaluate
from bitlab.models import create_model, zoo


@pytest.fixture(scope="module")
def offline_results(tiny_ooc, tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "offline"
    summary = evaluate(EvaluateConfig(model=zoo.OFFLINE_IMAGENET_MODEL, data=str(tiny_ooc), out=str(out), batch_size=5))
    return out, summary


def test_real_model_is_right_in_context_and_matches_a_direct_forward_pass(tiny_ooc, offline_results):
    out, summary = offline_results
    df = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert len(df) == 12 and summary["n"] == 12
    in_context = df[df["background"] == "in-context"]
    assert len(in_context) == 3 and in_context["top1_correct"].all()
    # Every row's top-5 is what the model gives each image alone, without the DataLoader: the same
    # classes and probabilities within float32's measured floor (float64 gives the exact answer).
    model = create_model(zoo.OFFLINE_IMAGENET_MODEL).eval()
    cfg = model.data_config
    x = torch.cat([normalize(to_chw_tensor(eval_image(decode_image(tiny_ooc / f), cfg))[None], cfg.mean, cfg.std)
                   for f in df["image"]])
    exact, floor = numerics.exact_and_floor(model, x, post=lambda t: t.softmax(-1))
    numerics.assert_topk_near_exact(df[[f"top{j}_id" for j in range(1, 6)]].to_numpy(),
                                    df[[f"top{j}_prob" for j in range(1, 6)]].to_numpy(), exact, floor)
    for i, row in df.iterrows():
        targets = [int(t) for t in row["targets"].split(";")]
        assert abs(row["target_prob"] - exact[i, targets].sum().item()) <= numerics.MARGIN * floor * len(targets)
        assert row["top1_correct"] == (row["top1_id"] in targets)


def test_summary_and_config_agree_with_predictions(offline_results):
    out, summary = offline_results
    df = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["top1"] == pytest.approx(df["top1_correct"].mean()) == pytest.approx(summary["top1"])
    assert on_disk["model"]["pretraining_data"] == "ILSVRC-2012" and on_disk["model"]["num_outputs"] == 1000
    assert on_disk["dataset"]["role"] == "ooc" and on_disk["per_background"]["in-context"]["top1"] == 1.0
    assert on_disk["in_context"]["n"] == 3 and on_disk["out_of_context"]["n"] == 9
    ooc = df[df["background"] != "in-context"]
    assert on_disk["out_of_context"]["top1"] == pytest.approx(ooc["top1_correct"].mean())
    assert "in-context" not in [b["background"] for b in on_disk["most_fooling_backgrounds"]]
    assert json.loads((out / "config.json").read_text())["model"] == zoo.OFFLINE_IMAGENET_MODEL
    assert not (out / ".partial").exists()


def test_interrupted_run_resumes_from_saved_chunks(tiny_ooc, tmp_path, monkeypatch, offline_results):
    data = tmp_path / "data"
    shutil.copytree(tiny_ooc, data)
    monkeypatch.setattr(multi, "CHUNK", 4)
    victim = data / "missile" / "rocket__brick.png"  # row 10: in the third chunk
    good = victim.read_bytes()
    victim.write_bytes(b"not an image")
    cfg = EvaluateConfig(model=zoo.OFFLINE_IMAGENET_MODEL, data=str(data), out=str(tmp_path / "r"))
    with pytest.raises(BitlabError, match="rocket__brick.png: cannot decode"):
        evaluate(cfg)
    assert len(list((tmp_path / "r" / ".partial").glob("*.npz"))) == 2
    assert not (tmp_path / "r" / "predictions.csv").exists()

    victim.write_bytes(good)
    seen = []
    real = predict.iter_probs_many
    def spy(models, paths, **kw):
        seen.append(len(paths))
        return real(models, paths, **kw)

    monkeypatch.setattr(predict, "iter_probs_many", spy)
    evaluate(cfg)
    assert seen == [4]  # only the chunk that failed ran again
    resumed = pd.read_csv(tmp_path / "r" / "predictions.csv", keep_default_na=False)
    fresh = pd.read_csv(offline_results[0] / "predictions.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(resumed, fresh, check_exact=False, rtol=1e-5)


def test_head_must_be_1000_way_unless_a_label_map_is_given(tiny_ooc, tmp_path):
    torch.manual_seed(0)
    cfg = EvaluateConfig(model="R14x0.5", num_classes=4, data=str(tiny_ooc), out=str(tmp_path / "r"), image_size=64)
    with pytest.raises(BitlabError, match=r"R14x0.5 has a 4-way head.*--label-map"):
        evaluate(cfg)
    assert not (tmp_path / "r").exists()
    # outputs 0..3 -> tabby, espresso, missile, nothing
    (tmp_path / "map.txt").write_text("n02123045\n967\nn03773504\n-\n")
    cfg.label_map = str(tmp_path / "map.txt")
    summary = evaluate(cfg)
    df = pd.read_csv(tmp_path / "r" / "predictions.csv", keep_default_na=False)
    assert set(df[[f"top{j}_id" for j in range(1, 5)]].to_numpy().ravel()) == {281, 967, 657, -1}
    assert "top5_id" not in df and summary["model"]["num_outputs"] == 4
    (tmp_path / "map.txt").write_text("n02123045\n967\n")
    with pytest.raises(BitlabError, match="label map has 2 entries, but R14x0.5 has 4 outputs"):
        evaluate(cfg)


@pytest.mark.parametrize("model, pretrained, expected", [
    (zoo.OFFLINE_IMAGENET_MODEL, None, "ILSVRC-2012"),
    ("BiT-M-R50x1-ILSVRC2012", "w.npz", "ImageNet-21k"),
    ("BiT-S-R50x1", "w.npz", "ILSVRC-2012"),
    ("BiT-M-R50x1", None, "none (random weights)"),
    ("resnet50", None, "none (random weights)"),
    ("R50x1", "w.npz", "unknown"),
])
def test_pretraining_data_for_the_legend(model, pretrained, expected):
    cfg = EvaluateConfig(model=model, data="d", out="o", pretrained=pretrained)
    assert ev_mod.pretraining_data(cfg) == expected
    cfg.pretraining_data = "JFT-300M"
    assert ev_mod.pretraining_data(cfg) == "JFT-300M"


def test_cli_evaluate_prints_scores_and_errors_name_the_culprit(tiny_ooc, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["evaluate", "--model", "R14x0.5", "--image-size", "64", "--data", str(tiny_ooc),
                 "--out", str(out), "--label", "tiny random"]) == 0
    printed = capsys.readouterr().out
    assert "tiny random on" in printed and "top-1" in printed
    assert "most fooling backgrounds: no background is separated from the rest by its 95% interval" in printed
    assert "objects fooled by at least one background: 3 of 3" in printed  # random weights: all wrong
    assert json.loads((out / "summary.json").read_text())["model"]["pretraining_data"] == "none (random weights)"
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--model", "R14x0.5", "--data", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "empty dataset" in capsys.readouterr().err


def test_any_timm_model_with_its_own_preprocessing(tiny_ooc, tmp_path):
    """A plain timm name (not in bitlab's registry) with a timm state dict: its ImageNet mean/std,
    1000-way head; predictions equal a direct forward pass of the timm model."""
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False).eval()
    torch.save(ref.state_dict(), tmp_path / "resnet18.pt")
    out = tmp_path / "r"
    summary = evaluate(EvaluateConfig(model="resnet18", pretrained=str(tmp_path / "resnet18.pt"), data=str(tiny_ooc),
                                      out=str(out), image_size=96))
    assert summary["n"] == 12 and summary["model"]["num_outputs"] == 1000
    cfg = create_model("resnet18").data_config
    assert cfg.mean == pytest.approx((0.485, 0.456, 0.406)) and cfg.std == pytest.approx((0.229, 0.224, 0.225))
    df = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    cfg = dataclasses.replace(cfg, input_size=96)
    for _, row in df.iloc[::4].iterrows():
        x = normalize(to_chw_tensor(eval_image(decode_image(tiny_ooc / row["image"]), cfg))[None], cfg.mean, cfg.std)
        with torch.inference_mode():
            top = ref(x).softmax(-1)[0].topk(5)
        assert [row[f"top{j}_id"] for j in range(1, 6)] == top.indices.tolist(), row["image"]


def test_summary_stores_the_data_folder_absolute(tiny_ooc, tmp_path, monkeypatch):
    """A relative --data is stored resolved: figures drawn from another directory find the images."""
    monkeypatch.chdir(tiny_ooc.parent)
    summary = evaluate(EvaluateConfig(model="R14x0.5", image_size=32, data=tiny_ooc.name, out=str(tmp_path)))
    assert summary["dataset"]["path"] == str(tiny_ooc.resolve())
    assert json.loads((tmp_path / "summary.json").read_text())["dataset"]["path"] == str(tiny_ooc.resolve())
