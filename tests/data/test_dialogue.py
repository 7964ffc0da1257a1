"""The ``dialogue`` dataset (ConvAI2-style JSONL -> chat messages ending with the user's turn), its
rendering under each template, and its default reward (text_similarity, with distinct-n)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from grpo_utils.config.cli import compose_jobs
from grpo_utils.config.validate import reward_config
from grpo_utils.data.datasets import DATASET_REWARDS, DataError, load_split, validate_env
from grpo_utils.data.prompts import R1_ZERO_INSTRUCTION, PromptRenderer, renderer_from_config
from grpo_utils.errors import ConfigError
from grpo_utils.rewards import build_reward
from grpo_utils.train.run import check_run
from tests.helpers import CONFIG, env_cfg

ROWS = [
    {"persona": ["i like dogs.", "i ski."], "context": "At a cafe.", "history": ["hi", "hello!", "do you ski?"],
     "response": "yes, every winter."},
    {"persona": "i am a chef.", "history": ["what do you cook?"], "response": ["pasta.", "mostly pasta."]},
    {"history": ["nice weather", "sunny indeed", "going out?", "maybe later"], "response": "have fun!"},
    {"context": "", "persona": [], "history": ["bye"], "response": "see you"},
]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def dialogue_env(path: Path, **overrides):
    return env_cfg(dataset="dialogue", train_path=str(path), test_path=str(path), **overrides)


def roles(row: dict) -> list[str]:
    return [m["role"] for m in row["messages"]]


def test_rows_become_messages_ending_with_the_users_turn(tmp_path):
    rows = load_split(dialogue_env(write_rows(tmp_path / "d.jsonl", ROWS)), "train")
    assert len(rows) == 4 and rows.skipped == 0
    first, chef, even, bare = rows
    assert first["messages"] == [
        {"role": "system", "content": "Your persona: i like dogs. i ski.\nAt a cafe."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "do you ski?"},
    ]
    assert first["answer"] == "yes, every winter." and first["question"] == "do you ski?"
    assert chef["messages"][0] == {"role": "system", "content": "Your persona: i am a chef."}
    assert chef["answer"] == ["pasta.", "mostly pasta."]  # several gold responses
    # four turns: counted back from the last (the user's), so the first is the assistant's
    assert roles(even) == ["assistant", "user", "assistant", "user"]
    assert roles(bare) == ["user"]  # empty persona and context: no system message
    for row in rows:
        body = [r for r in roles(row) if r != "system"]
        assert body[-1] == "user" and all(a != b for a, b in zip(body, body[1:]))
        assert row["question"] == row["history"][-1]


def test_system_prompt_comes_first_in_the_system_message(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", ROWS)
    first, _, even, _ = load_split(dialogue_env(path, system_prompt="Be kind."), "train")
    assert first["messages"][0]["content"] == "Be kind.\nYour persona: i like dogs. i ski.\nAt a cafe."
    assert even["messages"][0] == {"role": "system", "content": "Be kind."}


@pytest.mark.parametrize("row, expected", [
    ({"response": "x"}, "expected dialogue field 'history': a non-empty list of non-empty strings"),
    ({"history": [], "response": "x"}, "expected dialogue field 'history'"),
    ({"history": "hi", "response": "x"}, "expected dialogue field 'history'"),
    ({"history": ["hi", " "], "response": "x"}, "expected dialogue field 'history'"),
    ({"history": ["hi"]}, "expected dialogue field 'response': a non-empty string, or a non-empty list"),
    ({"history": ["hi"], "response": ""}, "expected dialogue field 'response'"),
    ({"history": ["hi"], "response": ["ok", 3]}, "expected dialogue field 'response'"),
    ({"history": ["hi"], "response": "x", "persona": {"a": 1}}, "expected dialogue field 'persona': a string or "
                                                                 "a list of strings"),
    ({"history": ["hi"], "response": "x", "persona": ["ok", None]}, "expected dialogue field 'persona'"),
    ({"history": ["hi"], "response": "x", "context": 7}, "expected dialogue field 'context': a string"),
])
def test_bad_row_names_file_line_and_what_was_expected(tmp_path, row, expected):
    path = write_rows(tmp_path / "d.jsonl", [ROWS[0], "", row])  # the bad row is on line 3
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:3: {expected}")) as info:
        load_split(dialogue_env(path), "train")
    assert "\n" not in str(info.value)


def test_skip_bad_rows_skips_and_counts(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [ROWS[0], {"history": []}, "not json", ROWS[1], {"history": ["hi"]}])
    rows = load_split(dialogue_env(path, skip_bad_rows=True), "train")
    assert [r["question"] for r in rows] == ["do you ski?", "what do you cook?"] and rows.skipped == 3


def test_paths_and_heldout_are_checked_as_for_jsonl(tmp_path):
    with pytest.raises(DataError, match=re.escape("env.train_path is required for env.dataset=dialogue")):
        validate_env(env_cfg(dataset="dialogue"))
    with pytest.raises(DataError, match=re.escape("env.test_path is required for env.dataset=dialogue (or hold")):
        load_split(env_cfg(dataset="dialogue", train_path=str(tmp_path / "d.jsonl")), "test")
    # the same last turn in different conversations is not a duplicate prompt: only the held-out row goes
    path = write_rows(tmp_path / "d.jsonl", [{"history": [f"topic {i}", "ok", "hi"], "response": str(i)}
                                             for i in range(6)])
    cfg = env_cfg(dataset="dialogue", train_path=str(path), heldout_count=2)
    validate_env(cfg)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert len(test) == 2 and len(train) == 4
    assert sorted(r["answer"] for r in train + test) == [str(i) for i in range(6)]


# ----------------------------------------------------------------------------- rendering


def test_chat_template_renders_the_messages_exactly(tok, tmp_path):
    path = write_rows(tmp_path / "d.jsonl", ROWS)
    env = dialogue_env(path, system_prompt="Be kind.")
    first = load_split(env, "train")[0]
    assert renderer_from_config(env, tok)(first) == (  # the system prompt once, from the loader
        "<|im_start|>system\nBe kind.\nYour persona: i like dogs. i ski.\nAt a cafe.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello!<|im_end|>\n"
        "<|im_start|>user\ndo you ski?<|im_end|>\n<|im_start|>assistant\n")
    bare = load_split(dialogue_env(path), "train")[3]
    assert PromptRenderer(tok, "{question}", None, True)(bare) == (
        "<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n")


def test_plain_and_r1_zero_templates_render_a_transcript(tok, tmp_path):
    first = load_split(dialogue_env(write_rows(tmp_path / "d.jsonl", ROWS)), "train")[0]
    transcript = "Your persona: i like dogs. i ski.\nAt a cafe.\nUser: hi\nAssistant: hello!\nUser: do you ski?"
    assert PromptRenderer(tok, "{question}", None, False, template="plain")(first) == transcript + "\nAssistant:"
    assert PromptRenderer(tok, "{question}", None, False, template="r1_zero")(first) == (
        f"{R1_ZERO_INSTRUCTION}\n{transcript}\nAssistant: <think>")
    with pytest.raises(DataError, match=re.escape("a row's 'messages' must be a non-empty list of {role, content}")):
        PromptRenderer(tok, "{question}", None, True)({"messages": [{"role": "user"}]})


# ----------------------------------------------------------------------------- reward


def test_reward_defaults_to_text_similarity_and_takes_distinct_from_the_command_line(tmp_path):
    assert DATASET_REWARDS["dialogue"] == "text_similarity"
    (cfg,) = compose_jobs(["env.dataset=dialogue"], CONFIG, "grpo_quickstart", "sync")
    assert reward_config(cfg)["name"] == "text_similarity"
    path = write_rows(tmp_path / "d.jsonl", ROWS)
    line = [f"env.train_path={path}", f"env.test_path={path}", "env.dataset=dialogue",
            "reward.name=text_similarity", "+reward.distinct_weight=1"]
    (cfg,) = compose_jobs(line, CONFIG, "grpo_quickstart", "sync")
    check_run(cfg, "sync", available_gpus=0)
    reward = build_reward(reward_config(cfg))
    chef = load_split(cfg.env, "train")[1]
    (score,), failures = reward(["mostly pasta."], [chef])  # the best of the gold responses counts
    assert failures == 0 and score["f1"] == score["rougeL"] == score["bleu"] == score["distinct2"] == 1.0
    assert score["reward"] == 1.0
    (cfg,) = compose_jobs(line[:-1] + ["+reward.distinct_n=0"], CONFIG, "grpo_quickstart", "sync")
    with pytest.raises(ConfigError, match=r"^reward.distinct_n=0 must be >= 1$"):
        check_run(cfg, "sync", available_gpus=0)
    with pytest.raises(ConfigError, match=re.escape("a reward's options are added with +reward.<option>=...")):
        compose_jobs(line[:-1] + ["reward.distinct_weight=1"], CONFIG, "grpo_quickstart", "sync")
