"""The shared engine on a small real model and a seeded synthetic stream: metrics, checkpoints,
resume, signals and the NaN guard."""
import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitlab import fileio
from bitlab.errors import BitlabError
from bitlab.train import loop, rundir
from bitlab.train.loop import LoopConfig, NonFiniteLossError
from tests.fixtures import numerics
from tests.fixtures.processes import torchrun


class Stream:
    """Step t's data is a function of t alone (what resume relies on); `hook(step)` runs per step."""

    def __init__(self, split=1, batch=8, hook=None):
        self.split, self.batch, self.hook = split, batch, hook

    def steps(self, start):
        step = start
        while True:
            if self.hook:
                self.hook(step)
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(self.batch, 6, generator=g), torch.randint(0, 3, (self.batch,), generator=g)
            m = self.batch // self.split
            yield [(x[i * m:(i + 1) * m], y[i * m:(i + 1) * m]) for i in range(self.split)]
            step += 1


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)


def train(run_dir, steps=10, data=None, loss_fn=F.cross_entropy, resume=False, net=None, **kw):
    cfg = LoopConfig(total_steps=steps, progress=False, **{"log_every": 2, "checkpoint_every": 4, **kw})
    net = net or model()
    evaluate = lambda m, step: {"top1": float(step)}  # noqa: E731 (records when it was called)
    result = loop.run(net, make_optimizer=sgd, data=data or Stream(), lr_at=lambda s: 0.1 if s < steps else None,
                      loss_fn=loss_fn, run_dir=run_dir, config=cfg, evaluate=evaluate, resume=resume,
                      model_name="mlp")
    return net, result


def weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_directory_contract(tmp_path):
    net, result = train(tmp_path, steps=10, eval_every=5)
    assert result.completed and result.step == 10 and result.metrics == {"top1": 10.0}
    rows = rundir.read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in rows] == [(2, "train"), (4, "train"), (5, "val"), (6, "train"),
                                                       (8, "train"), (10, "train"), (10, "val")]
    assert all(r["lr"] == 0.1 and r["loss"] > 0 and r["images_per_s"] > 0 and 0 <= r["data_s"] <= r["step_s"]
               for r in rows if r["split"] == "train")
    header, *lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert header.split(",")[:2] == ["step", "split"] and "top1" in header and len(lines) == 7
    ckpt = fileio.torch_load(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 10 and set(ckpt) >= {"model", "optimizer", "rng", "model_name"}
    final = fileio.torch_load(tmp_path / "final.pt")  # a bitlab model file: the name, then the weights
    assert final["format"] == "bitlab-model" and final["name"] == "mlp"
    assert_same(final["state_dict"], net.state_dict())
    assert "done: 10 steps" in (tmp_path / "log.txt").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave nothing


def test_stop_and_resume_gives_the_same_weights(tmp_path):
    full, _ = train(tmp_path / "full", steps=10)
    part, result = train(tmp_path / "part", steps=10, stop_after=3)
    assert not result.completed and result.stopped_by == "stop_after" and result.step == 3
    assert not (tmp_path / "part" / "final.pt").exists()
    resumed, result = train(tmp_path / "part", steps=10, resume=True, net=model())
    assert result.completed and result.step == 10
    assert_same(weights(resumed), weights(full))
    # metrics of the resumed run continue where the checkpoint was, without duplicates
    steps = [r["step"] for r in rundir.read_metrics(tmp_path / "part" / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [2, 4, 6, 8, 10]


def test_stop_after_counts_the_steps_of_this_call(tmp_path):
    """--stop-after N advances a resumed run by N steps (not to global step N): chunked scripts."""
    train(tmp_path, steps=10, stop_after=3)
    _, result = train(tmp_path, steps=10, resume=True, stop_after=2)
    assert result.stopped_by == "stop_after" and result.step == 5
    assert fileio.torch_load(tmp_path / "checkpoint.pt")["step"] == 5
    _, result = train(tmp_path, steps=10, resume=True, stop_after=9)  # past the end: the run just finishes
    assert result.completed and result.step == 10


def test_micro_batches_equal_one_batch(tmp_path):
    """4 micro-batches == one batch, within the floor that 2 micro-batches (another order) measure."""
    one, _ = train(tmp_path / "a", steps=5, data=Stream(split=1))
    two, _ = train(tmp_path / "c", steps=5, data=Stream(split=2))
    four, _ = train(tmp_path / "b", steps=5, data=Stream(split=4))
    numerics.assert_within_floor(weights(four), weights(one), numerics.rounding_floor(weights(one), weights(two)),
                                 start=weights(model()))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_stops(tmp_path, sig):
    before = signal.getsignal(sig)

    def hook(step):
        if step == 3:
            os.kill(os.getpid(), sig)  # a real signal, mid-step

    net, result = train(tmp_path, steps=10, data=Stream(hook=hook))
    assert not result.completed and result.stopped_by == sig.name and result.step == 4
    assert fileio.torch_load(tmp_path / "checkpoint.pt")["step"] == 4
    assert signal.getsignal(sig) is before  # handlers restored


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] == 6 else loss

    net = model()
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5.*last good checkpoint .*step 4\) is kept"):
        train(tmp_path / "nan", steps=10, loss_fn=loss_fn, net=net)
    good, _ = train(tmp_path / "ref", steps=10, stop_after=4)
    ckpt = fileio.torch_load(tmp_path / "nan" / "checkpoint.pt")
    assert ckpt["step"] == 4
    assert_same(ckpt["model"], weights(good))
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())  # the bad update was never applied


def test_existing_checkpoint_needs_resume(tmp_path):
    train(tmp_path, steps=2)
    with pytest.raises(BitlabError, match="already holds a training checkpoint; pass resume=True to continue"):
        train(tmp_path, steps=2)


def test_resume_into_another_architecture_is_refused(tmp_path):
    train(tmp_path, steps=4, stop_after=2)
    other = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    with pytest.raises(BitlabError, match=r"checkpoint is for another architecture \(mlp"):
        train(tmp_path, steps=4, resume=True, net=other)


def test_lr_schedule_and_group_scales(tmp_path):
    seen = []

    def make_opt(m):
        return torch.optim.SGD([{"params": m[0].parameters(), "lr_scale": 0.5}, {"params": m[2].parameters()}], lr=1)

    class Spy(Stream):
        def steps(self, start):
            for step, batch in enumerate(super().steps(start), start):
                seen.append([g["lr"] for g in opt_ref[0].param_groups])
                yield batch

    opt_ref = []

    def factory(m):
        opt_ref.append(make_opt(m))
        return opt_ref[0]

    cfg = LoopConfig(total_steps=10, progress=False, checkpoint_every=0)
    result = loop.run(model(), make_optimizer=factory, data=Spy(), lr_at=lambda s: [0.0, 0.2, 0.4][s] if s < 3 else None,
                      loss_fn=F.cross_entropy, run_dir=tmp_path, config=cfg)
    assert result.step == 3 and result.completed  # the schedule's None ends training
    assert seen == [[0.0, 0.0], [0.1, 0.2], [0.2, 0.4]]


def test_compiled_model_trains_like_the_eager_one(tmp_path, monkeypatch):
    """--compile: torch.compile (Inductor, C++ on the CPU) gives the eager weights, and checkpoints
    hold the plain module's keys (no `_orig_mod.` prefix), so they load without the compiler."""
    compiled_modules = []
    real_compile = torch.compile

    def spy(module, *args, **kwargs):  # the real compiler, recording what it was given
        compiled_modules.append(module)
        return real_compile(module, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    eager, _ = train(tmp_path / "eager", steps=4)
    assert not compiled_modules
    compiled, result = train(tmp_path / "compiled", steps=4, compile=True)
    assert result.completed and compiled_modules == [compiled]
    # the floor: the same eager steps in another order (2 micro-batches)
    reordered, _ = train(tmp_path / "reordered", steps=4, data=Stream(split=2))
    numerics.assert_within_floor(weights(compiled), weights(eager), numerics.rounding_floor(weights(eager),
                                                                                          weights(reordered)))
    assert fileio.torch_load(tmp_path / "compiled" / "final.pt")["state_dict"].keys() == eager.state_dict().keys()


def test_device_defaults_bf16_and_channels_last_on_gpus_only():
    assert loop.device_defaults(torch.device("cuda", 0), None, None) == ("bf16", True)
    assert loop.device_defaults(torch.device("cpu"), None, None) == ("fp32", False)
    assert loop.device_defaults(torch.device("cuda", 0), "fp16", False) == ("fp16", False)  # what the user asks wins
    assert loop.device_defaults(torch.device("cpu"), "bf16", True) == ("bf16", True)


# Run by torchrun on 2 ranks: counts DDP's gradient all-reduces (a comm hook on each bucket) for one
# unsplit batch and for 4 micro-batches per step; with no_sync() on the inner micro-steps both count
# the same, without it the split run would all-reduce 4 times per step.
_COUNT_ALLREDUCES = '''
import json, sys
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from bitlab.train import distributed as D, loop

calls = []

def counting_wrap(model, info):
    net = D.wrap_model(model, info)
    net.register_comm_hook(None, lambda state, bucket: calls.append(1) or allreduce_hook(state, bucket))
    return net

loop.wrap_model = counting_wrap

class Stream:
    def __init__(self, split):
        self.split = split
    def steps(self, start):
        step = start
        while True:
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
            yield [(x[i * 8 // self.split:(i + 1) * 8 // self.split], y[i * 8 // self.split:(i + 1) * 8 // self.split])
                   for i in range(self.split)]
            step += 1

counts = {}
with D.session("cpu") as info:
    for split in (1, 4):
        calls.clear()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        loop.run(net, make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1), data=Stream(split),
                 lr_at=lambda s: 0.1, loss_fn=F.cross_entropy, run_dir=f"{sys.argv[1]}/split{split}",
                 config=loop.LoopConfig(total_steps=3, progress=False), dist=info)
        counts[split] = len(calls)
    if info.is_main:
        with open(f"{sys.argv[1]}/counts.json", "w") as f:
            json.dump(counts, f)
'''


def test_accumulation_all_reduces_gradients_once_per_step(tmp_path):
    script = tmp_path / "count_allreduces.py"
    script.write_text(_COUNT_ALLREDUCES)
    run = torchrun([str(script), str(tmp_path)])
    assert run.returncode == 0, run.stderr[-3000:]
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert counts["1"] >= 3  # at least one bucket all-reduced per step: the hook sees them
    assert counts["4"] == counts["1"]  # 4 micro-batches, still one all-reduce per step


def dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


def test_resume_restores_the_global_rng_that_dropout_draws_from(tmp_path):
    """Dropout masks come from the global torch RNG: a resumed run equals an uninterrupted one only
    if the checkpoint's RNG state is restored (the model's init would leave another one)."""
    full, _ = train(tmp_path / "full", steps=8, net=dropout_model())
    train(tmp_path / "part", steps=8, stop_after=3, net=dropout_model())
    resumed, result = train(tmp_path / "part", steps=8, resume=True, net=dropout_model())
    assert result.completed
    assert_same(weights(resumed), weights(full))


def test_checkpoint_is_written_before_evaluation(tmp_path):
    """An evaluation that fails loses no training: mid-run the step is checkpointed first, and at
    the end checkpoint.pt and final.pt are written before the final evaluation."""
    def failing_at(bad_step):
        def evaluate(m, step):
            if step == bad_step:
                raise BitlabError("cannot read validation image")
            return {"top1": 1.0}
        return evaluate

    cfg = LoopConfig(total_steps=6, progress=False, checkpoint_every=0, eval_every=3)
    kw = dict(make_optimizer=sgd, data=Stream(), lr_at=lambda s: 0.1, loss_fn=F.cross_entropy, config=cfg)
    with pytest.raises(BitlabError, match="validation image"):
        loop.run(model(), run_dir=tmp_path / "mid", evaluate=failing_at(3), **kw)
    assert fileio.torch_load(tmp_path / "mid" / "checkpoint.pt")["step"] == 3
    net = model()
    with pytest.raises(BitlabError, match="validation image"):
        loop.run(net, run_dir=tmp_path / "end", evaluate=failing_at(6), **kw)
    assert fileio.torch_load(tmp_path / "end" / "checkpoint.pt")["step"] == 6
    assert_same(fileio.torch_load(tmp_path / "end" / "final.pt")["state_dict"], net.state_dict())


def test_data_error_checkpoints_the_last_completed_step(tmp_path):
    def hook(step):
        if step == 5:
            raise BitlabError("x.jpg: cannot decode")

    with pytest.raises(BitlabError, match="cannot decode"):
        train(tmp_path / "bad", steps=10, data=Stream(hook=hook), checkpoint_every=0)
    ckpt = fileio.torch_load(tmp_path / "bad" / "checkpoint.pt")
    good, _ = train(tmp_path / "ref", steps=10, stop_after=5)
    assert ckpt["step"] == 5
    assert_same(ckpt["model"], weights(good))


@pytest.mark.parametrize("field, value", [("log_every", 0), ("checkpoint_every", -1), ("eval_every", -1),
                                          ("stop_after", 0)])
def test_step_counts_are_validated(field, value):
    with pytest.raises(BitlabError, match=f"^{field} must"):
        LoopConfig(total_steps=10, **{field: value})


# Run by torchrun on 2 ranks whose global RNGs differ (as they may, e.g. seeded by rank): a dropout
# model stopped after 3 steps and resumed must equal the uninterrupted run, which needs each rank
# to get its own RNG state back (rank 0's on both would change rank 1's masks).
_RANK_RNG = '''
import sys
import torch
import torch.nn.functional as F
from torch import nn
from bitlab.train import distributed as D, loop

class Stream:
    def __init__(self, rank):
        self.rank = rank
    def steps(self, start):
        step = start
        while True:
            g = torch.Generator().manual_seed(100 * step + self.rank)
            yield [(torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g))]
            step += 1

def run(info, out, **kw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    torch.manual_seed(1000 + info.rank)  # per-rank dropout streams
    loop.run(net, make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1), data=Stream(info.rank),
             lr_at=lambda s: 0.1, loss_fn=F.cross_entropy, run_dir=f"{sys.argv[1]}/{out}",
             config=loop.LoopConfig(total_steps=6, progress=False, **kw), dist=info, resume=True)
    return net

with D.session("cpu") as info:
    full = run(info, "full")
    run(info, "part", stop_after=3)
    resumed = run(info, "part")
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
'''


def test_each_rank_resumes_its_own_rng(tmp_path):
    script = tmp_path / "rank_rng.py"
    script.write_text(_RANK_RNG)
    run = torchrun([str(script), str(tmp_path)])
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(fileio.torch_load(tmp_path / "part" / "checkpoint.pt")["rng"]) == 2
