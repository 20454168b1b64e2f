"""The upstream recipe: the paper's schedule, presets and overrides, the batch split, the head bias."""
import math
from dataclasses import replace

import pytest

from bitlab.errors import BitlabError, ConfigError
from bitlab.train import upstream
from bitlab.train.config import PretrainConfig
from bitlab.train.distributed import DistInfo, per_rank_batch


def test_paper_schedule_for_imagenet():
    s = upstream.make_schedule(1_281_167, 4096, epochs=90, decay_epochs=(30, 60, 80))
    per_epoch = 1_281_167 / 4096
    assert s.peak_lr == pytest.approx(0.48)  # 0.03 x 4096 / 256
    assert s.total_steps == math.ceil(90 * per_epoch) == 28_151
    assert s.decay_steps == tuple(round(e * per_epoch) for e in (30, 60, 80))
    assert s.lr(0) == pytest.approx(0.48 / 5000) and s.lr(2499) == pytest.approx(0.24)
    assert s.lr(4999) == s.lr(s.decay_steps[0] - 1) == pytest.approx(0.48)
    assert s.lr(s.decay_steps[0]) == pytest.approx(0.048) and s.lr(s.decay_steps[2]) == pytest.approx(0.48e-3)
    assert s.lr(s.total_steps - 1) is not None and s.lr(s.total_steps) is None


def test_presets_and_overrides():
    cfg = PretrainConfig(model="R14x0.5", data="unused", out="unused", batch_size=256)
    m = cfg.schedule(2560)  # 10 steps per epoch
    assert (m.total_steps, m.decay_steps, m.warmup_steps, m.peak_lr) == (900, (300, 600, 800), 5000, 0.03)
    big = replace(cfg, preset="bit-l").schedule(2560)
    assert (big.total_steps, big.decay_steps) == (400, (100, 230, 300, 370))
    short = replace(cfg, epochs=9, warmup_steps=5).schedule(2560)  # decays keep their fractions
    assert (short.total_steps, short.decay_steps, short.warmup_steps) == (90, (30, 60, 80), 5)
    own = replace(cfg, epochs=9, decay_epochs=[4.5], base_lr=0.1).schedule(2560)
    assert (own.decay_steps, own.peak_lr) == ((45,), 0.1)
    with pytest.raises(BitlabError, match="decay_epochs must increase"):
        replace(cfg, epochs=9, decay_epochs=[10]).schedule(2560)


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16])
def test_global_batch_is_kept_when_the_world_size_changes(world):
    split = upstream.micro_batches(4096, world, device_batch=64)
    micro = per_rank_batch(4096, split, DistInfo(world_size=world))
    assert micro <= 64 and micro * split * world == 4096
    assert upstream.micro_batches(4096, world, batch_split=2) == 2
    assert upstream.micro_batches(8, 2, device_batch=3) == 2  # 2 processes x 2 micro-steps x 2: the smallest split
    with pytest.raises(BitlabError, match="cannot be split over 4 process"):
        upstream.micro_batches(6, 4, device_batch=1)


def test_recipe_errors_name_the_setting():
    for args, setting in (((-1, (), 0), "epochs"), ((9, (4, 2), 0), "decay_epochs"), ((9, (), -5), "warmup_steps")):
        with pytest.raises(ConfigError) as e:
            upstream.check_recipe(*args)
        assert e.value.setting == setting and str(e.value).startswith(f"{setting} must")
    assert upstream.recipe("bit-m", epochs=9) == (9, (3.0, 6.0, 8.0))


def test_head_bias_is_the_label_prior():
    assert upstream.default_head_bias(100) == pytest.approx(-math.log(100))
