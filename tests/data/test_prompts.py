"""Tests for grpo_utils.data.prompts: prompt rendering (chat, plain and R1-Zero templates) and
prompt streams (epochs, shuffling, resume)."""

from __future__ import annotations

import json
import re

import pytest

from grpo_utils.data.datasets import DataError
from grpo_utils.data.prompts import R1_ZERO_INSTRUCTION, PromptRenderer, PromptStream, renderer_from_config
from tests.helpers import env_cfg

# ----------------------------------------------------------------------------- PromptRenderer


def test_renderer_chat_template_exact_text(tok):
    row = {"question": "max 1 2", "answer": "2"}
    assert PromptRenderer(tok, "{question}", None, True)(row) == (
        "<|im_start|>user\nmax 1 2<|im_end|>\n<|im_start|>assistant\n")
    assert PromptRenderer(tok, "Q: {question}", "Be brief.", True)(row) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nQ: max 1 2<|im_end|>\n<|im_start|>assistant\n")


def test_renderer_plain_ignores_system_prompt(tok):
    row = {"question": "max 3 1", "answer": "3", "n": 2}
    assert PromptRenderer(tok, "{question} ({n} digits)", "ignored", False)(row) == "max 3 1 (2 digits)"


def test_renderer_bad_format_key_is_a_data_error(tok):
    r = PromptRenderer(tok, "{problem}", None, False)
    with pytest.raises(DataError, match=re.escape("env.prompt_format refers to 'problem' which the dataset rows lack")):
        r({"question": "q", "answer": "1"})


def test_renderer_chat_requires_a_template():
    class NoTemplate:
        chat_template = None

    with pytest.raises(DataError, match="env.chat_template=true but the tokenizer has no chat template"):
        PromptRenderer(NoTemplate(), "{question}", None, True)
    assert PromptRenderer(NoTemplate(), "{question}", None, False)({"question": "x"}) == "x"


# ----------------------------------------------------------------------------- PromptStream


ROWS = [{"id": i} for i in range(10)]


def ids(batches):
    return [[r["id"] for r in b] for b in batches]


def take(stream: PromptStream, n: int):
    return [stream.next_batch() for _ in range(n)]


def test_stream_covers_each_row_once_per_epoch_and_reshuffles():
    stream = PromptStream(ROWS, batch_size=4, seed=3)
    flat = [i for b in ids(take(stream, 10)) for i in b]  # 40 rows = 4 epochs exactly
    epochs = [flat[k:k + 10] for k in range(0, 40, 10)]
    for order in epochs:
        assert sorted(order) == list(range(10))
    assert len({tuple(o) for o in epochs}) == 4  # a fresh permutation every epoch
    assert epochs[0] != list(range(10))
    assert stream.state_dict() == {"epoch": 3, "position": 10}
    # same seed, same stream; different seed, different order
    assert [i for b in ids(take(PromptStream(ROWS, 4, seed=3), 10)) for i in b] == flat
    assert ids(take(PromptStream(ROWS, 4, seed=4), 3)) != ids(take(PromptStream(ROWS, 4, seed=3), 3))


def test_stream_without_shuffle_is_in_order_and_wraps():
    stream = PromptStream(ROWS, batch_size=4, seed=0, shuffle=False)
    assert ids(take(stream, 3)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    assert stream.state_dict() == {"epoch": 1, "position": 2}


def test_stream_iter_yields_batches():
    stream = PromptStream(ROWS, batch_size=3, seed=1)
    it = iter(stream)
    first = [next(it) for _ in range(2)]
    assert ids(first) == ids(take(PromptStream(ROWS, 3, seed=1), 2))


@pytest.mark.parametrize("consumed, batch_size", [(0, 4), (1, 4), (2, 4), (3, 4), (7, 4), (2, 5), (4, 5)])
def test_stream_resume_matches_uninterrupted(consumed, batch_size):
    uninterrupted = PromptStream(ROWS, batch_size, seed=11)
    take(uninterrupted, consumed)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # survives a JSON round trip
    if batch_size == 5 and consumed:  # stopped exactly at the end of an epoch, before the wrap
        assert state == {"epoch": consumed // 2 - 1, "position": 10}
    expected = ids(take(uninterrupted, 8))

    resumed = PromptStream(ROWS, batch_size, seed=11)
    take(resumed, 1)  # its own position must be fully overwritten
    resumed.load_state_dict(state)
    assert ids(take(resumed, 8)) == expected


# ----------------------------------------------------------------------------- templates


def test_renderer_r1_zero_exact_text(tok):
    row = {"question": "What is 2+3?", "answer": "5"}
    r = PromptRenderer(tok, "{question}", None, True, template="r1_zero")
    assert r(row) == (
        "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
        "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
        "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
        "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
        "<answer> answer here </answer>.\nUser: What is 2+3?\nAssistant: <think>")
    assert r.template == "r1_zero" and r.chat is False  # plain text, no chat template
    custom = PromptRenderer(tok, "Q: {question}", "Think first.", False, template="r1_zero")
    assert custom(row) == "Think first.\nUser: Q: What is 2+3?\nAssistant: <think>"
    assert R1_ZERO_INSTRUCTION in r(row)


def test_renderer_template_names_and_defaults(tok):
    row = {"question": "max 1 2"}
    chat = "<|im_start|>user\nmax 1 2<|im_end|>\n<|im_start|>assistant\n"
    assert PromptRenderer(tok, "{question}", None, False, template="chat")(row) == chat
    assert PromptRenderer(tok, "{question}", "sys", True, template="plain")(row) == "max 1 2"
    assert PromptRenderer(tok, "{question}", None, True).template == "chat"  # template=None: follow `chat`
    assert PromptRenderer(tok, "{question}", None, False).template == "plain"
    with pytest.raises(DataError, match=re.escape("env.template='xml' is unknown; expected one of plain, chat, r1_zero")):
        PromptRenderer(tok, "{question}", None, True, template="xml")


def test_renderer_from_config(tok):
    row = {"question": "max 1 2", "answer": "2"}
    r = renderer_from_config(env_cfg(template="r1_zero", prompt_format="Task: {question}"), tok)
    assert r(row).endswith("\nUser: Task: max 1 2\nAssistant: <think>") and r.prompt_format == "Task: {question}"
    r = renderer_from_config(env_cfg(chat_template=False), tok)  # no template key: chat_template decides
    assert r(row) == "max 1 2" and r.system_prompt is None and not r.chat
    r = renderer_from_config(env_cfg(system_prompt="Be brief."), tok)
    assert r.chat and r(row).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


# ----------------------------------------------------------------------------- prompts that fit the context


def fit(line: str, context: int | None, **splits):
    """``build.prompts_that_fit`` for the config of ``line`` and a model of ``context`` positions."""
    from types import SimpleNamespace

    from grpo_utils import build
    from grpo_utils.models.tiny import build_tokenizer
    from tests.config.test_command_lines import jobs

    (cfg,) = jobs(line)
    tok = build_tokenizer()  # one token per byte; the chat template: 3 special tokens and 16 bytes
    render = build.renderer(cfg.env, tok, next(iter(splits.values()))[0])
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=context))
    return build.prompts_that_fit(cfg, model, tok, render, **splits)


def gsm8k_rows(tmp_path, questions: list[str], line: str = ""):
    """A GSM8K file of ``questions`` (line i + 1: question i), loaded as the recipes load it."""
    from grpo_utils import build
    from tests.config.test_command_lines import jobs

    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": f"#### {i}"}) + "\n" for i, q in enumerate(questions)))
    line = f"env.dataset=gsm8k env.train_path={path} env.test_path={path} generation.max_new_tokens=8 {line}"
    train, test = build.rows(jobs(line)[0].env, heldout_size=0)
    return path, line, train, test


def test_a_huge_row_is_refused_by_length_before_it_is_tokenized(tmp_path):
    huge = "x" * 10_000_000  # + the chat template's 50 characters
    path, line, train, _ = gsm8k_rows(tmp_path, ["short", huge, "y" * 600])
    with pytest.raises(DataError) as info:
        fit(line, 512, train=train)
    assert str(info.value) == (
        f"{path}:2: the prompt is 10000050 characters, certainly more than 504 tokens; the model's context of 512 "
        "tokens leaves 504 for a prompt after generation.max_new_tokens=8 (env.skip_bad_rows=true skips such rows)")


def test_a_row_too_long_for_the_context_names_file_line_and_lengths(tmp_path):
    path, line, train, test = gsm8k_rows(tmp_path, ["short", "y" * 600, "z" * 490])
    with pytest.raises(DataError) as info:
        fit(line, 512, train=train, test=test)
    # 600 bytes + the chat template's 16 bytes and 3 special tokens
    assert str(info.value).startswith(f"{path}:2: the prompt is 619 tokens; the model's context of 512 tokens leaves "
                                      "504 for a prompt after generation.max_new_tokens=8")
    assert "\n" not in str(info.value)
    (kept,) = fit(line, 1024, train=train)  # a bigger context holds them all
    assert kept == train and kept.skipped == 0


def test_too_long_rows_are_skipped_and_counted_with_skip_bad_rows(tmp_path, capsys):
    path, line, rows, test = gsm8k_rows(tmp_path, ["short", "x" * 10_000_000, "y" * 600, "ok"],
                                        line="env.skip_bad_rows=true")
    train, test = fit(line, 512, train=rows, test=test)
    assert [r["question"] for r in train] == ["short", "ok"] and train.skipped == 2 and train.lines == [1, 4]
    assert test.skipped == 2  # the held-out file (the same one here) is checked too
    assert "skipped 2 train rows whose prompt is too long: the model's context of 512 tokens leaves 504" in \
        capsys.readouterr().out
    with pytest.raises(DataError, match=re.escape(f"{path}: no prompt fits (4 rows too long; the model's context of "
                                                  "16 tokens leaves 8")):
        fit(line, 16, train=rows)


def test_generated_rows_are_named_by_split_and_index():
    from grpo_utils.data.datasets import Rows, quickstart_rows

    rows = Rows(quickstart_rows(3, seed=1), source="generated")
    with pytest.raises(DataError, match=r"^env.dataset=quickstart \(train split\): row 0: the prompt is 3\d tokens; "
                                        r"the model's context of 24 tokens leaves 20 for a prompt after "
                                        r"generation.max_new_tokens=4 \(env.skip_bad_rows=true skips such rows\)$"):
        fit("", 24, train=rows)
    assert fit("", 64, train=rows) == (rows,)


def test_context_comes_from_the_model_then_the_engine_then_the_tokenizer():
    from grpo_utils.data.datasets import Rows, quickstart_rows
    from grpo_utils.errors import ConfigError

    rows = Rows(quickstart_rows(3, seed=1), source="generated")
    with pytest.raises(ConfigError, match=r"^generation.max_new_tokens=4 leaves no room for a prompt in the model's "
                                          r"context of 4 tokens$"):
        fit("", 4, train=rows)
    with pytest.raises(DataError, match=r"inference_model.max_model_len=24 leaves 20 for a prompt"):
        fit("inference_model.backend=vllm inference_model.max_model_len=24", 512, train=rows)
    # no length in the model's config, and the tiny tokenizer's model_max_length is transformers' "unknown"
    assert fit("", None, train=rows) == (rows,)
