"""Tests for grpo_utils.algo.advantages against hand-computed values."""

from __future__ import annotations

import math
import re

import pytest
import torch

from grpo_utils.algo.advantages import check_advantage_config, group_advantages, zero_advantage_group_fraction


def test_group_std_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.5], dtype=torch.float64)
    adv = group_advantages(rewards, group_size=4, scale="group_std", eps=1e-12)
    s1 = math.sqrt((4 * 0.25) / 3)  # group 1: mean 0.5, unbiased std
    s3 = math.sqrt((0.25 + 0.0 + 0.25 + 0.0) / 3)  # group 3: mean 0.5
    expected = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, 0, 0, 0, 0, -0.5 / s3, 0.0, 0.5 / s3, 0.0]
    assert torch.allclose(adv, torch.tensor(expected, dtype=torch.float64), atol=1e-9)
    assert adv[0].item() == pytest.approx(math.sqrt(3) / 2, abs=1e-9)
    # eps is added to the std
    adv_eps = group_advantages(rewards, 4, "group_std", eps=0.1)
    assert adv_eps[0].item() == pytest.approx(0.5 / (s1 + 0.1), abs=1e-9)


def test_batch_std_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    adv = group_advantages(rewards, 4, "batch_std", eps=1e-12)
    batch_std = math.sqrt((2 * 0.75**2 + 6 * 0.25**2) / 7)  # mean 0.75, unbiased
    expected = [0.5 / batch_std, -0.5 / batch_std, -0.5 / batch_std, 0.5 / batch_std, 0, 0, 0, 0]
    assert torch.allclose(adv, torch.tensor(expected, dtype=torch.float64), atol=1e-9)


def test_none_scale_only_centers():
    rewards = torch.tensor([3.0, 1.0, 2.0, 0.0, 0.0, 6.0])
    adv = group_advantages(rewards, 3, "none")
    assert adv.tolist() == [1.0, -1.0, 0.0, -2.0, -2.0, 4.0]


@pytest.mark.parametrize("scale", ["group_std", "batch_std", "none"])
def test_all_equal_groups_give_zero(scale):
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, 3, scale)
    assert adv.tolist() == [0.0] * 6
    assert not torch.isnan(adv).any()


@pytest.mark.parametrize("scale", ["group_std", "batch_std"])
def test_all_equal_groups_give_zero_with_eps_zero(scale):
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0]), 2, scale, eps=0.0)
    assert adv.tolist() == [0.0] * 4


def test_group_size_one_gives_zero():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5]), 1, "group_std")
    assert adv.tolist() == [0.0, 0.0, 0.0]


def test_bad_scale_and_shape_errors():
    with pytest.raises(ValueError, match=re.escape("advantage.scale='rank' is unknown; expected one of group_std, batch_std, none")):
        group_advantages(torch.zeros(4), 2, "rank")
    with pytest.raises(ValueError, match=re.escape("expected 3-sized groups, got rewards of shape (4,)")):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match=re.escape("expected 2-sized groups, got rewards of shape (2, 2)")):
        group_advantages(torch.zeros(2, 2), 2)


def test_zero_advantage_group_fraction():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert zero_advantage_group_fraction(rewards, 4) == pytest.approx(2 / 3)
    assert zero_advantage_group_fraction(torch.tensor([0.0, 1.0, 1.0, 0.0]), 2) == 0.0
    assert zero_advantage_group_fraction(torch.ones(6), 3) == 1.0


# ----------------------------------------------------------------------------- advantage estimators


def test_rloo_is_leave_one_out_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    adv = group_advantages(rewards, 4, "none", estimator="rloo")
    expected = []
    for g in range(2):
        group = rewards[4 * g:4 * g + 4].tolist()
        for i, r in enumerate(group):
            expected.append(r - sum(x for j, x in enumerate(group) if j != i) / 3)
    assert torch.allclose(adv, torch.tensor(expected, dtype=torch.float64), atol=1e-14)
    assert adv[4:].tolist() == [0.0] * 4  # equal rewards: exactly 0


@pytest.mark.parametrize("group_size", [2, 3, 4, 6])
def test_rloo_equals_scaled_mean_centred(group_size):
    rewards = torch.rand(group_size * 5, generator=torch.Generator().manual_seed(group_size),
                         dtype=torch.float64)
    centred = group_advantages(rewards, group_size, "none", estimator="grpo")
    rloo = group_advantages(rewards, group_size, "none", estimator="rloo")
    assert torch.allclose(rloo, centred * group_size / (group_size - 1), atol=1e-14)
    # With std scaling, the same factor carries over.
    centred_std = group_advantages(rewards, group_size, "group_std", estimator="grpo")
    rloo_std = group_advantages(rewards, group_size, "group_std", estimator="rloo")
    assert torch.allclose(rloo_std, centred_std * group_size / (group_size - 1), atol=1e-14)


def test_none_estimator_is_raw_reward():
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0])
    adv = group_advantages(rewards, 2, "none", estimator="none")
    assert adv.tolist() == rewards.tolist()
    adv[0] = 9.0
    assert rewards[0].item() == 1.0  # a copy, not a view


def test_default_estimator_is_grpo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.3])
    assert torch.equal(group_advantages(rewards, 2), group_advantages(rewards, 2, estimator="grpo"))


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group_std", "batch_std", "none"])
def test_constant_groups_are_exactly_zero(estimator, scale):
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1.0, 0.0, 0.3], dtype=torch.float64)
    adv = group_advantages(rewards, 3, scale, estimator=estimator)
    assert adv[:6].tolist() == [0.0] * 6 and (adv[6:] != 0).all()


def test_estimator_errors_name_the_key():
    with pytest.raises(ValueError, match=re.escape("advantage.estimator='ppo' is unknown; expected one of grpo, rloo, none")):
        group_advantages(torch.zeros(4), 2, estimator="ppo")
    with pytest.raises(ValueError, match=re.escape("advantage.scale='group_std' needs a baseline")):
        group_advantages(torch.zeros(4), 2, "group_std", estimator="none")
    with pytest.raises(ValueError, match=re.escape("advantage.estimator='rloo' needs group_size >= 2")):
        group_advantages(torch.zeros(4), 1, "none", estimator="rloo")
    with pytest.raises(ValueError, match=re.escape("advantage.eps=-1.0 must be >= 0")):
        group_advantages(torch.zeros(4), 2, eps=-1.0)


def test_check_advantage_config():
    check_advantage_config("rloo", "none", 0.0)
    with pytest.raises(ValueError, match=re.escape("advantage.scale='rank' is unknown")):
        check_advantage_config("grpo", "rank", 1e-6)
