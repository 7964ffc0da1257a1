"""Task rewards (gsm8k, math, countdown, text_similarity, reward_model, callable, ifeval), their
composition, config validation, and failure/timeout isolation, on hand-checked values."""

from __future__ import annotations

import re
import signal
import textwrap
import threading
import time

import pytest

from grpo_utils.rewards import RewardFunction, build_reward, extract_final_number, plan_reward
from grpo_utils.rewards.countdown import countdown_reward, extract_expression
from grpo_utils.rewards.deadline import RewardTimeout, call_with_deadline
from grpo_utils.rewards.math_answer import gold_answer, last_boxed, math_reward
from grpo_utils.rewards.text_similarity import TextSimilarity, distinct_n, squad_normalize, token_f1

try:
    import grpo_utils.rewards.ifeval  # noqa: F401
    HAS_IFEVAL = True
except ImportError:
    HAS_IFEVAL = False


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    """An importable module of user reward functions (for the `callable` reward)."""
    (tmp_path / "user_rewards_mod.py").write_text(textwrap.dedent('''
        import time

        def length(prompt, completion, **row):
            return len(completion) / 10

        def detailed(prompt, completion, scale=1.0, **row):
            return {"reward": scale * row["x"], "correct": float(row["x"] > 0), "prompt_len": len(prompt),
                    "note": "non-numeric values are dropped"}

        def boom(prompt, completion, **row):
            raise RuntimeError("user code failed")

        def sleepy(prompt, completion, **row):
            time.sleep(5)
            return 1.0

        def swallows(prompt, completion, **row):
            try:
                time.sleep(5)
            except BaseException:  # hides the timeout from the caller
                pass
            return 1.0

        def nan(prompt, completion, **row):
            return float("nan")

        not_callable = 3
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_rewards_mod"


# ----------------------------------------------------------------------------- gsm8k


@pytest.mark.parametrize("text, expected", [
    ("The answer is: **42**", ("42", True)),
    ("Final answer: $1,000.", ("1000", True)),
    (r"the answer is \$3", ("3", True)),
    ("#### $ 12", ("12", True)),
    (r"\boxed{\$18}", ("18", True)),
    (r"\boxed{50\%}", ("50", True)),
    (r"\boxed{12.}", ("12", True)),
    ("<answer>$7.00</answer>", ("7", True)),
    ("<answer> €1,250 </answer>", ("1250", True)),
    ("costs 5 dollars, so 3 left", ("3", False)),
    ("answer is " + " " * 50_000 + "x", (None, False)),  # long blank runs: no regex blow-up
])
def test_gsm8k_extraction_formats(text, expected):
    start = time.perf_counter()
    assert extract_final_number(text) == expected
    assert time.perf_counter() - start < 1.0


def test_gsm8k_alias_and_separate_format_score():
    rows = [{"answer": "1,234"}, {"answer": "7"}, {"answer": "7"}]
    completions = ["so #### 1234", "I think 7", "#### 8"]
    for name in ("gsm8k", "numeric_answer"):
        scores, failures = RewardFunction(name, format_weight=0.5)(completions, rows)
        assert failures == 0
        assert scores == [{"reward": 1.5, "correct": 1.0, "format": 1.0},
                          {"reward": 1.0, "correct": 1.0, "format": 0.0},
                          {"reward": 0.5, "correct": 0.0, "format": 1.0}]


# ----------------------------------------------------------------------------- math


@pytest.mark.parametrize("gold, completion", [
    (r"\frac{1}{2}", r"So the result is \boxed{0.5}."),
    (r"\frac{1}{2}", r"\boxed{\dfrac12}"),
    (r"\frac{1}{2}", r"\boxed{1/2}"),
    (r"\frac{1}{2}", r"\boxed{\frac{2}{4}}"),
    (r"\frac{1}{2}", "<answer>1/2</answer>"),
    (r"\frac{1}{2}", r"<answer>\dfrac12</answer>"),
    ("0.5", r"$\frac{1}{2}$"),  # no box: math-verify's last-expression fallback
    ("1/2", r"\boxed{\tfrac{1}{2}}"),
    (r"\text{(A)}", r"\boxed{A}"),
    (r"\text{(A)}", r"\boxed{\textbf{(A)}}"),
    ("[2, 5)", r"\boxed{[2,5)}"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\boxed{(3, \pi/2)}"),
    ("10", r"First 3, then \boxed{10}"),
])
def test_math_equivalent_answers_match(gold, completion):
    score = math_reward(completion, {"answer": gold})
    assert score["correct"] == 1.0 and score["reward"] == 1.0


@pytest.mark.parametrize("gold, completion", [
    (r"\frac{1}{2}", r"\boxed{\frac{1}{3}}"),
    (r"\frac{1}{2}", r"\boxed{-\frac{1}{2}}"),
    (r"\frac{1}{2}", r"\boxed{0.6}"),
    (r"\text{(A)}", r"\boxed{(B)}"),
    ("[2, 5)", r"\boxed{(2,5]}"),
    ("[2, 5)", r"\boxed{[2,5]}"),
    ("10", "I do not know"),
    ("10", r"\boxed{10} is wrong, the answer is \boxed{11}"),  # the last box counts
])
def test_math_wrong_answers_do_not_match(gold, completion):
    assert math_reward(completion, {"answer": gold})["correct"] == 0.0


def test_math_format_gold_from_solution_and_require_format():
    row = {"solution": r"Half of it: $\frac{10}{2} = \boxed{5}$."}
    assert gold_answer(row) == "5"
    assert gold_answer({"answer": "", "solution": r"\boxed{\frac{1}{2}}"}) == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{a} and \boxed{\frac{1}{\sqrt{2}}} end") == r"\frac{1}{\sqrt{2}}"
    assert math_reward(r"\boxed{5}", row, format_weight=0.1) == {
        "reward": 1.1, "correct": 1.0, "format": 1.0, "parsed": 1.0}
    assert math_reward("it is 5", row, format_weight=0.1) == {"reward": 1.0, "correct": 1.0, "format": 0.0, "parsed": 1.0}
    assert math_reward("it is 5", row, require_format=True)["correct"] == 0.0
    assert math_reward("no idea", row) == {"reward": 0.0, "correct": 0.0, "format": 0.0, "parsed": 0.0}
    scores, failures = RewardFunction("math")([r"\boxed{5}"], [{"question": "no reference"}])
    assert failures == 1 and scores[0]["reward"] == 0.0


def test_math_runs_under_a_deadline_on_main_and_worker_threads():
    reward = RewardFunction("math", timeout_s=5)
    rows = [{"answer": r"\frac{1}{2}"}] * 2
    assert [s["correct"] for s in reward([r"\boxed{0.5}", r"\boxed{2}"], rows)[0]] == [1.0, 0.0]
    out = {}
    worker = threading.Thread(target=lambda: out.update(result=reward([r"\boxed{0.5}"], rows[:1])))
    worker.start()
    worker.join()
    assert out["result"][0][0]["correct"] == 1.0 and out["result"][1] == 0


# ----------------------------------------------------------------------------- countdown

ROW = {"numbers": [3, 5, 7, 2], "target": 26}


@pytest.mark.parametrize("completion, expected", [
    ("<answer>3*7+5</answer>", (1.0, 1.0, 1.0)),            # (correct, format, valid)
    ("<answer>7 * 3 + 5 = 26</answer>", (1.0, 1.0, 1.0)),   # '= target' is cut off
    ("<answer>(7 × 3) + 5</answer>", (1.0, 1.0, 1.0)),
    ("Let me try.\n3 * 7 + 5 = 26", (1.0, 0.0, 1.0)),       # no tags: last expression of the last line
    ("<answer>(3+5)*2+7</answer>", (0.0, 1.0, 1.0)),        # 23: valid but wrong
    ("<answer>(3+5)*2+7+3</answer>", (0.0, 1.0, 0.0)),      # 3 used twice
    ("<answer>13*2</answer>", (0.0, 1.0, 0.0)),             # 13 is not given
    ("<answer>26</answer>", (0.0, 1.0, 0.0)),
    ("<answer>-(-26)</answer>", (0.0, 1.0, 0.0)),
    ("<answer>3*7+5.0</answer>", (0.0, 0.0, 0.0)),          # only integer literals
    ("<answer>(7-5)*(3+</answer>", (0.0, 0.0, 0.0)),        # syntax error
    ("no expression at all", (0.0, 0.0, 0.0)),
])
def test_countdown_scores(completion, expected):
    score = countdown_reward(completion, ROW)
    assert (score["correct"], score["format"], score["valid"]) == expected
    assert score["reward"] == score["correct"]


def test_countdown_options_and_exact_arithmetic():
    assert countdown_reward("<answer>3*7+5</answer>", ROW, use_all_numbers=True)["correct"] == 0.0
    assert countdown_reward("<answer>(3*7+5)*2/2</answer>", ROW)["correct"] == 0.0  # 2 twice
    row = {"numbers": [7, 5, 2, 3, 1], "target": "26"}
    assert countdown_reward("<answer>(7+5)*2+3-1</answer>", row, use_all_numbers=True)["correct"] == 1.0
    # exact fractions: 1/3*3 is exactly 1 (floats would give 1.0 too, but 1/3+1/3+1/3 differs)
    assert countdown_reward("<answer>1/3*3</answer>", {"numbers": [1, 3, 3], "target": 1})["correct"] == 1.0
    assert countdown_reward("<answer>(1/3+1/3+1/3)</answer>", {"numbers": [1, 3] * 3, "target": 1})["correct"] == 1.0
    assert countdown_reward("<answer>5/(7-7)</answer>", {"numbers": [5, 7, 7], "target": 1})["correct"] == 0.0
    assert countdown_reward("<answer>3*7+5</answer>", ROW, format_weight=0.1)["reward"] == pytest.approx(1.1)
    big = {"numbers": [999_999] * 3, "target": 999_999**3}
    assert countdown_reward("<answer>999999*999999*999999</answer>", big)["correct"] == 0.0  # > max_abs_value
    assert countdown_reward("<answer>999999*999999*999999</answer>", big, max_abs_value=10**20)["correct"] == 1.0
    assert extract_expression("first 1+2, then\n(3 - 1) * 4 = 8 done") == ("(3 - 1) * 4", False)


@pytest.mark.parametrize("completion", [
    "<answer>__import__('os').system('touch /tmp/pwned')</answer>",
    "<answer>2**10**10</answer>",
    "<answer>9**9**9</answer>",
    "9**9**9",
    "<answer>(3).__class__</answer>",
    "<answer>(3).real + 23</answer>",
    "<answer>[3][0]*7+5</answer>",
    "<answer>lambda: 3</answer>",
    "<answer>3 if 1 else 5</answer>",
    "<answer>" + "1+" * 50_000 + "1</answer>",
    "1+" * 50_000 + "1",
    "<answer>" + "(" * 300 + "3" + ")" * 300 + "</answer>",
    "<answer>" + "9" * 5000 + "</answer>",
    "<answer>" * 20_000 + "13*2",  # unclosed tags: the fallback finds 13*2 (13 not given)
])
def test_countdown_rejects_malicious_input_quickly(completion):
    start = time.perf_counter()
    score = countdown_reward(completion, ROW)
    assert time.perf_counter() - start < 1.0
    assert score["correct"] == 0.0 and score["valid"] == 0.0


# ----------------------------------------------------------------------------- text similarity


def test_token_f1_by_hand():
    assert squad_normalize("The  Cat, sat!") == "cat sat"
    # articles and punctuation go: [cat, sat, on, mat] vs [cat, sat, on, hat] -> P = R = 3/4
    assert token_f1("The cat sat on the mat.", "a cat sat on a hat") == pytest.approx(0.75)
    # [cat] vs [cat, sat]: P = 1, R = 1/2, F1 = 2/3
    assert token_f1("cat", "cat sat") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalize to nothing
    assert token_f1("", "cat") == 0.0


def test_text_similarity_exact_values_and_weights():
    row = {"answer": "a cat sat on a hat"}
    completion = "the cat sat on the mat"
    f1_rouge = RewardFunction("text_similarity", bleu_weight=0.0)
    (score,), _ = f1_rouge([completion], [row])
    # ROUGE keeps articles: 6 vs 6 tokens, LCS and unigram overlap 'cat sat on' = 3 -> 0.5
    assert score["f1"] == pytest.approx(0.75)
    assert score["rouge1"] == pytest.approx(0.5) and score["rougeL"] == pytest.approx(0.5)
    assert score["reward"] == pytest.approx((0.75 + 0.5) / 2)
    (score,), _ = RewardFunction("text_similarity", f1_weight=3.0, rouge_weight=1.0, bleu_weight=0.0,
                                 rouge_type="rouge2")([completion], [row])
    # bigrams: (cat sat), (sat on) shared of 5 each -> 0.4
    assert score["rouge2"] == pytest.approx(0.4)
    assert score["reward"] == pytest.approx((3 * 0.75 + 0.4) / 4)
    (same,), _ = RewardFunction("text_similarity")(["The cat sat on the mat."], [{"answer": "The cat sat on the mat."}])
    # distinct2 is always reported; with its default weight 0 it leaves the reward alone
    assert same == pytest.approx({"reward": 1.0, "f1": 1.0, "rouge1": 1.0, "rougeL": 1.0, "bleu": 1.0,
                                  "distinct2": 1.0})
    (disjoint,), _ = RewardFunction("text_similarity")(["dogs bark"], [{"answer": "cats meow loudly"}])
    assert disjoint == {"reward": 0.0, "f1": 0.0, "rouge1": 0.0, "rougeL": 0.0, "bleu": 0.0, "distinct2": 1.0}


def test_distinct_n_by_hand():
    # x y x y x: unigrams {x, y} of 5; bigrams xy yx xy yx -> {xy, yx} of 4; trigrams xyx yxy xyx -> 2 of 3
    assert distinct_n("x y x y x", 1) == pytest.approx(2 / 5)
    assert distinct_n("x y x y x", 2) == pytest.approx(2 / 4)
    assert distinct_n("x y x y x", 3) == pytest.approx(2 / 3)
    # normalized as token F1 sees it: "go go go" -> 1 of 3 unigrams, 1 of 2 bigrams
    assert distinct_n("Go, go, GO!", 1) == pytest.approx(1 / 3)
    assert distinct_n("Go, go, GO!", 2) == pytest.approx(1 / 2)
    assert distinct_n("the cat sat on the mat", 2) == 1.0  # articles go: cat sat on mat


def test_distinct_n_of_a_completion_shorter_than_n_is_zero():
    assert distinct_n("hello", 2) == 0.0  # one token: no bigram
    assert distinct_n("", 1) == 0.0
    assert distinct_n("The!", 1) == 0.0  # normalizes to nothing
    reward = RewardFunction("text_similarity", f1_weight=0, rouge_weight=0, bleu_weight=0, distinct_weight=1,
                            distinct_n=3)
    (short, long), _ = reward(["hello there", "x y z w"], [{"answer": "x"}, {"answer": "x"}])
    assert short["reward"] == short["distinct3"] == 0.0
    assert long["reward"] == long["distinct3"] == 1.0  # trigrams x y z and y z w: both distinct


def test_text_similarity_with_all_four_weights_by_hand():
    reward = RewardFunction("text_similarity", f1_weight=1, rouge_weight=2, bleu_weight=3, distinct_weight=4)
    (score,), _ = reward(["cat sat cat sat"], [{"answer": "cat sat on mat"}])
    # F1 and ROUGE-1/L: 2 of 4 tokens match either way (cat, sat; LCS 'cat sat') -> 0.5
    assert score["f1"] == pytest.approx(0.5) and score["rougeL"] == pytest.approx(0.5)
    # BLEU: 1-grams 2/4, 2-grams 1/3, 3-grams 0/2 and 4-grams 0/1 smoothed (exp) to 1/4 and 1/4,
    # equal lengths (no brevity penalty): (1/2 * 1/3 * 1/4 * 1/4) ** (1/4)
    bleu = (1 / 96) ** 0.25
    assert score["bleu"] == pytest.approx(bleu)
    # distinct-2: bigrams (cat sat) (sat cat) (cat sat) -> 2 of 3
    assert score["distinct2"] == pytest.approx(2 / 3)
    assert score["reward"] == pytest.approx((1 * 0.5 + 2 * 0.5 + 3 * bleu + 4 * 2 / 3) / 10)
    assert list(score) == reward.score_keys() == ["reward", "f1", "rouge1", "rougeL", "bleu", "distinct2"]
    (one,), _ = RewardFunction("text_similarity", distinct_n=1)(["cat sat cat sat"], [{"answer": "cat sat on mat"}])
    assert one["distinct1"] == pytest.approx(0.5) and "distinct2" not in one


def test_text_similarity_class_validates_its_arguments():
    with pytest.raises(ValueError, match=r"^distinct_n=0 must be >= 1$"):
        TextSimilarity(distinct_n=0)
    with pytest.raises(ValueError, match=r"^f1_weight, rouge_weight, bleu_weight and distinct_weight must be >= 0"):
        TextSimilarity(distinct_weight=-1)
    with pytest.raises(ValueError, match="with a positive sum"):
        TextSimilarity(f1_weight=0, rouge_weight=0, bleu_weight=0)
    assert TextSimilarity(f1_weight=0, rouge_weight=0, bleu_weight=0, distinct_weight=1).weights == (0, 0, 0, 1)


def test_text_similarity_reference_field_lists_and_answer_tag():
    reward = RewardFunction("text_similarity", reference_field="refs", bleu_weight=0.0, use_answer_tag=True)
    (score,), failures = reward(["thinking... <answer>Paris</answer>"], [{"refs": ["London", "paris"]}])
    assert failures == 0 and score["reward"] == 1.0  # best reference counts; tag content compared
    _, failures = reward(["x"], [{"answer": "no refs field"}])
    assert failures == 1


# ----------------------------------------------------------------------------- composition


def test_weighted_sum_prefixes_and_correct_from_first_component():
    reward = build_reward({"components": [
        {"name": "text_similarity", "weight": 0.5, "bleu_weight": 0.0, "rouge_weight": 0.0},
        {"name": "gsm8k", "weight": 2.0, "format_weight": 0.25},
        {"name": "countdown", "weight": 1.0, "label": "cd"},
    ]})
    rows = [{"answer": "12", "numbers": [3, 4], "target": 12},
            {"answer": "12", "numbers": [3, 4], "target": 12}]
    scores, failures = reward(["#### 12 <answer>3*4</answer>", "13"], rows)
    assert failures == 0
    first = scores[0]
    # text_similarity f1: [12, answer34answer]... computed, not guessed:
    f1 = token_f1("#### 12 <answer>3*4</answer>", "12")
    assert first["text_similarity/f1"] == pytest.approx(f1)
    assert first["gsm8k/reward"] == 1.25 and first["gsm8k/correct"] == 1.0 and first["gsm8k/format"] == 1.0
    assert first["cd/correct"] == 1.0 and first["cd/format"] == 1.0
    assert first["reward"] == pytest.approx(0.5 * f1 + 2.0 * 1.25 + 1.0 * 1.0)
    assert first["correct"] == 1.0  # text_similarity has no 'correct': gsm8k's is used
    assert scores[1]["reward"] == 0.0 and scores[1]["correct"] == 0.0
    assert list(first) == reward.score_keys() == list(scores[1])
    assert reward.name == "text_similarity+gsm8k+cd"
    assert reward.required_fields() == [("answer",), ("numbers",), ("target",)]


def test_single_reward_via_build_reward_and_omegaconf():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": "countdown", "format_weight": 0.1, "timeout_s": 2})
    reward = build_reward(cfg)
    assert reward.timeout_s == 2.0 and reward.name == "countdown"
    (score,), _ = reward(["<answer>3*7+5</answer>"], [ROW])
    assert score == pytest.approx({"reward": 1.1, "correct": 1.0, "format": 1.0, "valid": 1.0})


def test_callable_reward(user_rewards):
    reward = build_reward({"name": "callable", "_target_": f"{user_rewards}.detailed", "kwargs": {"scale": 2.0}})
    rows = [{"x": 3, "prompt": "row prompt", "completion": "ignored"}, {"x": -1, "question": "Q?"}]
    scores, failures = reward(["a", "b"], rows, prompts=["P1", None])
    assert failures == 0
    assert scores == [{"reward": 6.0, "correct": 1.0, "prompt_len": 2.0},
                      {"reward": -2.0, "correct": 0.0, "prompt_len": 2.0}]  # 'Q?' from the row
    plain = build_reward({"components": [{"name": "callable", "_target_": f"{user_rewards}.length", "weight": -1.0}]})
    assert plain(["12345"], [{}])[0] == [{"reward": -0.5, "callable/reward": 0.5}]


# ----------------------------------------------------------------------------- failures and timeouts


def test_exceptions_and_timeouts_are_isolated_and_counted(user_rewards):
    handler_before = signal.getsignal(signal.SIGALRM)
    reward = build_reward({"timeout_s": 0.2, "components": [
        {"name": "gsm8k"},
        {"name": "callable", "_target_": f"{user_rewards}.sleepy", "label": "slow"},
    ]})
    start = time.perf_counter()
    scores, failures = reward(["#### 4", "#### 4"], [{"answer": "4"}, {"answer": "4"}])
    assert time.perf_counter() - start < 2.0
    assert failures == 2 and reward.last_timeouts == 2 and reward.last_failures == 2
    assert scores[0] == {"reward": 0.0, "correct": 0.0, "gsm8k/reward": 1.0, "gsm8k/correct": 1.0,
                         "gsm8k/format": 1.0, "slow/reward": 0.0}  # the sample gets 0; the sub-scores stay
    assert reward.last_errors[0].startswith("slow: timeout")
    assert signal.getsignal(signal.SIGALRM) is handler_before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)

    for target, timeouts in (("boom", 0), ("nan", 0), ("swallows", 2), ("not_callable", None)):
        if timeouts is None:
            with pytest.raises(ValueError, match=re.escape(f"reward._target_='{user_rewards}.not_callable' is not callable")):
                RewardFunction("callable", _target_=f"{user_rewards}.{target}")
            continue
        reward = RewardFunction("callable", _target_=f"{user_rewards}.{target}", timeout_s=0.2)
        start = time.perf_counter()
        scores, failures = reward(["a", "b"], [{}, {}])
        assert time.perf_counter() - start < 2.0
        assert scores == [{"reward": 0.0}] * 2 and failures == 2 and reward.last_timeouts == timeouts, target
    assert reward.total_failures == 2 and reward.total_timeouts == 2


def test_timeout_off_the_main_thread(user_rewards):
    reward = RewardFunction("callable", _target_=f"{user_rewards}.sleepy", timeout_s=0.2)
    out = {}
    worker = threading.Thread(target=lambda: out.update(result=reward(["a"], [{}]), timeouts=reward.last_timeouts))
    start = time.perf_counter()
    worker.start()
    worker.join()
    assert time.perf_counter() - start < 2.0
    assert out == {"result": ([{"reward": 0.0}], 1), "timeouts": 1}


def test_call_with_deadline_nested_timer_and_passthrough():
    assert call_with_deadline(lambda x: x + 1, None, 1) == 2
    assert call_with_deadline(lambda x: x + 1, 1.0, 1) == 2
    with pytest.raises(RewardTimeout):
        call_with_deadline(time.sleep, 0.05, 2)
    # an enclosing timer keeps (what is left of) its time
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 5.0)
        call_with_deadline(lambda: None, 1.0)
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 4.0 < left <= 5.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert fired == []
    with pytest.raises(KeyError):  # errors of the call pass through unchanged
        call_with_deadline({}.__getitem__, 1.0, "k")


# ----------------------------------------------------------------------------- config validation


@pytest.mark.parametrize("cfg, message", [
    ({"name": "exact_match"}, "reward.name='exact_match' is unknown; expected one of numeric_answer, gsm8k, math"),
    ({}, "reward.name is missing (or give reward.components)"),
    ({"name": "gsm8k", "components": []}, "reward: give either 'name' (one reward) or 'components'"),
    ({"name": "gsm8k", "fromat_weight": 0.1}, "reward.fromat_weight is not an option of reward 'gsm8k'; its options: format_weight, require_format"),
    ({"name": "gsm8k", "format_weight": "high"}, "reward.format_weight='high' must be a number"),
    ({"name": "gsm8k", "require_format": 1}, "reward.require_format=1 must be true or false"),
    ({"name": "gsm8k", "timeout_s": -1}, "reward.timeout_s=-1 must be a number >= 0"),
    ({"components": []}, "reward.components must be a non-empty list"),
    ({"components": [{"name": "math"}], "format_weight": 1}, "reward.format_weight is not allowed next to 'components'"),
    ({"components": [{"name": "math"}, {"weight": 1}]}, "reward.components[1] must be a mapping with a 'name'"),
    ({"components": [{"name": "math"}, {"name": "nope"}]}, "reward.components[1].name='nope' is unknown"),
    ({"components": [{"name": "math", "weight": "x"}]}, "reward.components[0].weight='x' must be a finite number"),
    ({"components": [{"name": "math"}, {"name": "math"}]}, "reward.components[1].label='math' repeats an earlier component's"),
    ({"components": [{"name": "text_similarity", "rouge_type": "rougeX"}]},
     "reward.components[0].rouge_type='rougeX' is unknown; expected one of rouge1, rouge2, rougeL, rougeLsum"),
    ({"components": [{"name": "text_similarity", "f1_weight": 0, "rouge_weight": 0, "bleu_weight": 0}]},
     "reward.components[0].f1_weight + rouge_weight + bleu_weight + distinct_weight must be > 0"),
    ({"name": "text_similarity", "distinct_weight": -1}, "reward.distinct_weight=-1.0 must be >= 0"),
    ({"name": "text_similarity", "distinct_n": 0}, "reward.distinct_n=0 must be >= 1"),
    ({"name": "text_similarity", "distinct_n": 1.5}, "reward.distinct_n=1.5 must be an integer"),
    ({"name": "text_similarity", "distinct_weigth": 1}, "reward.distinct_weigth is not an option of reward "
                                                        "'text_similarity'; its options: f1_weight"),
    ({"name": "reward_model"}, "reward.path is required by reward 'reward_model'"),
    ({"name": "reward_model", "path": "/nonexistent/rm"}, "reward.path='/nonexistent/rm' does not exist"),
    ({"name": "callable"}, "reward._target_ is required by reward 'callable'"),
    ({"name": "callable", "_target_": "no_such_module_xyz.fn"}, "reward._target_='no_such_module_xyz.fn' cannot be imported"),
    ({"name": "callable", "_target_": "os.path.no_such_fn"}, "reward._target_='os.path.no_such_fn' cannot be imported"),
    ({"name": "countdown", "max_expression_chars": 0}, "reward.max_expression_chars=0 must be >= 1"),
])
def test_config_errors_name_the_key(cfg, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        build_reward(cfg)
    assert "\n" not in str(info.value)


def test_validation_happens_before_any_reward_is_built(tmp_path):
    # the reward model path is fine, but a later component is broken: nothing gets loaded
    (tmp_path / "config.json").write_text("{}")
    cfg = {"components": [{"name": "reward_model", "path": str(tmp_path)}, {"name": "gsm8k", "bad": 1}]}
    with pytest.raises(ValueError, match=re.escape("reward.components[1].bad is not an option")):
        build_reward(cfg)
    planned, timeout_s, single = plan_reward({"name": "gsm8k"})
    assert single and timeout_s == 10.0 and planned[0].options == {"format_weight": 0.0, "require_format": False}


# ----------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, tok):
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    path = tmp_path_factory.mktemp("tiny_rm")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, bos_token_id=None,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _direct_scores(path, texts, add_special_tokens=True):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return [model(**tok(t, return_tensors="pt", add_special_tokens=add_special_tokens)).logits[0, 0].item()
                for t in texts]


def test_reward_model_batched_scores_equal_direct_forward(tiny_reward_model):
    import math

    reward = build_reward({"name": "reward_model", "path": str(tiny_reward_model), "batch_size": 2})
    prompts = ["Q: 2+2?\nA: ", "Tell me a story about a very long road. ", "x"]
    completions = ["4", "Once upon a time there was a road that went on and on.", "y z"]
    rows = [{"question": "unused"}] * 3
    scores, failures = reward(completions, rows, prompts)
    assert failures == 0 and reward.uses_prompt
    expected = _direct_scores(tiny_reward_model, [p + c for p, c in zip(prompts, completions)])
    assert [s["reward"] for s in scores] == pytest.approx(expected, abs=1e-5)
    assert [s["score"] for s in scores] == pytest.approx(expected, abs=1e-5)
    assert len(set(round(e, 6) for e in expected)) == 3  # different texts, different scores

    chat = build_reward({"name": "reward_model", "path": str(tiny_reward_model), "chat_template": True,
                         "prompt_field": "question", "sigmoid": True, "batch_size": 8})
    rows = [{"question": "What is 2+2?"}, {"question": "Say hi."}]
    scores, _ = chat(["4", "hi!"], rows, ["rendered prompt (ignored: prompt_field wins)"] * 2)
    texts = [f"<|im_start|>user\n{r['question']}<|im_end|>\n<|im_start|>assistant\n{c}<|im_end|>\n"
             for r, c in zip(rows, ["4", "hi!"])]
    expected = _direct_scores(tiny_reward_model, texts, add_special_tokens=False)
    assert [s["score"] for s in scores] == pytest.approx(expected, abs=1e-5)
    assert [s["reward"] for s in scores] == pytest.approx([1 / (1 + math.exp(-e)) for e in expected], abs=1e-6)


def test_reward_model_in_a_weighted_sum_and_bad_options(tiny_reward_model):
    reward = build_reward({"components": [{"name": "gsm8k"},
                                          {"name": "reward_model", "path": str(tiny_reward_model), "weight": 0.1}]})
    (score,), failures = reward(["#### 4"], [{"answer": "4", "prompt": "p"}])
    rm = _direct_scores(tiny_reward_model, ["p#### 4"])[0]
    assert failures == 0 and score["reward"] == pytest.approx(1.0 + 0.1 * rm, abs=1e-5)
    with pytest.raises(ValueError, match=re.escape("reward.dtype='float64' is unknown; expected one of float32")):
        build_reward({"name": "reward_model", "path": str(tiny_reward_model), "dtype": "float64"})
    with pytest.raises(ValueError, match=re.escape("reward (name='reward_model'): label_index=1 is out of range for a model with 1 labels")):
        build_reward({"name": "reward_model", "path": str(tiny_reward_model), "label_index": 1})


# ----------------------------------------------------------------------------- ifeval


@pytest.mark.skipif(not HAS_IFEVAL, reason="grpo_utils.rewards.ifeval is not importable")
def test_ifeval_registered_lazily():
    row = {"prompt": "Answer without commas.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    reward = build_reward({"name": "ifeval", "mode": "all", "strictness": "loose"})
    scores, failures = reward(["no commas here", "one, two"], [row, row])
    assert failures == 0
    assert [s["reward"] for s in scores] == [1.0, 0.0] and [s["correct"] for s in scores] == [1.0, 0.0]
    with pytest.raises(ValueError, match=re.escape("reward.mode='some' is unknown; expected one of fraction, all")):
        build_reward({"name": "ifeval", "mode": "some"})
