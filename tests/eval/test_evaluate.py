"""`bitlab evaluate` end to end with the real offline ImageNet model on a tiny OOC set from real photos;
resume keyed by the images' content, one writer per results folder (real processes)."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

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
from bitlab.eval.results import load_results
from bitlab.models import create_model, save_bitlab, zoo
from tests.fixtures.processes import ENV


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
    cfg = EvaluateConfig(model="R14x0.5", random_init=True, num_classes=4, data=str(tiny_ooc), out=str(tmp_path / "r"),
                         image_size=64)
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


@pytest.mark.parametrize("model, pretrained, random_init, expected", [
    (zoo.OFFLINE_IMAGENET_MODEL, None, False, "ILSVRC-2012"),
    ("BiT-M-R50x1-ILSVRC2012", "w.npz", False, "ImageNet-21k"),
    ("BiT-S-R50x1", "w.npz", False, "ILSVRC-2012"),
    ("BiT-M-R50x1", None, False, "ImageNet-21k"),  # its own weights, fetched into the cache
    ("resnet50", None, False, "ILSVRC-2012"),  # timm's default tag, a1_in1k
    ("vit_base_patch16_224.augreg2_in21k_ft_in1k", None, False, "ImageNet-21k"),  # the first data a tag names
    ("BiT-M-R50x1", None, True, "none (random weights)"),
    ("resnet50", None, True, "none (random weights)"),
    ("R50x1", "w.npz", False, "unknown"),
])
def test_pretraining_data_for_the_legend(model, pretrained, random_init, expected):
    cfg = EvaluateConfig(model=model, data="d", out="o", pretrained=pretrained, random_init=random_init)
    assert ev_mod.pretraining_data(cfg) == expected
    cfg.pretraining_data = "JFT-300M"
    assert ev_mod.pretraining_data(cfg) == "JFT-300M"


def test_cli_evaluate_prints_scores_and_errors_name_the_culprit(tiny_ooc, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["evaluate", "--model", "R14x0.5", "--random-init", "--image-size", "64", "--data", str(tiny_ooc),
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
    cfg = create_model("resnet18", pretrained=False).data_config
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
    summary = evaluate(EvaluateConfig(model="R14x0.5", random_init=True, image_size=32, data=tiny_ooc.name,
                                      out=str(tmp_path)))
    assert summary["dataset"]["path"] == str(tiny_ooc.resolve())
    assert json.loads((tmp_path / "summary.json").read_text())["dataset"]["path"] == str(tiny_ooc.resolve())


def test_offline_a_timm_name_without_cached_weights_exits_2_saying_how_to_go_on(tiny_ooc, tmp_path, capsys):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # the suite runs offline, with an empty hub cache (tests/conftest.py)
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", "resnet18.a1_in1k", "--data", str(tiny_ooc), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for part in ("bitlab evaluate: error: resnet18.a1_in1k: its pretrained weights are not in the cache and cannot be "
                 "fetched: offline (HF_HUB_OFFLINE is set)", "the Hugging Face hub as timm/resnet18.a1_in1k",
                 f"cached in {constants.HF_HUB_CACHE}", "`bitlab weights download resnet18.a1_in1k`",
                 "--pretrained FILE", "--random-init"):
        assert part in err, part
    assert not out.exists()


def test_random_init_runs_and_every_output_says_random(tiny_ooc, tmp_path, capsys):
    """`--random-init`: the terminal, summary.json, the results table and the figures all say so."""
    from bitlab import report
    from bitlab.eval.results import load_results

    out = tmp_path / "ev"
    args = ["evaluate", "--model", "resnet18.a1_in1k", "--random-init", "--image-size", "64", "--data", str(tiny_ooc)]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"resnet18.a1_in1k (random weights) on {tiny_ooc}")
    assert "random weights (--random-init): these scores are chance, not a trained model's" in printed
    model = json.loads((out / "summary.json").read_text())["model"]
    assert (model["label"], model["random_init"], model["pretraining_data"]) == (
        "resnet18.a1_in1k (random weights)", True, "none (random weights)")
    assert model["weights"] == "random (--random-init, seed 0)"
    r = load_results(out)
    assert report.results_table([r]).loc[0, "pre-training"] == "none (random weights)"
    assert report.fig_backgrounds(r).axes[0].get_title().startswith("resnet18.a1_in1k (random weights): top-1")
    # seed 0: a rerun draws the same random weights, so its numbers (and resumed chunks) agree
    assert main([*args, "--out", str(tmp_path / "again")]) == 0
    again = pd.read_csv(tmp_path / "again" / "predictions.csv")
    pd.testing.assert_frame_equal(pd.read_csv(out / "predictions.csv"), again)


def test_an_architecture_name_needs_a_file_or_random_init(tiny_ooc, tmp_path, capsys):
    assert main(["evaluate", "--model", "R14x0.5", "--data", str(tiny_ooc), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "R14x0.5 names an architecture, and no weights were released for it" in err and "--random-init" in err
    assert main(["evaluate", "--model", "R14x0.5", "--random-init", "--pretrained", "w.npz", "--data", str(tiny_ooc),
                 "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "--random-init asks for random weights, but --pretrained w.npz gives a weights file" in err
    assert not (tmp_path / "ev").exists()


def test_an_image_replaced_under_its_name_is_predicted_again(tiny_ooc, tmp_path, monkeypatch):
    """A saved chunk is reused only for the same images: one replaced under its name (other pixels,
    same file name) is predicted again, and only its chunk."""
    data = tmp_path / "data"
    shutil.copytree(tiny_ooc, data)
    monkeypatch.setattr(multi, "CHUNK", 4)
    torch.manual_seed(0)
    weights = save_bitlab(create_model("R14x0.5", pretrained=False), tmp_path / "r14.pt", name="R14x0.5")
    cfg = EvaluateConfig(model="R14x0.5", pretrained=str(weights), image_size=32, data=str(data),
                         out=str(tmp_path / "r"), workers=0, progress=False)
    victim = data / "missile" / "rocket__brick.png"  # row 10: in the third chunk
    good = victim.read_bytes()
    victim.write_bytes(b"not an image")
    with pytest.raises(BitlabError, match="rocket__brick.png: cannot decode"):
        evaluate(cfg)  # chunks 1 and 2 are saved
    changed = data / "cat" / "chelsea__grass.png"  # row 2, in the first chunk: now other pixels
    changed.write_bytes((data / "espresso" / "coffee__gravel.png").read_bytes())
    victim.write_bytes(good)
    seen = []
    real = predict.iter_probs_many

    def spy(models, paths, **kw):
        seen.append([Path(p).name for p in paths])
        return real(models, paths, **kw)

    monkeypatch.setattr(predict, "iter_probs_many", spy)
    evaluate(cfg)
    assert [names[0] for names in seen] == ["chelsea__in-context.png", "rocket__in-context.png"]  # chunks 1, 3 again
    fresh = dataclasses.replace(cfg, out=str(tmp_path / "fresh"))
    evaluate(fresh)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "r" / "predictions.csv"),
                                  pd.read_csv(tmp_path / "fresh" / "predictions.csv"))


# ----------------------------------------------------------------------------- one writer per folder
@pytest.fixture(scope="module")
def big_ooc(tiny_ooc, tmp_path_factory) -> Path:
    """300 images (the tiny set's, hard-linked 25 times): a run long enough (~10 s of CPU at 64 px)
    for a second process to meet it."""
    root = tmp_path_factory.mktemp("big") / "big_ooc"
    with open(tiny_ooc / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for i in range(25):
        for r in rows:
            src = Path(r["file"])
            dst = src.parent / f"{src.stem}_{i}{src.suffix}"
            (root / dst.parent).mkdir(parents=True, exist_ok=True)
            os.link(tiny_ooc / src, root / dst)
            out.append({**r, "file": dst.as_posix(), "fg_uid": f"{r['fg_uid']}_{i}"})
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0]))
        w.writeheader()
        w.writerows(out)
    return root


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> list[Path]:
    """Two fixed R14x0.5 weight files (a model given without weights would differ per process)."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    return [save_bitlab(create_model("R14x0.5", pretrained=False), folder / f"r14_{i}.pt", name="R14x0.5") for i in range(2)]


def _evaluate_cmd(data: Path, out: Path, weights: Path) -> list[str]:
    return [sys.executable, "-m", "bitlab", "evaluate", "--model", "R14x0.5", "--pretrained", str(weights),
            "--image-size", "64", "--data", str(data), "--out", str(out), "--workers", "0", "--no-progress"]


def test_two_evaluates_started_together_into_one_folder(big_ooc, weight_files, tmp_path):
    """Exactly one runs; the other exits 2 naming the first one's pid, without a traceback."""
    out = tmp_path / "r"
    procs = [subprocess.Popen(_evaluate_cmd(big_ooc, out, w), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for w in weight_files]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 2], errs
    (winner, _), (loser, err) = sorted(zip(procs, errs), key=lambda x: x[0].returncode)
    assert f"bitlab evaluate: error: {out} is in use by pid {winner.pid} on " in err and "Traceback" not in err
    r = load_results(out)  # the winner's, whole
    assert r.config["pretrained"] == r.summary["model"]["pretrained"] == str(weight_files[procs.index(winner)])
    assert len(r.predictions) == 300 and not (out / ".lock").exists()


def test_killed_while_re_evaluating_with_other_weights_readers_refuse_until_rerun(big_ooc, weight_files, tmp_path,
                                                                                   capsys):
    """A finished folder re-evaluated with other weights and SIGKILLed midway: config.json already
    names the new weights, so the old summary and predictions must be gone; report refuses the
    folder until a rerun finishes it."""
    out = tmp_path / "r"
    first, second = weight_files
    evaluate(EvaluateConfig(model="R14x0.5", pretrained=str(first), image_size=64, data=str(big_ooc), out=str(out),
                            workers=0, progress=False))
    proc = subprocess.Popen(_evaluate_cmd(big_ooc, out, second), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads((out / "config.json").read_text())["pretrained"] == str(second):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "the second evaluate finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(BitlabError, match="summary.json: missing results file"):
        load_results(out)
    assert main(["report", str(out), "--out", str(tmp_path / "figures")]) == 2
    assert "summary.json: missing results file" in capsys.readouterr().err
    assert not (tmp_path / "figures").exists()
    evaluate(EvaluateConfig(model="R14x0.5", pretrained=str(second), image_size=64, data=str(big_ooc), out=str(out),
                            workers=0, progress=False))
    r = load_results(out)
    assert r.config["pretrained"] == r.summary["model"]["pretrained"] == str(second)


def test_a_full_disk_names_the_file_and_a_rerun_finishes(tiny_ooc, weight_files, tmp_path, small_disk, capsys):
    """On a real tmpfs filled but for 8 KiB, evaluate stops naming the file it could not write and the
    full disk, leaves no temp file and no folder a reader accepts; with space freed, a rerun finishes."""
    disk = small_disk("1M")
    filler = disk / "filler"
    filler.write_bytes(bytes((1 << 20) - (8 << 10)))
    out = disk / "r"
    args = ["evaluate", "--model", "R14x0.5", "--pretrained", str(weight_files[0]), "--image-size", "32",
            "--data", str(tiny_ooc), "--out", str(out), "--workers", "0", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {out}/" in err and ": cannot write this file, the disk is full (errno ENOSPC" in err
    assert "Traceback" not in err and not list(out.rglob(".*.tmp"))
    with pytest.raises(BitlabError):
        load_results(out)
    filler.unlink()
    assert main(args) == 0
    assert len(load_results(out).predictions) == 12
