"""Tests for the numeric-answer reward (grpo_utils.rewards) against hand-computed values."""

from __future__ import annotations

import re

import pytest

from grpo_utils.data import datasets
from grpo_utils.data.datasets import _gsm8k_rows
from grpo_utils.rewards import (
    RewardFunction,
    extract_final_number,
    gsm8k_final_answer,
    normalize_number,
    numeric_answer_reward,
    reference_number,
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


# ----------------------------------------------------------------------------- the reference itself

OFFICIAL = "Janet has 16 eggs and eats 3, bakes with 4: 16 - 3 - 4 = <<16-3-4=9>>9.\nShe sells them at $2: 18.\n#### 18"


@pytest.mark.parametrize("answer, number", [
    ("18", "18"), (18, "18"), ("1,234", "1234"), ("$7.00", "7"),
    (OFFICIAL, "18"),                                      # the official GSM8K solution: after '####'
    ("step 1 #### 5\nfixed: #### 1,250", "1250"),          # the last '####' counts
    ("#### -3", "-3"),
])
def test_reference_number_reads_numbers_and_official_gsm8k_answers(answer, number):
    assert reference_number(answer) == number


@pytest.mark.parametrize("answer, message", [
    ("abc", "reference row['answer']='abc' is not a number"),
    ("", "reference row['answer'] is empty"),
    ("   ", "reference row['answer'] is empty"),
    (None, "reference row['answer']=None is not a number"),
    (True, "reference row['answer']=True is not a number"),
    ("so she has eggs.\n#### eighteen", "reference row['answer']='#### eighteen' is not a number (after its last '####')"),
    ("nan", "reference row['answer']='nan' is not a number"),
])
def test_unreadable_reference_raises(answer, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        reference_number(answer)


def test_the_dataset_loader_and_the_reward_share_one_parser():
    assert datasets.gsm8k_final_answer is gsm8k_final_answer
    assert gsm8k_final_answer(OFFICIAL) == "18" and gsm8k_final_answer("a #### 1 b #### 1,000 ") == "1000"


@pytest.mark.parametrize("name", ["gsm8k", "numeric_answer"])
def test_official_format_reference_scores_and_bad_references_are_counted_failures(name):
    reward = RewardFunction(name, format_weight=0.5)
    rows = [{"answer": OFFICIAL}, {"answer": OFFICIAL}, {"answer": "abc"}, {"answer": ""}, {"question": "none"}]
    scores, failures = reward(["so #### 18", "I get 17", "#### 18", "#### 18", "#### 18"], rows)
    assert scores[:2] == [{"reward": 1.5, "correct": 1.0, "format": 1.0}, {"reward": 0.0, "correct": 0.0, "format": 0.0}]
    assert failures == 3 and scores[2:] == [{"reward": 0.0, "correct": 0.0, "format": 0.0}] * 3
    assert reward.last_errors == [
        None, None,
        f"{name}: ValueError: reference row['answer']='abc' is not a number",
        f"{name}: ValueError: reference row['answer'] is empty",
        f"{name}: ValueError: row has no 'answer' (the reference number)",
    ]
    assert reward.last_error == "ValueError: row has no 'answer' (the reference number)"  # the name is said once
