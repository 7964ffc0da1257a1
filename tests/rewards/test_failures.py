"""Failures are counted and visible, never silent and never fatal to the process: unreadable
references, absurd values, escapes from user code, the warning line and the stop rule."""

from __future__ import annotations

import math
import re
import textwrap
import threading

import pytest

from grpo_utils.config.schema import REWARD_DEFAULTS, EvalRunConfig, GRPOConfig
from grpo_utils.errors import GRPOError, RewardError
from grpo_utils.launch import exit_on_error
from grpo_utils.rewards import (
    DEFAULT_MAX_ABS_SCORE,
    DEFAULT_STOP_AFTER_FAILED_STEPS,
    DEFAULT_TIMEOUT_S,
    DEFAULT_WARN_FAILURE_FRACTION,
    RewardFunction,
    build_reward,
    plan_reward,
)

try:
    import grpo_utils.rewards.ifeval  # noqa: F401
    HAS_IFEVAL = True
except ImportError:
    HAS_IFEVAL = False


@pytest.fixture
def escapes(tmp_path, monkeypatch):
    """User rewards that return absurd values or escape with BaseExceptions."""
    (tmp_path / "escaping_rewards.py").write_text(textwrap.dedent('''
        import sys

        def value(prompt, completion, **row):
            return row["v"]

        def scores(prompt, completion, **row):
            return {"reward": 1.0, "extra": row["v"]}

        def leaves(prompt, completion, **row):
            sys.exit(3)

        def leaves_on_odd(prompt, completion, **row):
            if row["i"] % 2:
                sys.exit("bye")
            return 1.0

        def generator_exit(prompt, completion, **row):
            raise GeneratorExit()

        def ctrl_c(prompt, completion, **row):
            raise KeyboardInterrupt()

        def batch_values(prompts, completions, v, **columns):
            return list(v)

        def batch_leaves(prompts, completions, **columns):
            sys.exit(4)

        def batch_ctrl_c(prompts, completions, **columns):
            raise KeyboardInterrupt()
    '''))
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(5)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "escaping_rewards"


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("row, message", [
    ({"numbers": [], "target": 3}, "reference row['numbers']=[] must be a non-empty list of integers"),
    ({"target": 3}, "reference row['numbers']=None must be a non-empty list of integers"),
    ({"numbers": "3 5", "target": 3}, "reference row['numbers']='3 5' must be a non-empty list of integers"),
    ({"numbers": [3, 2.5], "target": 3}, "reference row['numbers']=[3, 2.5] must be a non-empty list of integers"),
    ({"numbers": [3, "x"], "target": 3}, "reference row['numbers']=[3, 'x'] must be a non-empty list of integers"),
    ({"numbers": [3, 5]}, "reference row['target']=None is not a number"),
    ({"numbers": [3, 5], "target": "abc"}, "reference row['target']='abc' is not a number"),
    ({"numbers": [3, 5], "target": ""}, "reference row['target']='' is not a number"),
])
def test_countdown_unreadable_reference_is_a_counted_failure(row, message):
    reward = RewardFunction("countdown")
    scores, failures = reward(["<answer>3+5</answer>"], [row])
    assert failures == 1 and scores[0]["reward"] == 0.0
    assert reward.last_errors == [f"countdown: ValueError: {message}"]


def test_countdown_accepts_integral_numbers_in_any_json_form():
    (score,), failures = RewardFunction("countdown")(["<answer>3+5</answer>"], [{"numbers": ["3", 5.0], "target": "8"}])
    assert failures == 0 and score["correct"] == 1.0


@pytest.mark.parametrize("row, message", [
    ({"question": "q"}, "row has no 'answer' (the reference text: text_similarity's reference_field)"),
    ({"answer": None}, "reference row['answer']=None is empty"),
    ({"answer": "  "}, "reference row['answer']='  ' is empty"),
    ({"answer": ["", None]}, "reference row['answer']=['', None] is empty"),
    ({"answer": []}, "reference row['answer']=[] is empty"),
])
def test_text_similarity_missing_or_empty_reference_is_a_counted_failure(row, message):
    reward = RewardFunction("text_similarity")
    scores, failures = reward(["the cat"], [row])
    assert failures == 1 and scores[0]["reward"] == 0.0
    assert reward.last_errors == [f"text_similarity: ValueError: {message}"]
    (score,), failures = reward(["the cat"], [{"answer": ["", "the cat"]}])  # blank entries are dropped
    assert failures == 0 and score["reward"] == pytest.approx(1.0)


def test_math_missing_or_unparsable_reference_is_a_counted_failure():
    reward = RewardFunction("math")
    rows = [{"question": "q"}, {"answer": " ", "solution": "no box"}, {"answer": "\\"}]  # the last: one backslash
    scores, failures = reward([r"\boxed{5}"] * 3, rows)
    assert failures == 3 and [s["reward"] for s in scores] == [0.0] * 3
    assert reward.last_errors[:2] == [r"math: ValueError: row has no 'answer' and no \boxed{} answer in 'solution'"] * 2
    assert reward.last_errors[2] == r"math: ValueError: reference answer '\\' cannot be parsed by math-verify"


@pytest.mark.skipif(not HAS_IFEVAL, reason="grpo_utils.rewards.ifeval is not importable")
def test_ifeval_missing_or_empty_instructions_are_counted_failures():
    reward = RewardFunction("ifeval")
    rows = [{"prompt": "p"}, {"prompt": "p", "instruction_id_list": [], "kwargs": []},
            {"prompt": "p", "instruction_id_list": ["no:such_instruction"], "kwargs": [{}]}]
    scores, failures = reward(["text"] * 3, rows)
    assert failures == 3 and all(s["reward"] == 0.0 for s in scores)
    assert reward.last_errors[:2] == [
        "ifeval: ValueError: row has no 'instruction_id_list' (the instructions to check)",
        "ifeval: ValueError: row has no instructions (empty instruction_id_list)"]
    assert reward.last_errors[2].startswith("ifeval: ")


# ----------------------------------------------------------------------------- absurd values


@pytest.mark.parametrize("value", [1e308, -1e308, math.inf, -math.inf, math.nan, 10**400, 1e6 + 1])
@pytest.mark.parametrize("target", ["value", "scores"])
def test_absurd_values_are_failures_and_stats_stay_finite(escapes, value, target):
    reward = RewardFunction("callable", _target_=f"{escapes}.{target}", timeout_s=None)
    rows = [{"v": 0.5}, {"v": value}, {"v": -2}]
    scores, failures = reward(["a", "b", "c"], rows)
    assert failures == 1 and scores[1]["reward"] == 0.0
    key = "reward" if target == "value" else "extra"
    assert re.fullmatch(rf"callable: ValueError: score '{key}' is .* \(reward.max_abs_score\)|"
                        rf"callable: ValueError: score '{key}' is an integer too large for a float",
                        reward.last_errors[1]), reward.last_errors[1]
    for key in scores[0]:
        assert math.isfinite(sum(s[key] for s in scores) / len(scores))  # reward/mean and every reward/<key>


def test_the_bound_is_inclusive_and_configurable(escapes):
    assert DEFAULT_MAX_ABS_SCORE == 1e6
    reward = RewardFunction("callable", _target_=f"{escapes}.value")
    assert reward([""] * 2, [{"v": 1e6}, {"v": -1e6}])[1] == 0
    loose = RewardFunction("callable", _target_=f"{escapes}.value", max_abs_score=1e9)
    scores, failures = loose([""] * 2, [{"v": 5e8}, {"v": 2e9}])
    assert failures == 1 and scores[0]["reward"] == 5e8
    assert loose.last_errors[1] == ("callable: ValueError: score 'reward' is 2000000000.0, not a finite number "
                                    "within ±1e+09 (reward.max_abs_score)")


def test_batched_absurd_value_fails_its_own_sample_only(escapes):
    reward = build_reward({"name": "callable", "_target_": f"{escapes}.batch_values", "batched": True})
    scores, failures = reward(["a", "b", "c"], [{"v": 1.0}, {"v": math.nan}, {"v": 2.0}])
    assert failures == 1 and [s["reward"] for s in scores] == [1.0, 0.0, 2.0]
    assert reward.last_errors[1].startswith("callable: ValueError: score 'reward' is nan")


def test_a_weighted_sum_bounds_every_component(escapes):
    reward = build_reward({"components": [{"name": "gsm8k"},
                                          {"name": "callable", "_target_": f"{escapes}.scores", "label": "user"}]})
    scores, failures = reward(["#### 4", "#### 4"], [{"answer": "4", "v": 1.0}, {"answer": "4", "v": -math.inf}])
    assert failures == 1 and scores[0]["reward"] == 2.0 and scores[1]["reward"] == 0.0
    assert scores[1]["gsm8k/reward"] == 1.0 and scores[1]["user/extra"] == 0.0
    assert reward.last_errors[1].startswith("user: ValueError: score 'extra' is -inf")


# ----------------------------------------------------------------------------- escapes from user code


@pytest.mark.parametrize("timeout_s", [None, 5.0])
def test_sys_exit_in_a_user_reward_is_a_counted_failure(escapes, timeout_s):
    reward = RewardFunction("callable", _target_=f"{escapes}.leaves_on_odd", timeout_s=timeout_s)
    scores, failures = reward(["a"] * 4, [{"i": i} for i in range(4)])
    assert failures == 2 and [s["reward"] for s in scores] == [1.0, 0.0, 1.0, 0.0]
    assert reward.last_errors[1] == "callable: SystemExit('bye') raised by the reward"
    reward = RewardFunction("callable", _target_=f"{escapes}.leaves", timeout_s=timeout_s)
    assert reward(["a"], [{}])[1] == 1 and reward.last_errors == ["callable: SystemExit(3) raised by the reward"]
    reward = RewardFunction("callable", _target_=f"{escapes}.generator_exit", timeout_s=timeout_s)
    assert reward(["a"], [{}])[1] == 1 and reward.last_errors == ["callable: GeneratorExit() raised by the reward"]


def test_sys_exit_is_contained_off_the_main_thread(escapes):
    """Off the main thread the deadline runs the reward in a worker thread (Ray actors, the API)."""
    reward = RewardFunction("callable", _target_=f"{escapes}.leaves", timeout_s=5.0)
    out = {}
    worker = threading.Thread(target=lambda: out.update(result=reward(["a"], [{}])))
    worker.start()
    worker.join()
    assert out["result"] == ([{"reward": 0.0}], 1)
    assert reward.last_errors == ["callable: SystemExit(3) raised by the reward"]


def test_sys_exit_in_a_batched_reward_fails_its_batch(escapes):
    reward = build_reward({"name": "callable", "_target_": f"{escapes}.batch_leaves", "batched": True,
                           "stop_after_failed_steps": 0})
    scores, failures = reward(["a", "b"], [{}, {}])
    assert failures == 2 and scores == [{"reward": 0.0}] * 2
    assert reward.last_errors == ["callable: SystemExit(4) raised by the reward"] * 2


@pytest.mark.parametrize("target, batched", [("ctrl_c", False), ("batch_ctrl_c", True)])
@pytest.mark.parametrize("timeout_s", [None, 5.0])
def test_keyboard_interrupt_still_stops_the_run(escapes, target, batched, timeout_s):
    reward = build_reward({"name": "callable", "_target_": f"{escapes}.{target}", "batched": batched,
                           "timeout_s": timeout_s})
    with pytest.raises(KeyboardInterrupt):
        reward(["a"], [{}])


def test_keyboard_interrupt_propagates_from_the_worker_thread(escapes):
    reward = RewardFunction("callable", _target_=f"{escapes}.ctrl_c", timeout_s=5.0)
    out = {}

    def run():
        try:
            reward(["a"], [{}])
        except KeyboardInterrupt as e:
            out["raised"] = e

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert isinstance(out.get("raised"), KeyboardInterrupt)


def test_exit_while_importing_a_user_reward_is_a_config_error(escapes):
    with pytest.raises(ValueError, match=re.escape("reward._target_='exits_on_import.fn' cannot be imported: "
                                                   "SystemExit: 5")):
        build_reward({"name": "callable", "_target_": "exits_on_import.fn"})


# ----------------------------------------------------------------------------- warning and stop rule

BAD = [{"answer": "abc"}]
GOOD = [{"answer": "4"}]
LAST = "ValueError: reference row['answer']='abc' is not a number"


def test_a_step_where_every_sample_fails_warns_in_one_line(capsys):
    reward = RewardFunction("numeric_answer")
    scores, failures = reward(["#### 4"] * 64, BAD * 64)
    assert failures == 64 and all(s["reward"] == 0.0 for s in scores)
    assert stderr_lines(capsys) == [f"warning: reward numeric_answer failed on 64/64 samples this step (last: {LAST})"]


def test_the_warning_threshold_is_a_share(capsys):
    reward = RewardFunction("numeric_answer")  # default 0.5: more than half
    reward(["#### 4"] * 64, BAD * 32 + GOOD * 32)
    assert stderr_lines(capsys) == []
    reward(["#### 4"] * 64, BAD * 33 + GOOD * 31)
    assert stderr_lines(capsys) == [f"warning: reward numeric_answer failed on 33/64 samples this step (last: {LAST})"]
    strict = RewardFunction("numeric_answer", warn_failure_fraction=0.0)
    strict(["#### 4"] * 4, GOOD * 3 + BAD)
    assert stderr_lines(capsys) == [f"warning: reward numeric_answer failed on 1/4 samples this step (last: {LAST})"]
    never = RewardFunction("numeric_answer", warn_failure_fraction=1.0, stop_after_failed_steps=0)
    never(["#### 4"] * 4, BAD * 4)
    assert stderr_lines(capsys) == []


def test_consecutive_all_failing_steps_stop_with_one_line(capsys):
    reward = build_reward({"components": [{"name": "numeric_answer", "label": "num"}], "stop_after_failed_steps": 3})
    for step in (1, 2):
        reward(["#### 4"] * 8, BAD * 8)
        assert reward.failed_steps == step
    assert len(stderr_lines(capsys)) == 2  # a warning per failing step before the stop
    with pytest.raises(RewardError) as info:
        reward(["#### 4"] * 8, BAD * 8)
    message = (f"reward num failed on every sample for 3 consecutive steps (last: num: {LAST}); "
               "see reward.stop_after_failed_steps")
    assert str(info.value) == message and "\n" not in str(info.value)
    assert info.value.one_line() == f"reward error: {message}"
    assert isinstance(info.value, GRPOError) and stderr_lines(capsys) == []  # the error says it: no extra warning
    assert reward.last_failures == 8  # the call's bookkeeping is done before it raises


def test_a_partially_failing_step_resets_the_count(capsys):
    reward = RewardFunction("numeric_answer")
    assert DEFAULT_STOP_AFTER_FAILED_STEPS == 3 and reward.stop_after_failed_steps == 3
    for rows in (BAD * 4, BAD * 4, BAD * 3 + GOOD, BAD * 4, BAD * 4, []):
        reward(["#### 4"] * len(rows), rows)  # an empty call neither fails nor resets
    assert reward.failed_steps == 2
    with pytest.raises(RewardError, match=r"^reward numeric_answer failed on every sample for 3 consecutive steps "
                                          r"\(last: ValueError: reference row\['answer'\]='abc' is not a number\)"):
        reward(["#### 4"] * 4, BAD * 4)
    off = RewardFunction("numeric_answer", stop_after_failed_steps=0)
    for _ in range(10):
        assert off(["#### 4"], BAD)[1] == 1
    assert off.failed_steps == 10


def test_launch_prints_a_reward_error_as_its_one_line():
    with pytest.raises(SystemExit) as info, exit_on_error():
        raise RewardError("reward gsm8k failed on every sample for 3 consecutive steps (last: x)")
    assert info.value.code == "reward error: reward gsm8k failed on every sample for 3 consecutive steps (last: x)"


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("settings, message", [
    ({"warn_failure_fraction": 1.5}, "reward.warn_failure_fraction=1.5 must be a number in [0, 1]"),
    ({"warn_failure_fraction": -0.1}, "reward.warn_failure_fraction=-0.1 must be a number in [0, 1]"),
    ({"warn_failure_fraction": "half"}, "reward.warn_failure_fraction='half' must be a number in [0, 1]"),
    ({"warn_failure_fraction": None}, "reward.warn_failure_fraction=None must be a number in [0, 1]"),
    ({"stop_after_failed_steps": -1}, "reward.stop_after_failed_steps=-1 must be an integer >= 0"),
    ({"stop_after_failed_steps": 2.5}, "reward.stop_after_failed_steps=2.5 must be an integer >= 0"),
    ({"stop_after_failed_steps": True}, "reward.stop_after_failed_steps=True must be an integer >= 0"),
    ({"max_abs_score": 0}, "reward.max_abs_score=0 must be a finite number > 0"),
    ({"max_abs_score": math.inf}, "reward.max_abs_score=inf must be a finite number > 0"),
])
@pytest.mark.parametrize("base", [{"name": "gsm8k"}, {"components": [{"name": "gsm8k"}]}])
def test_settings_are_validated_in_one_line(settings, message, base):
    with pytest.raises(ValueError, match="^" + re.escape(message)) as info:
        plan_reward({**base, **settings})
    assert "\n" not in str(info.value)


def test_settings_sit_next_to_name_or_components_and_defaults_agree_with_the_schema():
    reward = build_reward({"components": [{"name": "gsm8k"}], "timeout_s": 2, "warn_failure_fraction": 0.9,
                           "stop_after_failed_steps": 0, "max_abs_score": 10})
    assert (reward.timeout_s, reward.warn_failure_fraction, reward.stop_after_failed_steps,
            reward.max_abs_score) == (2.0, 0.9, 0, 10.0)
    with pytest.raises(ValueError, match=r"^reward.components\[0\].stop_after_failed_steps is not an option"):
        build_reward({"components": [{"name": "gsm8k", "stop_after_failed_steps": 1}]})
    # the schema's reward section (name: null merged under a config's components) plans as is
    assert REWARD_DEFAULTS == {"name": None, "timeout_s": DEFAULT_TIMEOUT_S,
                               "warn_failure_fraction": DEFAULT_WARN_FAILURE_FRACTION,
                               "stop_after_failed_steps": DEFAULT_STOP_AFTER_FAILED_STEPS,
                               "max_abs_score": DEFAULT_MAX_ABS_SCORE}
    assert GRPOConfig().reward == EvalRunConfig().reward == REWARD_DEFAULTS
    planned, timeout_s, single = plan_reward({**REWARD_DEFAULTS, "components": [{"name": "gsm8k"}]})
    assert not single and timeout_s == DEFAULT_TIMEOUT_S and planned[0].spec.name == "gsm8k"
    # grpo-eval.py builds RewardFunction(**reward_config(cfg)): the settings arrive as keywords
    assert RewardFunction(**{**REWARD_DEFAULTS, "name": "gsm8k"}).stop_after_failed_steps == 3
