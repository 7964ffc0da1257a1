"""DAPO's rollout-level parts (grpo_utils.algo.shaping) on hand-checked values: dynamic
sampling's group filter, the soft overlong penalty and the truncation mask. Their use inside
GroupRollout.collect is in tests/rollout/test_dynamic_sampling.py."""

from __future__ import annotations

import pytest
import torch

from grpo_utils.algo.shaping import dynamic_sampling_keep, soft_overlong_penalty, truncation_mask


def test_dynamic_sampling_keep() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 1.0])
    assert dynamic_sampling_keep(rewards, 3).tolist() == [True, False, False, True]
    assert dynamic_sampling_keep(rewards, 12).tolist() == [True]
    with pytest.raises(ValueError, match="5-sized groups"):
        dynamic_sampling_keep(rewards, 5)


def test_soft_overlong_penalty() -> None:
    lengths = torch.tensor([0, 6, 7, 8, 9, 10, 11])
    # L_max = 10, L_cache = 4: 0 up to 6, then (6 - L) / 4, and -1 beyond 10.
    expected = [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0]
    assert soft_overlong_penalty(lengths, 10, 4, 1.0).tolist() == expected
    assert soft_overlong_penalty(lengths, 10, 4, 0.5).tolist() == [0.5 * x for x in expected]
    assert soft_overlong_penalty(lengths, 10, 4, 0.0).tolist() == [0.0] * 7
    # Default L_cache: a fifth of the budget (20 -> 4), at least one token (4 -> 1).
    assert soft_overlong_penalty(torch.tensor([16, 18, 20]), 20).tolist() == [0.0, -0.5, -1.0]
    assert soft_overlong_penalty(torch.tensor([3, 4]), 4).tolist() == [0.0, -1.0]
    with pytest.raises(ValueError, match="overlong_cache_len"):
        soft_overlong_penalty(lengths, 10, 11)
    with pytest.raises(ValueError, match="overlong_cache_len"):
        soft_overlong_penalty(lengths, 10, 0)
    with pytest.raises(ValueError, match="overlong_penalty"):
        soft_overlong_penalty(lengths, 10, 4, -1.0)


def test_truncation_mask() -> None:
    assert truncation_mask(torch.tensor([True, False, True])).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="truncated"):
        truncation_mask(torch.tensor([1, 0]))
