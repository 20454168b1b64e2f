"""MixUp: one lambda per step, split-independent partners, the official two-target loss."""
import numpy as np
import torch
import torch.nn.functional as F

from bitlab.data.mixup import MixedTargets, mix, mixup_cross_entropy, step_mixup


def test_step_mixup_is_a_function_of_seed_and_step():
    lam, perm = step_mixup(0.1, seed=3, step=17, batch_size=64)
    lam2, perm2 = step_mixup(0.1, seed=3, step=17, batch_size=64)
    assert lam == lam2 and torch.equal(perm, perm2)
    assert 0.0 <= lam <= 1.0 and sorted(perm.tolist()) == list(range(64))
    others = {step_mixup(0.1, seed=3, step=s, batch_size=64)[0] for s in range(20)}
    assert len(others) == 20


def test_lambda_follows_beta_01():
    lams = np.array([step_mixup(0.1, seed=0, step=s, batch_size=4)[0] for s in range(2000)])
    # Beta(0.1, 0.1) piles up near 0 and 1 (U-shaped), mean 0.5
    assert abs(lams.mean() - 0.5) < 0.05
    assert ((lams < 0.05) | (lams > 0.95)).mean() > 0.6


def test_no_mixup_without_alpha():
    assert step_mixup(0.0, seed=0, step=5, batch_size=8) == (1.0, None)


def test_mixed_loss_equals_soft_label_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    y_a, y_b, lam = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3, 2, 1, 0, 0, 2]), 0.3
    soft = lam * F.one_hot(y_a, 4).float() + (1 - lam) * F.one_hot(y_b, 4).float()
    expected = -(soft * logits.log_softmax(1)).sum(1).mean()
    got = mixup_cross_entropy(logits, MixedTargets(y_a, y_b, lam))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(mixup_cross_entropy(logits, y_a), F.cross_entropy(logits, y_a))


def test_mix_is_convex_combination():
    a, b = torch.full((2, 3), 2.0), torch.full((2, 3), -1.0)
    torch.testing.assert_close(mix(a.clone(), b, 0.25), torch.full((2, 3), 0.25 * 2 - 0.75))
