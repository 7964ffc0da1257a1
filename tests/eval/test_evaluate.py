"""Tests for grpo_utils.eval.evaluate (pass@k, majority vote, answer normalization, evaluate).
The grpo-eval.py recipe end to end is in tests/recipes/test_eval_recipe.py."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from itertools import combinations

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo_utils.data.datasets import quickstart_rows
from grpo_utils.data.prompts import PromptRenderer
from grpo_utils.errors import ConfigError
from grpo_utils.eval.evaluate import (
    EvalConfigError,
    build_report,
    evaluate,
    extract_answer,
    format_table,
    majority_vote,
    normalize_answer,
    pass_at_k,
    pass_k_ladder,
    resolve_model_dir,
    validate_eval_config,
)
from grpo_utils.models.loading import load_tokenizer
from grpo_utils.rewards import RewardFunction
from tests.helpers import CONFIG

# ----------------------------------------------------------------------------- pass@k


def pass_at_k_by_enumeration(n: int, c: int, k: int) -> Fraction:
    """Fraction of the k-subsets of n samples (c of them correct) that hold a correct one."""
    subsets = list(combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration_and_closed_form(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = pass_at_k_by_enumeration(n, c, k)
            assert expected == 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
            assert pass_at_k(n, c, k) == pytest.approx(float(expected), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases():
    for n in (1, 5, 16):
        for k in range(1, n + 1):
            assert pass_at_k(n, 0, k) == 0.0  # nothing correct
            assert pass_at_k(n, n, k) == 1.0  # everything correct
        for c in range(1, n + 1):
            assert pass_at_k(n, c, n) == 1.0  # k = n: any correct sample is drawn
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)  # pass@1 is the fraction correct
    for bad in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError, match="pass_at_k needs"):
            pass_at_k(*bad)


def test_pass_at_k_is_stable_for_large_n():
    n, c, k = 1000, 37, 100  # C(1000, 100) has 140 digits
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)


def test_pass_k_ladder():
    assert pass_k_ladder(1) == [1]
    assert pass_k_ladder(8) == [1, 2, 4, 8]
    assert pass_k_ladder(6) == [1, 2, 4, 6]
    assert pass_k_ladder(0) == []


# ----------------------------------------------------------------------------- majority vote


def test_majority_vote():
    assert majority_vote(["5", "5", "3"], [1, 1, 0]) == 1.0
    assert majority_vote(["3", "5", "3"], [0, 1, 0]) == 0.0
    assert majority_vote(["3", "5"], [0, 1]) == 0.0  # a tie goes to the answer seen first
    assert majority_vote(["5", "3"], [1, 0]) == 1.0
    assert majority_vote([None, None, "5", "3", "5"], [0, 0, 1, 0, 1]) == 1.0  # no answer is not a vote
    assert majority_vote([None, None], [0, 0]) == 0.0
    assert majority_vote([], []) == 0.0
    # the same answer judged differently (format graded): right if any sample giving it was right
    assert majority_vote(["7", "7", "2"], [0, 1, 0]) == 1.0
    with pytest.raises(ValueError, match="2 answers but 1 corrects"):
        majority_vote(["1", "2"], [1])


@pytest.mark.parametrize("text, expected", [
    ("1,000.0", "1000"), ("$5", "5"), (" 0.50 ", "0.5"), ("-3.", "-3"), ("\\$ 5", "5"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("\\text{Monday}", "Monday"), ("x = y", "x=y"), ("   ", None), (None, None),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("completion, expected", [
    ("<think>2+3 is 5, or 6?</think> <answer> 5 </answer>", "5"),
    ("so \\boxed{\\dfrac{1}{2}}.", "\\frac{1}{2}"),
    ("Work 12 then\n#### 1,234\n", "1234"),
    ("The answer is: 42.", "42"),
    ("first 3 then 9", "9"),
    ("I cannot say", "Icannotsay"),  # free text votes on the whole (normalized) response
    ("", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


# ----------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    tok = load_tokenizer(str(tiny_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


ROWS = quickstart_rows(6, seed=3)


def test_evaluate_metric_relations_and_determinism(tiny):
    model, tok = tiny
    renderer = PromptRenderer(tok, "{question}", None, True)
    reward = RewardFunction("numeric_answer")
    model.train()
    rng_before = torch.get_rng_state()
    kwargs = dict(k=8, temperature=1.0, max_new_tokens=3, batch_size=10)
    records: list[dict] = []
    m = evaluate(model, tok, renderer, reward, ROWS, records=records, **kwargs)
    assert model.training  # mode restored
    assert torch.equal(torch.get_rng_state(), rng_before)  # seeded sampling runs on a forked RNG
    assert evaluate(model, tok, renderer, reward, ROWS, **kwargs) == m  # same seed, same samples
    for key in ("accuracy", "pass@1", "pass@2", "pass@4", "pass@8", "maj@8", "mean@8"):
        assert 0.0 <= m[f"eval/{key}"] <= 1.0, key
    assert m["eval/num_prompts"] == 6
    assert m["eval/pass@1"] == pytest.approx(m["eval/mean@8"])  # 0/1 rewards
    assert m["eval/pass@1"] <= m["eval/pass@2"] <= m["eval/pass@4"] <= m["eval/pass@8"]
    # the records agree with the metrics
    assert len(records) == 6 and all(len(r["samples"]) == 8 for r in records)
    assert m["eval/pass@8"] == pytest.approx(sum(r["num_correct"] > 0 for r in records) / 6)
    assert m["eval/accuracy"] == pytest.approx(sum(r["greedy"]["correct"] for r in records) / 6)
    assert [r["question"] for r in records] == [r["question"] for r in ROWS]


def test_evaluate_greedy_matches_unbatched_generate(tiny):
    """Batched, left-padded greedy evaluation equals generating each prompt alone."""
    model, tok = tiny
    renderer = PromptRenderer(tok, "{question}", None, True)
    reward = RewardFunction("numeric_answer")
    rows = quickstart_rows(12, seed=4)
    new = evaluate(model, tok, renderer, reward, rows, k=0, max_new_tokens=3, batch_size=7)
    correct, length = 0.0, 0
    for row in rows:
        ids = tok(renderer(row), return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        out = out.tolist()
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id) + 1]
        length += len(out)
        scores, _ = reward([tok.decode(out, skip_special_tokens=True)], [row])
        correct += scores[0]["correct"]
    assert new["eval/accuracy"] == pytest.approx(correct / len(rows))
    assert new["eval/response_length"] == pytest.approx(length / len(rows))
    assert not any("pass@" in key for key in new)


class ScriptedReward:
    """Judges sample s of prompt p by its position, ignoring the (random) text: for k=4, even
    prompts get answers [right, wrong, wrong, none], odd prompts [right, right, wrong, none]."""

    PATTERN = {0: ["right", "wrong", "wrong", None], 1: ["right", "right", "wrong", None]}

    def __init__(self, k: int):
        self.k, self.answers = k, iter(())

    def __call__(self, completions, rows):
        labels = [self.PATTERN[(j // self.k) % 2][j % self.k] for j in range(len(completions))]
        self.answers = iter(labels)
        return [{"reward": float(a == "right"), "correct": float(a == "right")} for a in labels], 0

    def extract_answer(self, completion):  # evaluate's maj@k uses it, in sample order
        return next(self.answers)


def test_evaluate_aggregates_per_prompt_scores(tiny):
    model, tok = tiny
    renderer = PromptRenderer(tok, "{question}", None, False)
    rows = quickstart_rows(4, seed=5)
    m = evaluate(model, tok, renderer, ScriptedReward(4), rows, k=4, greedy=False, max_new_tokens=2, batch_size=3)
    # even prompts: c=1 of 4; odd prompts: c=2 of 4
    assert m["eval/pass@1"] == pytest.approx((0.25 + 0.5) / 2)
    assert m["eval/pass@2"] == pytest.approx((pass_at_k(4, 1, 2) + pass_at_k(4, 2, 2)) / 2)
    assert m["eval/pass@4"] == 1.0
    assert m["eval/mean@4"] == pytest.approx(0.375)
    assert m["eval/maj@4"] == pytest.approx(0.5)  # odd prompts' majority is right, even prompts' wrong
    assert "eval/accuracy" not in m


def test_evaluate_rejects_nothing_to_do(tiny):
    model, tok = tiny
    renderer = PromptRenderer(tok, "{question}", None, False)
    with pytest.raises(ValueError, match="k >= 1 samples or greedy=True"):
        evaluate(model, tok, renderer, RewardFunction("numeric_answer"), ROWS, k=0, greedy=False, max_new_tokens=2)


# ----------------------------------------------------------------------------- recipe parts


def eval_cfg(**overrides):
    """``grpo_eval`` composed by Hydra with ``overrides``, after the recipe's command-line check."""
    from grpo_utils.config.cli import compose_jobs

    (cfg,) = compose_jobs([f"{k}={v}" for k, v in overrides.items()], CONFIG, "grpo_eval", mode=None)
    return cfg


def test_eval_config_every_key_documented():
    import dataclasses

    from grpo_utils.config.schema import EvalRunConfig

    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{prefix}{f.name} has no doc"
            if dataclasses.is_dataclass(f.type):
                walk(f.type, f"{prefix}{f.name}.")

    walk(EvalRunConfig)


@pytest.mark.parametrize("overrides, message", [
    ({"eval.k": -1}, "eval.k=-1 must be an integer >= 0"),
    ({"eval.k": 0, "eval.greedy": False}, "eval.greedy=false with eval.k=0 leaves nothing to evaluate"),
    ({"eval.split": "dev"}, "eval.split='dev' is unknown; expected train or test"),
    ({"generation.temperature": 0}, "generation.temperature=0.0 must be > 0"),
    ({"model.dtype": "int8"}, "model.dtype='int8'; expected one of"),
    ({"env.dataset": "math"}, "env.train_path is required for env.dataset=math"),
    ({"env.dataset": "gsm8k", "env.test_path": "/nope.jsonl"}, "env.test_path=/nope.jsonl: file not found"),
    ({"eval.typo": 1}, "unknown config key 'eval.typo'; allowed in 'eval':"),
    ({"env.countdown.typo": 1}, "unknown config key 'env.countdown.typo'"),
])
def test_validate_eval_config_names_the_key(overrides, message):
    # Unknown keys now stop at the command-line check (ConfigError), values at validation.
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_eval_config(eval_cfg(**overrides))


def test_validate_eval_config_accepts_the_shipped_config():
    validate_eval_config(eval_cfg())
    validate_eval_config(eval_cfg(**{"env.dataset": "countdown", "eval.k": 0}))


def test_resolve_model_dir(tiny_dir, tmp_path):
    assert resolve_model_dir(str(tiny_dir)) == str(tiny_dir)
    run = tmp_path / "run"
    for step in (2, 10):  # complete checkpoints: a HF model dir plus trainer_state.pt
        ckpt = run / "checkpoints" / f"step_{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "config.json").write_text("{}")
        (ckpt / "trainer_state.pt").write_bytes(b"")
    latest = str(run / "checkpoints" / "step_10")
    assert resolve_model_dir(str(run)) == latest
    assert resolve_model_dir(str(run / "checkpoints")) == latest
    assert resolve_model_dir(str(run / "checkpoints" / "step_2")) == str(run / "checkpoints" / "step_2")
    assert resolve_model_dir("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a hub name is passed through
    with pytest.raises(EvalConfigError, match=re.escape(f"model.name={tmp_path}: not a model directory")):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(EvalConfigError, match="no such model directory"):
        resolve_model_dir(str(tmp_path / "missing" / "model"))
    with pytest.raises(EvalConfigError, match="the only builtin is"):
        resolve_model_dir("builtin:nope")


def test_report_and_table():
    metrics = {"eval/num_prompts": 3.0, "eval/accuracy": 1 / 3, "eval/pass@1": 0.5, "eval/pass@2": 0.75,
               "eval/maj@2": 0.25, "eval/mean@2": 0.5}
    report = build_report(metrics, model="m", dataset="countdown", split="test", k=2, skipped_rows=1)
    assert {k: report[k] for k in ("model", "dataset", "split", "n_prompts", "k", "greedy_accuracy", "pass@2",
                                   "maj@2", "mean@2", "skipped_rows")} == {
        "model": "m", "dataset": "countdown", "split": "test", "n_prompts": 3, "k": 2,
        "greedy_accuracy": 1 / 3, "pass@2": 0.75, "maj@2": 0.25, "mean@2": 0.5, "skipped_rows": 1}
    assert report["metrics"]["pass@1"] == 0.5
    table = format_table(report)
    assert table.splitlines()[:3] == ["model            m", "dataset          countdown (test split, 3 prompts, k=2)",
                                      "greedy accuracy  0.3333"]
    assert "maj@2            0.2500" in table and "skipped rows     1" in table


def test_resolve_model_dir_passes_over_damaged_checkpoints(tok, tmp_path, capsys):
    """Checked against their manifests: a run dir gives its newest intact checkpoint (saying which
    it passed over); a damaged checkpoint named explicitly is refused."""
    from grpo_utils.models.tiny import build_model
    from grpo_utils.train.checkpoint import save_checkpoint

    run = tmp_path / "run"
    model = build_model(tok, hidden_size=16, num_layers=1)
    for step in (2, 4):
        save_checkpoint(run, step, model, tok, {"step": step})
    weights = run / "checkpoints" / "step_4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-20:] = bytes(b ^ 0xFF for b in data[-20:])
    weights.write_bytes(bytes(data))
    assert resolve_model_dir(str(run)) == str(run / "checkpoints" / "step_2")
    assert "checkpoints/step_4 is damaged (model.safetensors: checksum mismatch)" in capsys.readouterr().out
    with pytest.raises(EvalConfigError, match=r"step_4: damaged \(model.safetensors: checksum mismatch\)$"):
        resolve_model_dir(str(run / "checkpoints" / "step_4"))
