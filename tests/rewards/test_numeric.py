"""Tests for grpo_utils.rewards and grpo_utils.algo.advantages against hand-computed values."""

from __future__ import annotations

import math
import re

import pytest
import torch

from grpo_utils.algo.advantages import check_advantage_config, group_advantages, zero_advantage_group_fraction
from grpo_utils.data.datasets import _gsm8k_rows
from grpo_utils.rewards import (
    RewardFunction,
    extract_final_number,
    normalize_number,
    numeric_answer_reward,
)
from tests.helpers import SHARED_DATA

GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"

# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text, expected", [
    ("Adding up: 1,000 + 234\n#### 1,234", ("1234", True)),
    (r"so the total is \boxed{42}.", ("42", True)),
    (r"\boxed{ $3,000 }", ("3000", True)),
    ("<answer>7</answer>", ("7", True)),
    ("<answer> -12 </answer>", ("-12", True)),
    ("The answer is $5.", ("5", True)),
    ("the Answer is: 3.50", ("3.5", True)),
    ("#### 12.0", ("12", True)),
    ("I counted 3 apples, then 4 pears, 17.0", ("17", False)),  # last-number fallback, trailing .0
    ("first 2 then 9 bananas", ("9", False)),
    ("#### 5 but later maybe 8", ("5", True)),  # an explicit format beats a later bare number
    ("no digits here at all", (None, False)),
    ("", (None, False)),
])
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


@pytest.mark.parametrize("text, canonical", [
    ("1,234", "1234"), ("12.0", "12"), ("$7", "7"), ("5.", "5"), ("-3", "-3"), ("0.25", "0.25"),
    ("abc", None), ("", None),
])
def test_normalize_number(text, canonical):
    assert normalize_number(text) == canonical


@pytest.mark.parametrize("completion, answer, correct, fmt", [
    ("#### 1,234", "1234", 1.0, 1.0),
    ("#### 1234", "1,234", 1.0, 1.0),  # the reference is normalized too
    (r"\boxed{42}", "42", 1.0, 1.0),
    ("<answer>7</answer>", "7", 1.0, 1.0),
    ("The answer is $5.", "5", 1.0, 1.0),
    ("#### 12.0", "12", 1.0, 1.0),
    ("it is 3 or 4", "4", 1.0, 0.0),
    ("it is 3 or 4", "3", 0.0, 0.0),
    ("nothing", "3", 0.0, 0.0),
    ("#### 13", "12", 0.0, 1.0),
])
def test_numeric_answer_reward(completion, answer, correct, fmt):
    score = numeric_answer_reward(completion, {"answer": answer})
    assert score == {"reward": correct, "correct": correct, "format": fmt}


def test_numeric_answer_reward_format_weight_and_require_format():
    row = {"answer": "4"}
    assert numeric_answer_reward("#### 4", row, format_weight=0.25) == {"reward": 1.25, "correct": 1.0, "format": 1.0}
    assert numeric_answer_reward("#### 5", row, format_weight=0.25) == {"reward": 0.25, "correct": 0.0, "format": 1.0}
    assert numeric_answer_reward("3 then 4", row, format_weight=0.25) == {"reward": 1.0, "correct": 1.0, "format": 0.0}
    assert numeric_answer_reward("3 then 4", row, require_format=True) == {"reward": 0.0, "correct": 0.0, "format": 0.0}
    assert numeric_answer_reward("#### 4", row, require_format=True)["reward"] == 1.0


def test_reward_function_isolates_exceptions():
    reward = RewardFunction("numeric_answer", format_weight=0.5)
    rows = [{"answer": "2"}, {"question": "no answer key"}, {"answer": "9"}]
    scores, failures = reward(["#### 2", "#### 2", "9"], rows)
    assert failures == 1
    assert scores == [
        {"reward": 1.5, "correct": 1.0, "format": 1.0},
        {"reward": 0.0, "correct": 0.0, "format": 0.0},
        {"reward": 1.0, "correct": 1.0, "format": 0.0},
    ]


def test_reward_function_rejects_unknown_name():
    with pytest.raises(ValueError, match=re.escape("reward.name='exact_match' is unknown; expected one of numeric_answer")):
        RewardFunction("exact_match")


def test_gsm8k_gold_solutions_score_one_and_perturbed_score_zero():
    if not GSM8K_TEST.is_file():
        pytest.skip(f"GSM8K data not present at {GSM8K_TEST}")
    rows = _gsm8k_rows(GSM8K_TEST)
    assert len(rows) == 1319
    reward = RewardFunction("numeric_answer")
    gold = [r["solution"] for r in rows]
    wrong = []
    for r in rows:
        head, _ = r["solution"].rsplit("####", 1)
        wrong.append(f"{head}#### {int(r['answer']) + 1:,}")  # commas on purpose: 1,234 style
    gold_scores, gold_failures = reward(gold, rows)
    wrong_scores, wrong_failures = reward(wrong, rows)
    assert gold_failures == wrong_failures == 0
    bad_gold = [i for i, s in enumerate(gold_scores) if s["reward"] != 1.0]
    bad_wrong = [i for i, s in enumerate(wrong_scores) if s["reward"] != 0.0]
    assert bad_gold == [] and bad_wrong == []
    assert all(s["format"] == 1.0 for s in gold_scores)


# ----------------------------------------------------------------------------- advantages


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
