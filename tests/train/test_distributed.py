"""Sharding, and a real 2-process DDP run (torchrun, Gloo) that must equal one process."""
import subprocess
import sys

import pytest
import torch

from bitlab.errors import BitlabError
from bitlab import fileio
from bitlab.models import create_model
from bitlab.train.distributed import DistInfo, ShardSampler, StepSampler, per_rank_batch, setup
from bitlab.train.rundir import read_metrics
from tests.fixtures import numerics
from tests.fixtures.processes import ENV, torchrun


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_step_sampler_epochs_are_permutations():
    items = take(StepSampler(10, 4, seed=1), 20)
    idx = [i for i, _ in items]
    assert [g for _, g in items] == list(range(20))  # stream positions
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:20]) == list(range(10))
    assert idx[:10] != idx[10:20]  # a fresh shuffle every epoch
    assert idx == [i for i, _ in take(StepSampler(10, 4, seed=1), 20)]
    assert idx != [i for i, _ in take(StepSampler(10, 4, seed=2), 20)]


def test_step_sampler_resumes_at_a_step():
    full = take(StepSampler(7, 4, seed=0), 40)
    assert take(StepSampler(7, 4, seed=0, start_step=3), 28) == full[12:40]


def test_ranks_split_each_global_batch():
    single = take(StepSampler(13, 6, seed=0), 6 * 5)
    ranks = [take(StepSampler(13, 6, seed=0, info=DistInfo(rank=r, world_size=3)), 2 * 5) for r in range(3)]
    for step in range(5):
        merged = [x for r in range(3) for x in ranks[r][2 * step:2 * step + 2]]
        assert merged == single[6 * step:6 * step + 6]


def test_shard_sampler_covers_everything_once():
    parts = [list(ShardSampler(11, DistInfo(rank=r, world_size=3))) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))


def test_batch_must_split_evenly():
    assert per_rank_batch(512, 4, DistInfo(world_size=2)) == 64
    with pytest.raises(BitlabError, match="multiple of 6"):
        per_rank_batch(512, 3, DistInfo(world_size=2))


def test_single_process_setup():
    info = setup("cpu")
    assert info == DistInfo(device=torch.device("cpu")) and info.is_main and not info.distributed


def test_ddp_two_processes_equal_one(tiny_digits, tmp_path):
    """2 processes x 4 images == 1 process x 2 micro-batches of 4: the same update and the same
    validation numbers, checked after the first update (HyperRule's lr is 0 at step 0, so after
    step 2; tests/fixtures/numerics.py says why not later) against the floor measured by the same
    steps in another order (1 process, one batch of 8)."""
    common = ["--model", "R14x0.5", "--random-init", "--data", str(tiny_digits), "--batch-size", "8", "--schedule",
              "1", "2", "3", "3", "4", "--resolution", "18", "16", "--workers", "0", "--device", "cpu", "--no-progress",
              "--base-lr", "0.05", "--stop-after", "2", "--eval-every", "2", "--log-every", "1"]
    ddp = torchrun(["-m", "bitlab", "finetune", *common, "--out", str(tmp_path / "ddp")])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 processes joined the gloo process group" in ddp.stderr
    runs = {"ddp": ddp}
    for name, split in (("one", "2"), ("reordered", "1")):
        runs[name] = subprocess.run([sys.executable, "-m", "bitlab", "finetune", *common, "--batch-split", split,
                                     "--out", str(tmp_path / name)], env=ENV, capture_output=True, text=True, timeout=300)
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    two, one, reordered = (fileio.torch_load(tmp_path / d / "checkpoint.pt")["model"] for d in ("ddp", "one", "reordered"))
    torch.manual_seed(0)
    init = create_model("R14x0.5", num_classes=10, zero_head=True, pretrained=False).state_dict()
    numerics.assert_within_floor(two, one, numerics.rounding_floor(one, reordered), start=init)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in two.items() if k.startswith("head.conv"))
    # evaluation sums over both ranks: the same numbers as one process
    val = {d: [r for r in read_metrics(tmp_path / d / "metrics.jsonl") if r["split"] == "val"] for d in runs}
    assert [r["step"] for r in val["ddp"]] == [2] and val["ddp"][0]["n"] == val["one"][0]["n"] == 30
    floor = max(abs(val["reordered"][0]["loss"] - val["one"][0]["loss"]),
                numerics.ULPS * numerics.F32_EPS * val["one"][0]["loss"])
    assert abs(val["ddp"][0]["loss"] - val["one"][0]["loss"]) <= numerics.MARGIN * floor


def test_ddp_unreadable_training_image_stops_every_rank(tiny_digits, tmp_path):
    """One rank meets a corrupt image: both ranks stop at that step naming it (no hang, no rank
    left waiting in an all-reduce), after checkpointing the step completed before it."""
    import json
    import shutil

    from bitlab import fileio
    from bitlab.train.finetune import FinetuneConfig, load_data

    data = tmp_path / "data"
    shutil.copytree(tiny_digits, data)
    files = load_data(FinetuneConfig(model="R14x0.5", data=str(data), out=str(tmp_path / "x"))).train.paths
    bad = files[StepSampler(len(files), 8, seed=0).permutation(0)[8 + 4]]  # step 1, rank 1's half
    open(bad, "wb").write(b"\x89PNG not really")
    out = tmp_path / "run"
    job = torchrun(["-m", "bitlab", "finetune", "--model", "R14x0.5", "--random-init", "--data", str(data),
                    "--batch-size", "8", "--schedule", "1", "2", "3", "3", "4", "--resolution", "18", "16",
                    "--workers", "0", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert job.returncode != 0
    marker = "bitlab finetune: error:"
    errors = [part.split("\n", 1)[0] for part in job.stderr.split(marker)[1:]]
    assert len(errors) == 2, job.stderr[-3000:]  # each rank says why it stopped
    assert all("stopping every rank" in e and f"rank 1: {bad}" in e for e in errors)
    assert fileio.torch_load(out / "checkpoint.pt")["step"] == 1
    assert json.loads((out / "summary.json").read_text())["checkpoint_step"] == 1
