"""BiT-HyperRule pinned at its boundaries, against the official bit_hyperrule.py semantics."""
import pytest

from bitlab import hyperrule as hr
from bitlab.errors import BitlabError


@pytest.mark.parametrize("size, supports", [
    (1, (100, 200, 300, 400, 500)),
    (19_999, (100, 200, 300, 400, 500)),
    (20_000, (500, 3000, 6000, 9000, 10_000)),
    (499_999, (500, 3000, 6000, 9000, 10_000)),
    (500_000, (500, 6000, 12_000, 18_000, 20_000)),
    (1_281_167, (500, 6000, 12_000, 18_000, 20_000)),
])
def test_schedule_boundaries(size, supports):
    assert hr.get_schedule(size) == supports


@pytest.mark.parametrize("size, alpha", [(19_999, 0.0), (20_000, 0.1), (499_999, 0.1), (500_000, 0.1)])
def test_mixup_boundaries(size, alpha):
    assert hr.get_mixup(size) == alpha


@pytest.mark.parametrize("hw, res", [
    ((32, 32), (160, 128)),
    ((95, 96), (160, 128)),  # area 9120, just under 96*96
    ((96, 95), (160, 128)),
    ((96, 96), (512, 480)),  # exactly 96*96: large
    ((48, 192), (512, 480)),  # same area, other shape
    ((224, 224), (512, 480)),
])
def test_resolution_boundaries(hw, res):
    assert hr.get_resolution(hw) == res


def test_lr_small_schedule_exact():
    base = 0.003
    lr = [hr.get_lr(s, 1000, base) for s in range(501)]
    assert lr[0] == 0.0  # official quirk: the first update is wasted (issue #58)
    assert lr[1] == pytest.approx(base / 100)
    assert lr[50] == pytest.approx(base / 2)
    assert lr[99] == pytest.approx(base * 99 / 100)
    assert lr[100] == base  # warm-up over
    assert lr[200] == base  # decay point 200 applies only from step 201 (strict <)
    assert lr[201] == pytest.approx(base / 10)
    assert lr[300] == pytest.approx(base / 10)
    assert lr[301] == pytest.approx(base / 100)
    assert lr[400] == pytest.approx(base / 100)
    assert lr[401] == pytest.approx(base / 1000)
    assert lr[499] == pytest.approx(base / 1000)
    assert lr[500] is None  # training ends after exactly 500 updates (steps 0..499)


@pytest.mark.parametrize("size, warm, decays, total", [
    (20_000, 500, (3000, 6000, 9000), 10_000),
    (500_000, 500, (6000, 12_000, 18_000), 20_000),
])
def test_lr_larger_schedules(size, warm, decays, total):
    base = 0.003
    assert hr.get_lr(0, size) == 0.0
    assert hr.get_lr(warm // 2, size) == pytest.approx(base / 2)
    assert hr.get_lr(warm, size) == base
    for k, d in enumerate(decays):
        assert hr.get_lr(d, size) == pytest.approx(base / 10 ** k)
        assert hr.get_lr(d + 1, size) == pytest.approx(base / 10 ** (k + 1))
    assert hr.get_lr(total - 1, size) == pytest.approx(base / 1000)
    assert hr.get_lr(total, size) is None
    assert hr.get_lr(total + 7, size) is None


def test_hyperrule_record_and_scaling():
    rule = hr.hyperrule(12_345, (32, 32), batch_size=512)
    assert (rule.resize, rule.crop, rule.supports, rule.mixup_alpha) == (160, 128, (100, 200, 300, 400, 500), 0.0)
    assert rule.total_steps == 500 and rule.weight_decay == 0.0 and rule.momentum == 0.9 and rule.zero_head
    assert rule.lr(201) == pytest.approx(0.0003)
    # The official code never scales the schedule; opt-in scaling keeps the number of epochs.
    assert hr.hyperrule(12_345, (32, 32), batch_size=128).supports == (100, 200, 300, 400, 500)
    scaled = hr.hyperrule(12_345, (32, 32), batch_size=128, scale_with_batch=True)
    assert scaled.supports == (400, 800, 1200, 1600, 2000)
    assert scaled.base_lr == 0.003  # the lr is the user's choice (README: batch 128 used base_lr 0.001)
    assert hr.hyperrule(1_000_000, (500, 375), batch_size=1024, scale_with_batch=True).supports == \
        (250, 3000, 6000, 9000, 10_000)


@pytest.mark.parametrize("call", [
    lambda: hr.get_schedule(0),
    lambda: hr.get_resolution((0, 10)),
    lambda: hr.hyperrule(10, (8, 8), batch_size=0),
])
def test_bad_input(call):
    with pytest.raises(BitlabError):
        call()


def test_scaled_schedule_that_collapses_is_refused():
    # batch 100000: (100, 200, 300, 400, 500) would become (1, 1, 2, 2, 3)
    with pytest.raises(BitlabError, match=r"squeezes the schedule \[100, 200, 300, 400, 500\] into \[1, 1, 2, 2, 3\]"):
        hr.hyperrule(1000, (300, 300), batch_size=100_000, scale_with_batch=True)
    assert hr.hyperrule(1000, (300, 300), batch_size=51_200, scale_with_batch=True).supports == (1, 2, 3, 4, 5)
