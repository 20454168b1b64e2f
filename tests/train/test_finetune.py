"""`bitlab finetune` / `fewshot` end to end on real handwritten digits with the tiny BiT model."""
import csv
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bitlab.cli import main
from bitlab.data.datasets import load_splits
from bitlab.data.loader import EvalFiles
from bitlab.data.transforms import square_eval_image
from bitlab.errors import BitlabError
from bitlab.models import create_model, read_state_dict
from bitlab.models.checkpoints import CheckpointError
from bitlab.train.finetune import (FewShotConfig, FinetuneConfig, build_model, fewshot, finetune, load_data,
                                   read_fewshot)
from tests.fixtures.processes import ENV

TINY = dict(model="R14x0.5", random_init=True, batch_size=8, resolution=[18, 16], workers=0, progress=False,
            base_lr=0.05)


def cfg(data, out, **kw) -> FinetuneConfig:
    return FinetuneConfig(**{**TINY, "data": str(data), "out": str(out), "schedule": [1, 2, 3, 4, 6], **kw})


def weights(run_dir: Path) -> dict:
    return read_state_dict(run_dir / "final.pt")[0]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_tiny_bit_learns_real_digits(digits_root, tmp_path):
    """R14x0.5 from random init (no BiT weights exist offline) on 1,437 real digits: far above chance."""
    result = finetune(FinetuneConfig(model="R14x0.5", random_init=True, data=str(digits_root), out=str(tmp_path),
                                     batch_size=32,
                                     schedule=[6, 30, 42, 54, 60], base_lr=0.01, resolution=[18, 16], flip=False,
                                     eval_every=30, workers=1, progress=False, checkpoint_every=0))
    assert result.completed and result.step == 60
    assert result.metrics["top1"] > 0.5, result.metrics  # chance is 0.1
    assert result.metrics["n"] == 360 and result.metrics["top5"] >= result.metrics["top1"]
    for name in ("config.json", "plan.json", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "final.pt", "log.txt",
                 "summary.json"):
        assert (tmp_path / name).is_file(), name
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["step"] for r in rows if r["split"] == "val"] == ["30", "60"]
    assert json.loads((tmp_path / "config.json").read_text())["model"] == "R14x0.5"
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["hyperrule"]["resize"] == 160 and plan["image_size"] == [8, 8]  # the rule's own choice, overridden
    # final.pt is a bitlab model file: create_model loads it and reproduces the reported top-1
    model = create_model("R14x0.5", num_classes=10, pretrained=tmp_path / "final.pt").eval()
    val = load_splits(digits_root).val
    data = EvalFiles(val, functools.partial(square_eval_image, crop=16), decode_side=16)
    x = torch.stack([data[i][0] for i in range(len(val))]).float() / 127.5 - 1
    with torch.no_grad():
        top1 = (model(x).argmax(1).numpy() == val.labels).mean()
    assert abs(top1 - result.metrics["top1"]) < 1e-6


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().double() for k, v in sorted(state.items())])


def test_batch_split_equals_one_batch_with_mixup(tiny_digits, tmp_path):
    one = finetune(cfg(tiny_digits, tmp_path / "one", mixup=0.2))
    four = finetune(cfg(tiny_digits, tmp_path / "four", mixup=0.2, batch_split=4))
    finetune(cfg(tiny_digits, tmp_path / "other", mixup=0.2, seed=1))
    assert one.completed and four.completed
    torch.manual_seed(0)  # finetune's own initialisation for seed 0
    start = _flat(build_model("R14x0.5", 10, False).state_dict())
    w1, w4, w_other = (_flat(weights(tmp_path / d)) for d in ("one", "four", "other"))
    update = (w1 - start).norm()
    # The 4 micro-batches apply the same update as the one batch, up to float rounding (conv kernels
    # for batch 2 and 8 sum in different orders); another seed (init, data, MixUp) differs at order 1.
    assert (w4 - w1).norm() / update < 5e-3, ((w4 - w1).norm() / update).item()  # measured 2.4e-4
    assert (w_other - w1).norm() / update > 0.1
    assert one.metrics["top1"] == four.metrics["top1"]


def test_stop_and_resume_equal_uninterrupted(tiny_digits, tmp_path):
    finetune(cfg(tiny_digits, tmp_path / "full", mixup=0.2))
    stopped = finetune(cfg(tiny_digits, tmp_path / "part", mixup=0.2, stop_after=2))
    assert not stopped.completed and stopped.step == 2 and not (tmp_path / "part" / "final.pt").exists()
    resumed = finetune(cfg(tiny_digits, tmp_path / "part", mixup=0.2, resume=True))
    assert resumed.completed and resumed.step == 6
    assert_same(weights(tmp_path / "full"), weights(tmp_path / "part"))


def test_sigterm_then_resume_gives_the_same_weights(tiny_digits, tmp_path):
    """A real `bitlab finetune` process (2 loader workers) killed with SIGTERM mid-run, then resumed."""
    args = ["finetune", "--model", "R14x0.5", "--random-init", "--data", str(tiny_digits), "--batch-size", "8",
            "--resolution", "18", "16", "--schedule", "2", "10", "20", "25", "30", "--base-lr", "0.05", "--workers", "2",
            "--no-progress", "--log-every", "1", "--checkpoint-every", "0"]
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "bitlab", *args, "--out", str(run)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped at step" in out and "--resume" in out
    assert not (run / "final.pt").exists()
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= step < 30
    done = subprocess.run([sys.executable, "-m", "bitlab", *args, "--out", str(run), "--resume"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {run / 'checkpoint.pt'} at step {step}" in done.stderr
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    assert_same(weights(run), weights(tmp_path / "ref"))


def test_fewshot_runs_seeds_and_reports_spread(tiny_digits, tmp_path):
    out = fewshot(FewShotConfig(**{**TINY, "data": str(tiny_digits), "out": str(tmp_path), "schedule": [1, 2, 3, 3, 4],
                                   "shots": [1, 3], "seeds": [0, 1]}))
    assert out.stopped is None and out.csv == tmp_path / "fewshot.csv"
    rows = list(csv.DictReader(open(tmp_path / "fewshot.csv")))
    assert [(r["k"], r["seed"]) for r in rows] == [("1", "0"), ("1", "1"), ("3", "0"), ("3", "1")]
    assert [r["train_size"] for r in rows] == ["10", "10", "30", "30"]  # the HyperRule sees k x classes
    summary = list(csv.DictReader(open(tmp_path / "fewshot_summary.csv")))
    assert [s["k"] for s in summary] == ["1", "3"]
    for s in summary:
        tops = sorted(float(r["top1"]) for r in rows if r["k"] == s["k"])
        assert float(s["top1_min"]) == tops[0] and float(s["top1_max"]) == tops[-1]
        assert float(s["top1_median"]) == pytest.approx(sum(tops) / 2)
    # What the few-shot notebook draws: every run, with the classes learnt (for chance level).
    runs = read_fewshot(tmp_path)
    assert runs[["k", "seed"]].values.tolist() == [[1, 0], [1, 1], [3, 0], [3, 1]]
    assert runs["top1"].tolist() == [float(r["top1"]) for r in rows] and (runs["num_classes"] == 10).all()
    assert runs["pretrained"].isna().all()  # trained from scratch: the figure says so
    with pytest.raises(BitlabError, match="no few-shot results"):
        read_fewshot(tmp_path / "nowhere")
    picks = {d.name: (d / "fewshot_files.txt").read_text() for d in tmp_path.iterdir() if d.is_dir()}
    assert picks["k1_seed0"] != picks["k1_seed1"] and len(picks["k3_seed0"].splitlines()) == 30
    again = fewshot(FewShotConfig(**{**TINY, "data": str(tiny_digits), "out": str(tmp_path / "again"),
                                     "schedule": [1, 2, 3, 3, 4], "shots": [1], "seeds": [0]}))
    assert (tmp_path / "again" / "k1_seed0" / "fewshot_files.txt").read_text() == picks["k1_seed0"]
    assert again.runs[0]["top1"] == float(rows[0]["top1"])  # same seed, same run
    # a finished sweep is not redone
    mtime = (tmp_path / "k1_seed0" / "final.pt").stat().st_mtime_ns
    fewshot(FewShotConfig(**{**TINY, "data": str(tiny_digits), "out": str(tmp_path), "schedule": [1, 2, 3, 3, 4],
                             "shots": [1], "seeds": [0]}))
    assert (tmp_path / "k1_seed0" / "final.pt").stat().st_mtime_ns == mtime


def test_fewshot_cli_prints_median_and_spread(tiny_digits, tmp_path, capsys):
    args = ["fewshot", "--model", "R14x0.5", "--random-init", "--data", str(tiny_digits), "--out", str(tmp_path),
            "--batch-size", "8", "--resolution", "18", "16", "--schedule", "1", "1", "1", "1", "2", "--workers", "0", "--no-progress",
            "--shots", "2", "--seeds", "0", "1", "2"]
    code, out, _ = _cli(capsys, *args)
    assert code == 0
    summary = next(csv.DictReader(open(tmp_path / "fewshot_summary.csv")))
    assert summary["runs"] == "3"
    assert f"{float(summary['top1_median']):.4f}" in out and "fewshot.csv" in out


def test_timm_model_and_its_checkpoint(tiny_digits, tmp_path):
    first = finetune(cfg(tiny_digits, tmp_path / "a", model="test_resnet", schedule=[1, 2, 2, 2, 3]))
    assert first.completed
    # a timm final.pt carries a 10-class head; fine-tuning from it again keeps the backbone, new zero head
    model = build_model("test_resnet", 4, str(tmp_path / "a" / "final.pt"))
    saved = torch.load(tmp_path / "a" / "final.pt", weights_only=True)["state_dict"]
    assert torch.equal(model.state_dict()["conv1.0.weight"], saved["conv1.0.weight"])
    assert model.get_classifier().out_features == 4 and not model.get_classifier().weight.any()
    with pytest.raises(CheckpointError, match="another architecture"):
        build_model("test_efficientnet", 4, str(tmp_path / "a" / "final.pt"))


def test_bit_checkpoint_of_another_architecture(tiny_digits, tmp_path):
    finetune(cfg(tiny_digits, tmp_path / "r14", schedule=[1, 1, 1, 1, 2]))
    with pytest.raises(CheckpointError, match=r"(missing key|has shape).*another architecture than R50x1"):
        build_model("R50x1", 10, str(tmp_path / "r14" / "final.pt"))
    # resuming a run directory with another model is refused before anything is trained
    finetune(cfg(tiny_digits, tmp_path / "run", stop_after=1))
    with pytest.raises(BitlabError, match=r"cannot resume this checkpoint with different settings \(model: 'R14x0.5' -> 'R50x1'"):
        finetune(cfg(tiny_digits, tmp_path / "run", model="R50x1", resume=True))


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_bad_input_messages(tiny_digits, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_digits, data)
    base = ["finetune", "--model", "R14x0.5", "--random-init", "--data", str(data), "--batch-size", "8",
            "--resolution", "18", "16", "--schedule", "1", "1", "1", "1", "2", "--workers", "0", "--no-progress"]
    code, _, err = _cli(capsys, *base, "--out", str(tmp_path / "k"), "--examples-per-class", "7")
    assert code == 2 and "fewer than --examples-per-class 7" in err
    code, _, err = _cli(capsys, *base, "--out", str(tmp_path / "b"), "--batch-size", "6", "--batch-split", "4")
    assert code == 2 and "multiple of 4" in err
    code, _, err = _cli(capsys, *base, "--out", str(tmp_path / "nan"), "--base-lr", "1e30", "--schedule", "1", "1",
                        "1", "1", "4")
    assert code == 2 and any(m in err for m in ("loss is nan", "loss is inf", "gradients are not finite")) \
        and "no checkpoint had been written yet" in err
    assert not (tmp_path / "nan" / "final.pt").exists()
    shutil.rmtree(data / "val" / "3")
    code, _, err = _cli(capsys, *base, "--out", str(tmp_path / "v"))
    assert code == 2 and "no validation images for class(es) '3'" in err
    shutil.copytree(tiny_digits / "val" / "3", data / "val" / "3")
    bad = sorted((data / "train" / "5").glob("*.png"))[0]
    bad.write_bytes(b"\x89PNG broken")
    code, _, err = _cli(capsys, *base, "--out", str(tmp_path / "c"), "--schedule", "1", "1", "1", "1", "8")
    assert code == 2 and str(bad) in err and "--skip-bad-images" in err
    code, out, _ = _cli(capsys, *base, "--out", str(tmp_path / "s"), "--schedule", "1", "1", "1", "1", "8",
                        "--skip-bad-images")
    assert code == 0 and "skipped 1 unreadable image(s)" in out
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["bad_images"] == 1 and str(bad) in summary["bad_image_messages"][0]


def test_hyperrule_cli(capsys):
    code, out, _ = _cli(capsys, "hyperrule", "--dataset-size", "20000", "--image-size", "96", "96")
    assert code == 0
    assert "resize 512x512, random crop 480x480" in out and "10000 steps" in out and "alpha 0.1" in out
    assert "step 3000: 0.003" in out and "step 3001: 0.0003" in out and "step 10000: end" in out
    code, out, _ = _cli(capsys, "hyperrule", "--dataset-size", "19999", "--image-size", "95", "96", "--json")
    rule = json.loads(out)
    assert (rule["resize"], rule["crop"], rule["total_steps"], rule["mixup_alpha"]) == (160, 128, 500, 0.0)
    # The official schedule ignores the batch size; --scale-schedule keeps the epochs instead.
    for flag, steps in (((), "10000 steps"), (("--scale-schedule",), "40000 steps: warm-up 2000")):
        code, out, _ = _cli(capsys, "hyperrule", "--dataset-size", "20000", "--image-size", "96", "96",
                            "--batch-size", "128", *flag)
        assert code == 0 and steps in out and "lr 0.003," in out
    # batch 51200 scales the small schedule to 1 2 3 4 5: the last decay (step 4) has no step 5 to print
    code, out, _ = _cli(capsys, "hyperrule", "--dataset-size", "1000", "--image-size", "300", "300",
                        "--batch-size", "51200", "--scale-schedule")
    assert code == 0 and "step 4: 3e-05, step 5: end" in out
    code, _, err = _cli(capsys, "hyperrule", "--dataset-size", "1000", "--image-size", "300", "300",
                        "--batch-size", "100000", "--scale-schedule")
    assert code == 2 and "supports coincide" in err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_and_channels_last(tiny_digits, tmp_path, precision):
    """The GPU code path (autocast, gradient scaler for fp16, channels-last, micro-batches) runs on CPU.
    32 px: at 16 px the 3x3/2 conv of block 4 sees a 1x1 map, where CPU bf16 kernels give NaN gradients."""
    result = finetune(cfg(tiny_digits, tmp_path, precision=precision, channels_last=True, batch_split=2,
                          resolution=[36, 32], mixup=0.1))
    assert result.completed and 0 < result.metrics["loss"] < 10
    scaler = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["scaler"]
    assert (scaler is None) == (precision == "bf16")  # fp16 trains with a gradient scaler, saved for resume


def test_bit_model_from_official_npz_and_from_a_run(tiny_digits, tmp_path):
    from bitlab.models import save_npz

    torch.manual_seed(3)
    upstream = create_model("R14x0.5", num_classes=21843, pretrained=False)
    npz = save_npz(upstream, tmp_path / "R14x0.5.npz")
    model = build_model("R14x0.5", 7, str(npz))
    own, src = model.state_dict(), upstream.state_dict()
    assert all(torch.allclose(own[k], src[k]) for k in own if not k.startswith("head.conv"))
    assert own["head.conv.weight"].shape[0] == 7 and not own["head.conv.weight"].any() and not own["head.conv.bias"].any()
    # fine-tune from the npz, then from that run's final.pt (a bitlab file): both load strictly
    assert finetune(cfg(tiny_digits, tmp_path / "a", pretrained=str(npz), random_init=False,
                        schedule=[1, 1, 1, 1, 2])).completed
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert (summary["weights"], summary["random_init"]) == (str(npz), False)
    again = build_model("R14x0.5", 3, str(tmp_path / "a" / "final.pt"))
    trained = read_state_dict(tmp_path / "a" / "final.pt")[0]
    assert torch.equal(again.state_dict()["root.conv.weight"], trained["root.conv.weight"])


def test_fewshot_jobs_run_side_by_side_with_the_numbers_of_runs_alone(tiny_digits, tmp_path):
    """`jobs=2`: the runs in two forked processes give what one at a time gives (every weight), also
    after the parent used two OpenMP threads and autograd (a child forked from it could not); runs stopped
    side by side resume; a run's error reaches the caller whole."""
    sweep = dict(TINY, data=str(tiny_digits), schedule=[1, 2, 3, 3, 4], shots=[1, 3], seeds=[0, 1])
    alone = fewshot(FewShotConfig(**sweep, out=str(tmp_path / "alone")))
    torch.set_num_threads(2)  # the conftest restores one thread
    torch.nn.functional.conv2d(torch.randn(8, 16, 32, 32), torch.randn(16, 16, 3, 3))
    stopped = fewshot(FewShotConfig(**sweep, out=str(tmp_path / "jobs"), jobs=2, stop_after=1))
    assert stopped.stopped is not None and stopped.stopped.run_dir == tmp_path / "jobs" / "k1_seed0"
    assert all((tmp_path / "jobs" / d / "checkpoint.pt").is_file() for d in ("k1_seed0", "k1_seed1", "k3_seed0"))
    assert torch.get_num_threads() == 2  # the parent keeps its threads
    done = fewshot(FewShotConfig(**sweep, out=str(tmp_path / "jobs"), jobs=0))  # 0: one per core, here 2
    assert done.stopped is None and done.runs == alone.runs
    for run in ("k1_seed0", "k1_seed1", "k3_seed0", "k3_seed1"):
        assert_same(weights(tmp_path / "alone" / run), weights(tmp_path / "jobs" / run))
        assert "resumed from" in (tmp_path / "jobs" / run / "log.txt").read_text()
    with pytest.raises(BitlabError, match="unknown model 'R14x0.7'"):
        fewshot(FewShotConfig(**{**sweep, "model": "R14x0.7"}, out=str(tmp_path / "bad"), jobs=2))


def test_fewshot_jobs_from_a_script_without_a_main_guard_is_a_clear_error(tiny_digits, tmp_path):
    """Each side-by-side process imports the caller's script: one whose code is not under
    `if __name__ == "__main__":` kills its processes, and says so instead of a pool's traceback."""
    script = tmp_path / "sweep.py"
    script.write_text("from bitlab.train.finetune import FewShotConfig, fewshot\n"
                      f"fewshot(FewShotConfig(**{dict(TINY, data=str(tiny_digits), schedule=[1, 1, 1, 1, 2])!r}, "
                      f"out={str(tmp_path / 'out')!r}, shots=[1], seeds=[0, 1], jobs=2))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode != 0
    assert "BitlabError: a process running training runs side by side ended abruptly" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr.splitlines()[-1]


def test_fewshot_refuses_runs_made_with_other_settings(tiny_digits, tmp_path):
    """A finished k*_seed* run is reused only if made with the same settings (the model, the lr...)."""
    sweep = dict(TINY, data=str(tiny_digits), out=str(tmp_path), schedule=[1, 1, 1, 1, 2], shots=[1], seeds=[0])
    first = fewshot(FewShotConfig(**sweep))
    assert first.stopped is None
    # A finished run keeps its model and summary, not the resume state: the settings check reads config.json.
    assert (tmp_path / "k1_seed0" / "final.pt").is_file() and not (tmp_path / "k1_seed0" / "checkpoint.pt").exists()
    for change, named in (({"base_lr": 0.01}, "base_lr: 0.05 -> 0.01"),
                          ({"model": "R14x0.5-bn"}, "model: 'R14x0.5' -> 'R14x0.5-bn'"),
                          ({"pretrained": str(tmp_path / "k1_seed0" / "final.pt"), "random_init": False},
                           "pretrained: None ->")):
        with pytest.raises(BitlabError, match=rf"k1_seed0/config.json: .*different settings \({named}"):
            fewshot(FewShotConfig(**{**sweep, **change}))
        assert json.loads((tmp_path / "config.json").read_text())["base_lr"] == 0.05  # the sweep's record stays
    # the same settings with one more seed: the finished run is reused, the new one made
    again = fewshot(FewShotConfig(**{**sweep, "seeds": [0, 1]}))
    assert again.runs[0]["top1"] == first.runs[0]["top1"] and len(again.runs) == 2


def test_val_fraction_holdout_is_shared_by_the_seeds(tiny_digits, tmp_path):
    """--val-fraction draws with --split-seed: few-shot seeds differ in their K, not in their validation set."""
    def data(**kw):
        return load_data(cfg(tiny_digits / "train", tmp_path, val_fraction=0.34, examples_per_class=2, **kw))

    a, b, other = data(seed=0), data(seed=1), data(seed=0, split_seed=1)
    assert a.val.paths == b.val.paths and len(a.val) == 20
    assert a.train.paths != b.train.paths  # each seed its own few-shot picks ...
    assert not set([*a.train.paths, *b.train.paths]) & set(a.val.paths)  # ... from the same pool
    assert other.val.paths != a.val.paths
    with pytest.raises(BitlabError, match="examples_per_class must be positive, got 0"):
        load_data(cfg(tiny_digits, tmp_path, examples_per_class=0))


def test_split_seed_flag_is_recorded(tiny_digits, tmp_path, capsys):
    code, _, _ = _cli(capsys, "finetune", "--model", "R14x0.5", "--random-init", "--data", str(tiny_digits / "train"),
                      "--out", str(tmp_path), "--val-fraction", "0.34", "--split-seed", "3", "--batch-size", "8",
                      "--resolution", "18", "16", "--schedule", "1", "1", "1", "1", "1", "--workers", "0",
                      "--no-progress")
    assert code == 0 and json.loads((tmp_path / "config.json").read_text())["split_seed"] == 3


@pytest.mark.parametrize("change, message", [
    ({"workers": -1}, "workers must be 0 (load in the main process) or more, got -1"),
    ({"mixup": -1.0}, "mixup must be 0 (off) or more, got -1.0"),
    ({"base_lr": -1.0}, "base_lr must be a positive number, got -1.0"),
    ({"base_lr": float("nan")}, "base_lr must be a positive number, got nan"),
    ({"schedule": [5, 3, 4, 6, 8]}, "schedule must be increasing"),
    ({"schedule": [-1, 2, 3, 4, 5]}, "schedule must be increasing"),
    ({"schedule": [0, 0, 0, 0, 0]}, "schedule must be increasing step counts WARMUP DECAY... TOTAL with TOTAL > 0, "
                                    "got [0, 0, 0, 0, 0]"),
    ({"resolution": [16, 18]}, "resolution must be RESIZE CROP with 0 < CROP <= RESIZE"),
    ({"image_size": [0, 8]}, "image_size must be two positive numbers"),
    ({"seed": -1}, "seed must be 0 or more"),
    ({"split_seed": -2}, "split_seed must be 0 or more"),
    ({"val_fraction": 1.0}, "val_fraction must be at least 0 and below 1"),
    ({"batch_split": 0}, "batch_split must be at least 1"),
    ({"eval_batch_size": 0}, "eval_batch_size must be at least 1"),
    ({"log_every": 0}, "log_every must be at least 1"),
    ({"stop_after": 0}, "stop_after must be at least 1 step"),
])
def test_config_refuses_unusable_values(tmp_path, change, message):
    with pytest.raises(BitlabError, match="^" + re.escape(message)):  # the setting, as a Python caller names it
        cfg("unused", tmp_path, **change)
    assert not any(tmp_path.iterdir())  # refused before anything is read or written


def test_cli_names_a_bad_flag(tmp_path, capsys):
    code, _, err = _cli(capsys, "finetune", "--model", "R14x0.5", "--random-init", "--data", "unused", "--out",
                        str(tmp_path), "--workers", "-1")
    assert code == 2 and "--workers must be 0" in err
    code, _, err = _cli(capsys, "fewshot", "--model", "R14x0.5", "--random-init", "--data", "unused", "--out",
                        str(tmp_path), "--shots", "0", "5")
    assert code == 2 and "--shots must be positive, got 0" in err


def test_bad_arguments_leave_no_run_folder(tiny_digits, tmp_path, capsys):
    """An unknown model, a missing weights file, a bad CSV or a batch that does not split: exit 2, no RUN_DIR."""
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("path,label\nmissing.png,cat\n")
    common = ["--data", str(tiny_digits), "--batch-size", "8", "--resolution", "18", "16", "--workers", "0",
              "--no-progress", "--schedule", "1", "1", "1", "1", "2"]
    for flags, message in ((["--model", "no_such_model"], "unknown model 'no_such_model'"),
                           (["--pretrained", str(tmp_path / "none.npz")], "none.npz: no such file"),
                           (["--data", str(bad_csv)], "file " + str(tmp_path / "missing.png") + " not found"),
                           (["--batch-split", "3"], "8")):
        out = tmp_path / "runs" / "r"
        code, _, err = _cli(capsys, "finetune", "--model", "R14x0.5", "--random-init", *common, "--out", str(out),
                            *flags)
        assert code == 2 and message in err, err
        assert not (tmp_path / "runs").exists(), flags


def test_fewshot_offers_no_seed_or_resume(tmp_path, capsys):
    """A sweep sets each run's seed (--seeds) and resumes by itself: --seed / --resume would be ignored."""
    for flag in (["--seed", "3"], ["--resume"]):
        with pytest.raises(SystemExit) as e:
            main(["fewshot", "--model", "R14x0.5", "--random-init", "--data", "unused", "--out", str(tmp_path), *flag])
        assert e.value.code == 2 and f"{flag[0]} is not a fewshot flag" in capsys.readouterr().err
    base = {**TINY, "data": "unused", "out": str(tmp_path)}
    with pytest.raises(BitlabError, match="each run's seed comes from seeds"):
        FewShotConfig(**base, seed=3)
    with pytest.raises(BitlabError, match="resumes its stopped runs by itself"):
        FewShotConfig(**base, resume=True)
    assert not any(tmp_path.iterdir())


def test_batch_norm_with_micro_batches_is_warned(tiny_digits, tmp_path, caplog):
    warning = "BatchNorm, which normalises over each micro-batch of 4 images rather than the batch of 8"
    with caplog.at_level("WARNING", logger="bitlab.train.finetune"):
        finetune(cfg(tiny_digits, tmp_path / "bn", model="R14x0.5-bn", batch_split=2, schedule=[1, 1, 1, 1, 1]))
    assert warning in caplog.text
    assert warning in json.loads((tmp_path / "bn" / "plan.json").read_text())["warnings"][0]
    caplog.clear()
    for name, kw in (("gn", dict(batch_split=2)), ("one", dict(model="R14x0.5-bn"))):  # GroupNorm; no split
        finetune(cfg(tiny_digits, tmp_path / name, schedule=[1, 1, 1, 1, 1], **kw))
        assert json.loads((tmp_path / name / "plan.json").read_text())["warnings"] == []
    assert "BatchNorm" not in caplog.text


def test_bad_validation_image_keeps_the_trained_weights(tiny_digits, tmp_path, capsys):
    """The final evaluation fails on an unreadable image: the trained weights are already saved, and
    the run directory says why the run stopped."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_digits, data)
    (data / "val" / "3" / "1.jpg").write_text("x\n")
    out = tmp_path / "run"
    assert main(["finetune", "--model", "R14x0.5", "--random-init", "--data", str(data), "--out", str(out),
                 "--batch-size", "6", "--schedule", "1", "2", "3", "4", "8", "--resolution", "40", "32", "--workers", "0",
                 "--no-progress"]) == 2
    assert "1.jpg" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 8 and (out / "final.pt").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is False and "1.jpg" in summary["error"] and summary["checkpoint_step"] == 8
    log_txt = (out / "log.txt").read_text()
    assert "BiT-HyperRule: 60 training images" in log_txt and "run stopped by an error" in log_txt


def test_resume_refuses_changed_data_and_keeps_an_existing_run(tiny_digits, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_digits, data)
    out = tmp_path / "run"
    finetune(cfg(data, out, stop_after=2))
    config_before = (out / "config.json").read_text()
    with pytest.raises(BitlabError, match="already holds a training checkpoint; pass --resume"):
        finetune(cfg(data, out))
    assert (out / "config.json").read_text() == config_before  # refused before anything was written
    shutil.copy(data / "train" / "3" / sorted(os.listdir(data / "train" / "3"))[0], data / "train" / "3" / "new.png")
    with pytest.raises(BitlabError, match=r"the data changed .*dataset_size: 60 -> 61"):
        finetune(cfg(data, out, resume=True))


def test_rerun_from_config_json_gives_the_same_weights(tiny_digits, tmp_path):
    """`--config RUN/config.json` reruns the experiment: the same settings, the same final weights."""
    args = ["finetune", "--model", "R14x0.5", "--random-init", "--data", str(tiny_digits), "--batch-size", "8",
            "--resolution", "18", "16", "--schedule", "1", "1", "1", "1", "2", "--base-lr", "0.05", "--mixup", "0.2",
            "--workers", "0", "--no-progress", "--no-flip"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main(["finetune", "--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in "ab")
    assert {k: v for k, v in a.items() if k != "out"} == {k: v for k, v in b.items() if k != "out"}
    assert_same(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_pretrained_by_default_random_weights_only_when_asked(tiny_digits, tmp_path, capsys):
    """An official name starts from its official weights (offline here: a clear error before any run
    folder exists), a name without released weights needs --random-init or --pretrained."""
    common = ["--data", str(tiny_digits), "--batch-size", "8", "--resolution", "18", "16", "--workers", "0",
              "--no-progress", "--schedule", "1", "1", "1", "1", "2"]
    code, _, err = _cli(capsys, "finetune", "--model", "R14x0.5", *common, "--out", str(tmp_path / "r14"))
    assert code == 2 and "R14x0.5 names an architecture, and no weights were released for it" in err
    assert "--pretrained FILE" in err and "--random-init" in err
    code, _, err = _cli(capsys, "finetune", "--model", "BiT-M-R50x1", *common, "--out", str(tmp_path / "bit"))
    assert code == 2 and "BiT-M-R50x1: its pretrained weights are not in the cache and cannot be fetched" in err
    code, _, err = _cli(capsys, "finetune", "--model", "R14x0.5", "--random-init", "--pretrained", __file__, *common,
                        "--out", str(tmp_path / "both"))
    assert code == 2 and "--random-init asks for random weights, but a weights file is given too" in err
    assert not any(tmp_path.iterdir())


def test_final_and_checkpoint_record_the_classes_in_head_order(tiny_digits, tmp_path, caplog):
    """What `bitlab evaluate --model RUN_DIR` needs: the name, the classes in head order, the view the
    run validated with and what its weights were pre-trained on, in both files."""
    from bitlab.data.transforms import DataConfig
    from bitlab.models.checkpoints import read_record

    finetune(cfg(tiny_digits, tmp_path / "run", schedule=[1, 1, 1, 1, 2], checkpoint_every=1))
    for file in ("final.pt", "checkpoint.pt"):
        assert read_record(tmp_path / "run" / file) == {
            "name": "R14x0.5", "classes": [str(d) for d in range(10)],
            "data_config": DataConfig(input_size=16, crop_pct=1.0).to_dict(),  # square_eval_image at the crop
            "pretraining_data": "none (trained from scratch)"}, file
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["weights"], summary["random_init"]) == ("random (--random-init)", True)
    assert "R14x0.5 starts from random weights (--random-init): no transfer" in caplog.text


# ----------------------------------------------------------------------------- one writer per run folder
_LONG = ["finetune", "--model", "R14x0.5", "--random-init", "--batch-size", "8", "--resolution", "18", "16",
         "--schedule", "5", "100", "150", "200", "250", "--workers", "0", "--no-progress", "--checkpoint-every", "20",
         "--log-every", "1"]


def _finetune_proc(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bitlab", *_LONG, "--data", str(data), "--out", str(out), *extra],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_finetunes_started_together_into_one_folder(tiny_digits, tmp_path):
    """Exactly one trains; the other exits 2 naming its pid (no metrics row written twice, no
    checkpoint written by both)."""
    out = tmp_path / "run"
    procs = [_finetune_proc(tiny_digits, out, "--base-lr", lr) for lr in ("0.05", "0.01")]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 2], errs
    winner = next(p for p in procs if p.returncode == 0)
    err = errs[1 - procs.index(winner)]
    assert f"bitlab finetune: error: {out} is in use by pid {winner.pid} on " in err and "Traceback" not in err
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    assert steps == list(range(1, 251))
    lr = json.loads((out / "config.json").read_text())["base_lr"]
    assert lr == (0.05 if procs.index(winner) == 0 else 0.01)
    assert json.loads((out / "summary.json").read_text())["completed"] and not (out / ".lock").exists()


def _kill_when(proc: subprocess.Popen, ready) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_killed_runs_lock_is_taken_over_by_the_resuming_run(tiny_digits, tmp_path):
    out = tmp_path / "run"
    proc = _finetune_proc(tiny_digits, out)
    _kill_when(proc, lambda: (out / "checkpoint.pt").exists())
    assert json.loads((out / ".lock").read_text())["pid"] == proc.pid  # left behind by SIGKILL
    done = subprocess.run([sys.executable, "-m", "bitlab", *_LONG, "--data", str(tiny_digits), "--out", str(out),
                           "--resume"], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"took over the lock of pid {proc.pid} (finetune, since" in done.stderr


def test_a_fresh_run_killed_in_a_finished_runs_folder_leaves_no_old_results(tiny_digits, tmp_path):
    """A finished run without its checkpoint (as fewshot leaves them) is replaced by a run with other
    settings, SIGKILLed midway: the old summary.json and final.pt are gone before the new config.json
    is written, so the folder never shows the new settings beside the old results."""
    out = tmp_path / "run"
    assert main([*_LONG, "--data", str(tiny_digits), "--out", str(out), "--schedule", "1", "2", "3", "4", "5"]) == 0
    (out / "checkpoint.pt").unlink()
    proc = _finetune_proc(tiny_digits, out, "--base-lr", "0.01")
    _kill_when(proc, lambda: json.loads((out / "config.json").read_text())["base_lr"] == 0.01)
    assert not (out / "summary.json").exists() and not (out / "final.pt").exists()


def test_a_full_disk_names_the_checkpoint_and_records_it_plainly(tiny_digits, tmp_path, small_disk, capsys):
    """On a real 4 MiB tmpfs the first checkpoint (16 MB) does not fit: exit 2 naming checkpoint.pt
    and the full disk, in summary.json too (it was torch's '[enforce fail at inline_container.cc]'),
    no half-written checkpoint, metrics whole."""
    out = small_disk("4M") / "run"
    assert main(["finetune", "--model", "R14x0.5", "--random-init", "--data", str(tiny_digits), "--out", str(out),
                 "--batch-size", "8", "--resolution", "18", "16", "--schedule", "1", "2", "3", "4", "6", "--checkpoint-every", "2",
                 "--log-every", "1", "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: {out / 'checkpoint.pt'}: cannot write this file, the disk is full (errno ENOSPC" in err
    assert "inline_container" not in err and "Traceback" not in err and "Logging error" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is False and summary["error_type"] == "DiskFullError"
    assert "checkpoint.pt: cannot write this file, the disk is full" in summary["error"]
    assert not (out / "checkpoint.pt").exists() and not list(out.glob(".*.tmp"))
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]


def test_a_file_in_both_train_and_val_is_warned_as_a_validation_leak(tiny_digits, tmp_path, caplog):
    """A CSV listing two files under both splits: the run warns naming the count and the files, and
    records it in plan.json and summary.json."""
    files = sorted((tiny_digits / "train").rglob("*.png"))
    rows = [f"{f},{f.parent.name},train" for f in files]
    rows += [f"{f},{f.parent.name},val" for f in sorted((tiny_digits / "val").rglob("*.png"))]
    rows += [f"{f},{f.parent.name},val" for f in files[:2]]  # the leak
    (tmp_path / "data.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    with caplog.at_level("WARNING", logger="bitlab.train.finetune"):
        finetune(cfg(tmp_path / "data.csv", tmp_path / "run", schedule=[1, 1, 1, 1, 1]))
    leak = f"validation leak: 2 file(s) of {tmp_path / 'data.csv'}"
    assert leak in caplog.text and str(files[0]) in caplog.text and str(files[1]) in caplog.text
    assert leak in json.loads((tmp_path / "run" / "plan.json").read_text())["warnings"][0]
    assert leak in json.loads((tmp_path / "run" / "summary.json").read_text())["warnings"][0]
    finetune(cfg(tiny_digits, tmp_path / "apart", schedule=[1, 1, 1, 1, 1]))
    assert json.loads((tmp_path / "apart" / "summary.json").read_text())["warnings"] == []
