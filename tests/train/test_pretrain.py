"""`bitlab pretrain`: the recipe, real multi-process runs (torchrun, Gloo), faults, multi-label and shards.

The multi-process tests start real torchrun jobs on this CPU and fail on a timeout instead of
hanging. All runs train the tiny GroupNorm model R14x0.5 at 32 px on crops of real photos.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pytest
import torch

from bitlab import fileio
from bitlab.cli import main
from bitlab.cli.pretrain import torchrun_command
from bitlab.data import shards
from bitlab.data.datasets import image_folder
from bitlab.errors import BitlabError
from bitlab.models.checkpoints import read_state_dict
from bitlab.train import pretrain as P
from bitlab.train.rundir import read_metrics
from tests.fixtures import numerics, processes
from tests.fixtures.processes import ENV

TIMEOUT = 240  # seconds for one multi-process job: a hang fails the test instead of blocking the suite


def write_crops(root: Path, photos: dict, per_class: dict[str, int], size=(96, 80), seed=0) -> Path:
    """`root/<split>/<photo name>/<n>.png`: random crops (50-90 % per side) of real photos, with
    mild noise. The noise matters for comparing runs: R14x0.5's first GroupNorm groups hold one
    channel, so a flat image region (var ~ 0) amplifies float rounding by 1/sqrt(eps), and a ReLU
    then flips; textured inputs keep 1- and 2-process runs within rounding of each other. The
    images are large enough (96 x 80) that a 5 % Inception box still holds texture, not a few
    noisy pixels smoothed flat by the upscaling."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for name, img in photos.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = img.shape[:2]
                ch, cw = int(h * rng.uniform(.5, .9)), int(w * rng.uniform(.5, .9))
                t, l = rng.integers(0, h - ch), rng.integers(0, w - cw)
                crop = cv2.resize(img[t:t + ch, l:l + cw], size, interpolation=cv2.INTER_AREA)
                crop = np.clip(crop + rng.normal(0, 12, crop.shape), 0, 255).astype(np.uint8)
                cv2.imwrite(str(root / split / name / f"{i}.png"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    return root


@pytest.fixture(scope="module")
def tree(photos, tmp_path_factory) -> Path:
    """4 classes x 4 training and 2 validation images."""
    return write_crops(tmp_path_factory.mktemp("pretrain_tree"), photos, {"train": 4, "val": 2})


# 16 images at global batch 8: 2 steps per epoch, 24 steps, lr / 10 after step 16.
COMMON = ["--model", "R14x0.5", "--batch-size", "8", "--epochs", "12", "--decay-epochs", "8", "--warmup-steps", "4",
          "--crop", "32", "--workers", "0", "--log-every", "1", "--checkpoint-every", "2", "--no-progress",
          "--base-lr", "0.5", "--device", "cpu"]
# 4 steps (2 epochs): short runs for the multi-process comparisons.
SHORT = ["--epochs", "2", "--decay-epochs", "1.5", "--warmup-steps", "2"]


def config(tree: Path, out: Path, **overrides) -> P.PretrainConfig:
    cfg = P.PretrainConfig(model="R14x0.5", data=str(tree), out=str(out), batch_size=8, epochs=12, decay_epochs=[8],
                           warmup_steps=4, crop=32, workers=0, log_every=1, checkpoint_every=2, progress=False,
                           base_lr=0.5, device="cpu")
    return replace(cfg, **overrides)


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory) -> Path:
    """The uninterrupted 2-process run (24 steps, 2 micro-steps per step) the killed run must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    job = torchrun([*COMMON, "--data", str(tree), "--out", str(out), "--batch-split", "2"])
    assert job.returncode == 0, job.stderr[-3000:]
    return out


def torchrun(args: list[str], nproc: int = 2, timeout: float = TIMEOUT, launcher: Sequence[str] = ()
             ) -> subprocess.CompletedProcess:
    return processes.torchrun(["-m", "bitlab", "pretrain", *args], nproc, timeout, launcher)


def error_messages(stderr: str) -> list[str]:
    """Each rank's `bitlab pretrain: error: ...` message. Ranks share one stderr pipe, so two
    messages can land on one line; split on the marker rather than on lines."""
    marker = "bitlab pretrain: error:"
    return [marker + part.split("\n", 1)[0] for part in stderr.split(marker)[1:]]


def assert_same_weights(a: Path, b: Path) -> None:
    """Bit for bit: the same computation in the same order (a resumed run against its reference)."""
    wa, _ = read_state_dict(a / "final.pt")
    wb, _ = read_state_dict(b / "final.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def train_losses(run: Path) -> dict[int, float]:
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


# ----------------------------------------------------------------------------- recipe
def test_weight_decay_skips_norm_parameters_and_biases():
    model = P.build_model("R14x0.5", 10, multi_label=False)
    decay, plain = P.param_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 1e-4 and plain["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters() if n.endswith("weight")
                                                       and p.ndim == 4}
    assert {names[id(p)] for p in plain["params"]} >= {"head.gn.weight", "head.gn.bias", "head.conv.bias"}
    everything, nothing = P.param_groups(model, 1e-4, decay_all=True)
    assert len(everything["params"]) == len(list(model.parameters())) and not nothing["params"]


@pytest.mark.parametrize("name", ["R14x0.5", "test_resnet"])
def test_multilabel_head_starts_at_the_label_prior(name):
    model = P.build_model(name, 100, multi_label=True)
    bias = P.classifier(model).bias
    assert torch.allclose(bias, torch.full_like(bias, -math.log(100)))
    assert torch.sigmoid(bias[0]).item() == pytest.approx(1 / 101)
    assert torch.equal(P.classifier(P.build_model(name, 100, multi_label=True, head_bias=-3.0)).bias,
                       torch.full_like(bias, -3.0))


def test_sigmoid_xent_sums_over_classes():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 1]], dtype=torch.uint8)
    p = torch.sigmoid(logits)
    manual = -(targets * p.log() + (1 - targets) * (1 - p).log()).sum(1).mean()
    assert P.sigmoid_xent(logits, targets).item() == pytest.approx(manual.item(), rel=1e-6)
    # with one positive of C, the prior bias starts far below the C log 2 of a zero bias
    c = 1000
    start = P.sigmoid_xent(torch.full((1, c), -math.log(c)), torch.eye(c, dtype=torch.uint8)[:1]).item()
    assert start < 10 < c * math.log(2)


@pytest.mark.parametrize("name", ["R14x0.5-bn", "R14x0.5-plain", "R14x0.5-bn-plain"])
def test_ablation_variants_train(tree, tmp_path, name):
    result = P.pretrain(config(tree, tmp_path / "run", model=name, epochs=1, decay_epochs=[], checkpoint_every=0))
    assert result.completed and result.step == 2 and math.isfinite(result.metrics["loss"])
    model = read_state_dict(tmp_path / "run" / "final.pt")[0]
    assert any("running_mean" in k for k in model) == ("-bn" in name)


# ----------------------------------------------------------------------------- multiple processes
def test_two_processes_with_accumulation_equal_one(tree, tmp_path):
    """2 ranks x 2 micro-steps x 2 images == 1 rank x 8 images: the same update, the same loss.

    Compared after the first step (tests/fixtures/numerics.py says why), against the floor that
    the same step computed in another order (1 process, 4 micro-steps) measures here."""
    step1 = dict(epochs=2, decay_epochs=[1.5], warmup_steps=2, stop_after=1)
    P.pretrain(config(tree, tmp_path / "one", **step1))
    P.pretrain(config(tree, tmp_path / "reordered", batch_split=4, **step1))
    # With the progress bar on, each rank's output in its own file (torchrun --redirects): rank 0
    # alone logs and draws the bar.
    with_bar = [a for a in COMMON if a != "--no-progress"]
    ddp = torchrun([*with_bar, *SHORT, "--data", str(tree), "--out", str(tmp_path / "ddp"), "--batch-split", "2",
                    "--stop-after", "1"], launcher=["--log-dir", str(tmp_path / "logs"), "--redirects", "3"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    rank_err = {int(f.parent.name): f.read_text() for f in (tmp_path / "logs").rglob("stderr.log")}
    assert sorted(rank_err) == [0, 1]
    assert "global batch 8 = 2 process(es) x 2 micro-step(s) x 2" in rank_err[0]
    assert "train:" in rank_err[0] and "1/4" in rank_err[0]
    assert "train:" not in rank_err[1] and "global batch" not in rank_err[1]

    one, reordered, two = (fileio.torch_load(tmp_path / d / "checkpoint.pt")["model"] for d in ("one", "reordered", "ddp"))
    torch.manual_seed(0)
    init = P.build_model("R14x0.5", 4, multi_label=False).state_dict()
    numerics.assert_within_floor(two, one, numerics.rounding_floor(one, reordered), start=init)
    loss = lambda d: train_losses(tmp_path / d)[1]  # noqa: E731
    assert abs(loss("ddp") - loss("one")) <= numerics.MARGIN * max(abs(loss("reordered") - loss("one")),
                                                                   numerics.ULPS * numerics.F32_EPS * loss("one"))
    plan = json.loads((tmp_path / "ddp" / "plan.json").read_text())
    assert (plan["world_size"], plan["micro_steps"], plan["micro_batch"]) == (2, 2, 2)

    # to the end: validation is summed over both ranks
    done = torchrun([*COMMON, *SHORT, "--data", str(tree), "--out", str(tmp_path / "ddp"), "--batch-split", "2"])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["completed"] and summary["step"] == 4 and summary["n"] == 8


def _children(pid: int) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _rank(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker through /proc (Linux)")
def test_killed_worker_is_restarted_and_training_continues_from_the_checkpoint(tree, reference, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bitlab", "pretrain", *COMMON, "--data", str(tree), "--out", str(out),
           "--batch-split", "2", "--nproc", "2", "--max-restarts", "1"]
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "checkpoint.pt").exists():  # the first checkpoint (step 2) is written
            assert job.poll() is None, job.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        workers = {_rank(pid): pid for pid in _children(job.pid)}  # `--nproc` exec'd torchrun in place
        os.kill(workers[1], signal.SIGKILL)
        _, stderr = job.communicate(timeout=TIMEOUT)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr[-3000:]
    assert "failed (exitcode: -9) local_rank: 1" in stderr  # torchrun saw the dead worker and restarted the job
    resumes = [line for line in (out / "log.txt").read_text().splitlines() if "resumed from" in line]
    assert len(resumes) == 1
    resumed_at = int(resumes[0].rsplit(" ", 1)[1])
    assert resumed_at >= 2 and resumed_at % 2 == 0  # from a checkpoint (every 2 steps)
    losses = train_losses(out)
    assert list(losses) == list(range(1, 25))  # each step once: none lost, none repeated
    assert losses == train_losses(reference)  # resuming is exact: bit for bit the uninterrupted run
    assert_same_weights(out, reference)


def test_unreadable_image_stops_every_rank_with_its_name(tree, tmp_path):
    import shutil

    from bitlab.train.distributed import StepSampler

    data = tmp_path / "data"
    shutil.copytree(tree, data)
    # an image of step 1 (the second half of epoch 0's permutation): step 0 trains first
    files = P.load_data(config(data, tmp_path / "x")).train.paths
    bad = Path(files[StepSampler(len(files), 8, seed=0).permutation(0)[8]])
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    t0 = time.monotonic()
    job = torchrun([*COMMON, "--data", str(data), "--out", str(tmp_path / "run")])
    assert job.returncode != 0 and time.monotonic() - t0 < TIMEOUT
    errors = error_messages(job.stderr)
    assert len(errors) == 2, job.stderr[-3000:]  # both ranks stopped, each saying why
    for line in errors:
        assert "cannot read training data, stopping every rank" in line and str(bad) in line
        assert "--skip-bad-images" in line
    assert "Connection reset" not in job.stderr and "Timeout" not in job.stderr  # a decision, not a crash
    # the completed step is kept (--checkpoint-every 2 would not have saved step 1), and the reason recorded
    assert fileio.torch_load(tmp_path / "run" / "checkpoint.pt")["step"] == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] is False and str(bad) in summary["error"] and summary["checkpoint_step"] == 1
    assert "ERROR bitlab.train.rundir: run stopped by an error: cannot read training data" in \
        (tmp_path / "run" / "log.txt").read_text()
    # skipping instead: the run completes and lists the file
    result = P.pretrain(config(data, tmp_path / "skip", epochs=1, decay_epochs=[], skip_bad_images=True))
    assert result.completed and any(str(bad) in m for m in result.bad_images)


def test_nan_stops_every_rank_and_keeps_the_last_good_checkpoint(tree, tmp_path):
    out = tmp_path / "run"
    args = [*COMMON, "--data", str(tree), "--out", str(out), "--base-lr", "1e6", "--checkpoint-every", "1",
            "--warmup-steps", "24"]
    job = torchrun(args)
    errors = error_messages(job.stderr)
    assert job.returncode != 0 and len(errors) == 2, job.stderr[-3000:]
    step = int(errors[0].split(" at step ")[1].split(":")[0])
    assert all("not finite" in e or "loss is nan" in e for e in errors)
    assert all(f"last good checkpoint ({out / 'checkpoint.pt'}, step {step}) is kept" in e for e in errors)
    ckpt = fileio.torch_load(out / "checkpoint.pt")
    assert ckpt["step"] == step > 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc (Linux)")
def test_sigterm_under_torchrun_stops_the_job_instead_of_restarting_it(tree, tmp_path):
    """SIGTERM to the workers (Kubernetes, `scancel --signal=TERM`): every rank checkpoints and
    exits 0, so that torchrun --max-restarts does not count a failure and restart the job."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "bitlab", "pretrain", *COMMON, "--epochs", "100", "--data", str(tree),
           "--out", str(out), "--nproc", "2", "--max-restarts", "1"]
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "checkpoint.pt").exists():
            assert job.poll() is None, job.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        for pid in _children(job.pid):
            os.kill(pid, signal.SIGTERM)
        stdout, stderr = job.communicate(timeout=TIMEOUT)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, stderr[-3000:]
    log_txt = (out / "log.txt").read_text()
    assert "resumed from" not in log_txt and "will restart worker group" not in stderr
    step = fileio.torch_load(out / "checkpoint.pt")["step"]
    assert 2 <= step < 200 and not (out / "final.pt").exists()
    assert f"stopped at step {step} (SIGTERM)" in log_txt and "rerun" in log_txt
    assert "under torchrun: exit status 0" in stderr and f"stopped at step {step}/200" in stdout
    # rank 0 alone logs INFO; the other rank's warnings name it
    assert stderr.count(f"stopped at step {step} (SIGTERM)") == 1 and stderr.count("pre-training R14x0.5") == 1
    assert "rank 1 WARNING bitlab.train.loop: SIGTERM received" in stderr


# ----------------------------------------------------------------------------- multi-label
@pytest.fixture(scope="module")
def multilabel(photos, tmp_path_factory) -> Path:
    """Composites of real photos: each 64 x 64 image holds 0-3 of 4 photos (random crops) in the
    cells of a 2 x 2 grid, the other cells plain noise; its labels are the photos it shows."""
    root = tmp_path_factory.mktemp("multilabel")
    rng = np.random.default_rng(0)
    names = sorted(photos)
    rows = []
    for i in range(96):
        canvas = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) // 4 + 96
        present = sorted(rng.choice(4, size=rng.integers(0, 4), replace=False).tolist())
        cells = rng.permutation(4)
        for c, k in zip(cells, present):
            img = photos[names[k]]
            h, w = img.shape[:2]
            t, l = rng.integers(0, h // 4), rng.integers(0, w // 4)
            patch = cv2.resize(img[t:t + 3 * h // 4, l:l + 3 * w // 4], (32, 32), interpolation=cv2.INTER_AREA)
            y, x = divmod(int(c), 2)
            canvas[32 * y:32 * y + 32, 32 * x:32 * x + 32] = patch
        cv2.imwrite(str(root / f"{i}.png"), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        rows.append({"path": f"{i}.png", "labels": [names[k] for k in present], "split": "val" if i >= 80 else "train"})
    (root / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "labels.jsonl"


def test_multilabel_sigmoid_training_decreases_the_loss(multilabel, tmp_path):
    cfg = config(multilabel.parent, tmp_path / "run", data=str(multilabel), batch_size=16, epochs=8,
                 decay_epochs=[], warmup_steps=5, base_lr=2.0, crop_area_min=0.5, checkpoint_every=0)
    result = P.pretrain(cfg)
    assert result.completed and result.plan.loss == "sigmoid_xent" and result.plan.num_classes == 4
    assert result.plan.head_bias == pytest.approx(-math.log(4))
    losses = list(train_losses(tmp_path / "run").values())
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:4]), losses
    m = result.metrics
    assert m["n"] == 16 and 0 <= m["prec1"] <= 1 and 0 < m["map"] <= 1
    val = [json.loads(line) for line in multilabel.read_text().splitlines()][80:]
    prior = np.mean([len(r["labels"]) for r in val]) / 4
    assert m["map"] > prior  # better than ranking at random (whose AP is each class's frequency)


# ----------------------------------------------------------------------------- shards
def test_shards_train_and_resume_exactly_with_workers(tree, tmp_path, caplog):
    assert main(["shards", "--data", str(tree), "--out", str(tmp_path / "shards"), "--shard-size", "2",
                 "--no-progress"]) == 0
    common = dict(data=str(tmp_path / "shards"), epochs=4, decay_epochs=[3], workers=2, checkpoint_every=0)
    full = P.pretrain(config(tree, tmp_path / "full", **common))
    assert full.completed and full.plan.data == "shards"
    assert full.plan.shard_layout == {"readers": 2, "micro_batch": 8, "micro_steps": 1}
    assert full.metrics["n"] == 8  # validation from the val/ shard set
    stopped = P.pretrain(config(tree, tmp_path / "split", stop_after=3, **common))
    assert not stopped.completed and stopped.step == 3
    resumed = P.pretrain(config(tree, tmp_path / "split", **common))
    assert resumed.completed and resumed.step == 8
    wa, _ = read_state_dict(tmp_path / "full" / "final.pt")
    wb, _ = read_state_dict(tmp_path / "split" / "final.pt")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "full")
    # another reader layout cannot continue mid-stream: it resumes at the next epoch, and says so
    P.pretrain(config(tree, tmp_path / "other", stop_after=3, **common))
    again = P.pretrain(config(tree, tmp_path / "other", **{**common, "workers": 1}))
    assert again.completed and again.step == 8
    assert "resuming at the start of epoch 2 instead of the exact sample" in caplog.text


def test_unreadable_shard_is_named(tree, tmp_path):
    index = shards.write_shards(image_folder(tree / "train"), tmp_path / "s", shard_size=4, progress=False)
    broken = index.path(2)
    broken.write_bytes(broken.read_bytes()[:700])
    cfg = config(tree, tmp_path / "run", data=str(tmp_path / "s"), epochs=2, decay_epochs=[], skip_bad_images=True)
    with pytest.raises(BitlabError, match=rf"cannot read training data, stopping: .*{broken.name}"):
        P.pretrain(cfg)


# ----------------------------------------------------------------------------- bad input, CLI
def test_resume_with_other_settings_is_refused(tree, tmp_path):
    out = tmp_path / "run"
    P.pretrain(config(tree, out, stop_after=2))
    with pytest.raises(BitlabError, match=r"cannot resume .*batch_size: 8 -> 16"):
        P.pretrain(config(tree, out, batch_size=16))
    with pytest.raises(BitlabError, match=r"cannot resume .*model: 'R14x0.5' -> 'R14x0.5-bn'"):
        P.pretrain(config(tree, out, model="R14x0.5-bn"))
    # pretrain resumes by default: the advice is to drop --no-resume (it has no --resume)
    with pytest.raises(BitlabError, match="already holds a training checkpoint; leave out --no-resume to continue"):
        P.pretrain(config(tree, out, resume=False))
    (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()), "seed": 1}))
    with pytest.raises(BitlabError, match=r"seed: 1 -> 0"):
        P.pretrain(config(tree, out))


def test_resume_checks_the_data_not_the_path_string(tree, tmp_path, monkeypatch):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tree, data)
    out = tmp_path / "run"
    P.pretrain(config(data, out, stop_after=2, **dict(zip(("epochs", "decay_epochs", "warmup_steps"), (2, [1.5], 2)))))
    extra = data / "train" / "chelsea" / "extra.png"
    shutil.copy(data / "train" / "chelsea" / "0.png", extra)  # an image added under the same path
    with pytest.raises(BitlabError, match=r"plan.json: the data changed .*num_examples: 16 -> 17"):
        P.pretrain(config(data, out, epochs=2, decay_epochs=[1.5], warmup_steps=2))
    extra.unlink()
    monkeypatch.chdir(tmp_path)  # the same data by a relative path (a requeue from another directory)
    resumed = P.pretrain(config("data", out, epochs=2, decay_epochs=[1.5], warmup_steps=2))
    assert resumed.completed and resumed.step == 4
    assert json.loads((out / "config.json").read_text())["data"] == str(data.resolve())


def test_a_failed_run_records_why(tree, tmp_path):
    """The plan and the error in log.txt, and summary.json saying it did not complete."""
    out = tmp_path / "run"
    with pytest.raises(BitlabError, match="at step 3"):
        P.pretrain(config(tree, out, base_lr=1e8, warmup_steps=6, checkpoint_every=1))
    log_txt = (out / "log.txt").read_text()
    assert "pre-training R14x0.5 on 16 images" in log_txt
    assert "ERROR bitlab.train.rundir: run stopped by an error: gradients are not finite" in log_txt
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is False and summary["error_type"] == "NonFiniteLossError"
    assert "at step 3" in summary["error"] and summary["checkpoint_step"] == 3
    # a rerun refused for other settings does not overwrite that record
    with pytest.raises(BitlabError, match="cannot resume"):
        P.pretrain(config(tree, out, batch_size=16))
    assert json.loads((out / "summary.json").read_text()) == summary


def test_bad_validation_image_keeps_the_trained_weights(tree, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tree, data)
    (data / "val" / "coffee" / "0.png").write_bytes(b"x\n")
    out = tmp_path / "run"
    with pytest.raises(BitlabError, match="cannot read validation data"):
        P.pretrain(config(data, out, epochs=1, decay_epochs=[], checkpoint_every=0))
    assert fileio.torch_load(out / "checkpoint.pt")["step"] == 2 and (out / "final.pt").is_file()
    assert json.loads((out / "summary.json").read_text())["completed"] is False


@pytest.mark.parametrize("flags, message", [
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be 0"),
    (["--stop-after", "0"], "--stop-after must be at least 1"),
    (["--head-bias", "-3"], "--head-bias sets the multi-label head's bias"),
    (["--max-restarts", "1"], "--max-restarts needs --nproc"),
])
def test_running_flags_are_checked(tree, tmp_path, capsys, flags, message):
    argv = ["pretrain", *COMMON, "--epochs", "1", "--decay-epochs", "--data", str(tree), "--out", str(tmp_path / "r")]
    assert main([*argv, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "--epochs must be positive, got -1"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--crop", "-3"], "--crop must be at least 1 pixel, got -3"),
    (["--warmup-steps", "-5"], "--warmup-steps must be >= 0, got -5"),
    (["--weight-decay", "-1"], "--weight-decay must be 0 (none) or more, got -1"),
    (["--batch-split", "0"], "--batch-split must be at least 1, got 0"),
    (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["--data", "no/such/data"], "no/such/data"),
])
def test_bad_arguments_leave_no_run_folder(tree, tmp_path, capsys, flags, message):
    """Refused with exit 2 and the flag named, and RUN_DIR (two new levels) is not left behind."""
    out = tmp_path / "runs" / "r"
    assert main(["pretrain", *COMMON, "--data", str(tree), "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_failed_start_keeps_a_folder_that_was_there(tree, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert main(["pretrain", *COMMON, "--data", str(tree), "--out", str(out), "--model", "no_such_model"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # its new log.txt went, the rest stays
    assert P.PretrainConfig(model="R14x0.5", data="unused", out=str(out), weight_decay=0).weight_decay == 0


def test_checkpoint_of_another_model_is_refused(tree, tmp_path):
    out = tmp_path / "run"
    P.pretrain(config(tree, out, stop_after=2))
    other = tmp_path / "other"
    P.pretrain(config(tree, other, model="R14x0.5-bn", stop_after=2))
    (out / "checkpoint.pt").write_bytes((other / "checkpoint.pt").read_bytes())  # same settings, wrong weights
    with pytest.raises(BitlabError, match="checkpoint is for another architecture"):
        P.pretrain(config(tree, out))


def test_bad_data_is_named(tree, tmp_path):
    one = tmp_path / "one" / "cat"
    one.mkdir(parents=True)
    (one / "a.png").write_bytes((tree / "train" / "chelsea" / "0.png").read_bytes())
    with pytest.raises(BitlabError, match="at least 2 classes"):
        P.load_data(config(tmp_path / "one", tmp_path / "r"))
    shards.write_shards(image_folder(tree / "train"), tmp_path / "s", progress=False)
    with pytest.raises(BitlabError, match="val_fraction needs a file data set"):
        P.load_data(config(tree, tmp_path / "r", data=str(tmp_path / "s"), val_fraction=0.1))
    held = P.load_data(config(tree, tmp_path / "r", data=str(tree / "train"), val_fraction=0.25))
    assert len(held.train) == 12 and len(held.val) == 4


def test_torchrun_command():
    argv = ["-v", "pretrain", "--model", "R50x1", "--nproc", "4", "--max-restarts=2", "--data", "d", "--nproc=4"]
    assert torchrun_command(argv, 4, max_restarts=2, python="py") == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "--max-restarts=2",
        "-m", "bitlab", "-v", "pretrain", "--model", "R50x1", "--data", "d"]


def test_nproc_under_torchrun_is_an_error(tree, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["pretrain", "--model", "R14x0.5", "--data", str(tree), "--out", str(tmp_path), "--nproc", "2"]) == 2
    assert "already runs under torchrun" in capsys.readouterr().err


def test_slurm_example_passes_only_real_options():
    """The Slurm script cannot run here; its torchrun line must at least be a valid `bitlab pretrain`."""
    import re
    import shlex

    from bitlab.cli import build_parser

    script = (Path(__file__).resolve().parents[2] / "bitlab" / "train" / "slurm_pretrain.sh").read_text()
    command = script[script.index("-m bitlab pretrain"):].split("\n\n")[0]
    command = re.sub(r'"\$[A-Z_]+"', "1", command.replace("\\\n", " "))  # shell variables -> a value
    argv = shlex.split(command)[2:]  # after "-m bitlab"
    args = build_parser().parse_args(argv)  # SystemExit on any unknown option
    assert args.command == "pretrain" and args.preset == "bit-m" and args.batch_size == 4096
