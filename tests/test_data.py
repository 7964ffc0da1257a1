"""Tests for grpo_utils.data: JSONL reading, dataset splits, prompt rendering, prompt streams."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from grpo_utils.data import (
    DataError,
    PromptRenderer,
    PromptStream,
    _gsm8k_rows,
    load_split,
    quickstart_rows,
    read_jsonl,
)
from grpo_utils.tiny_model import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def gsm8k_file(split: str) -> Path:
    path = GSM8K / f"{split}.jsonl"
    if not path.is_file():
        pytest.skip(f"GSM8K data not present at {path}")
    return path


def env_cfg(**overrides):
    """The shipped config's ``env:`` section with overrides (a DictConfig, as the recipe passes)."""
    env = OmegaConf.load(REPO / "config" / "grpo_quickstart.yaml").env
    return OmegaConf.merge(env, OmegaConf.create(overrides))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ----------------------------------------------------------------------------- read_jsonl


def test_read_jsonl_reads_objects_and_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"a": 1}', "", "   ", '{"a": 2, "b": "x"}'])
    assert read_jsonl(path) == [{"a": 1}, {"a": 2, "b": "x"}]


def test_read_jsonl_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match=re.escape(f"data file not found: {missing}")):
        read_jsonl(missing)


def test_read_jsonl_bad_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"a": 1}', "", '{"a": 2,}'])  # bad row on line 3
    with pytest.raises(DataError, match=re.escape(f"{path}:3: not valid JSON")):
        read_jsonl(path)


def test_read_jsonl_rejects_non_objects_and_empty_files(tmp_path):
    path = write_lines(tmp_path / "list.jsonl", ['{"a": 1}', "[1, 2]"])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: expected a JSON object, got list")):
        read_jsonl(path)
    empty = write_lines(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(DataError, match=re.escape(f"{empty}: no rows")):
        read_jsonl(empty)


# ----------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize("split, expected_rows", [("train", 7473), ("test", 1319)])
def test_gsm8k_real_files_extract_final_answers(split, expected_rows):
    path = gsm8k_file(split)
    raw = read_jsonl(path)
    rows = load_split(env_cfg(dataset="gsm8k", train_path=str(path), test_path=str(path)), split)
    assert len(rows) == len(raw) == expected_rows
    with_commas = 0
    for r, row in zip(raw, rows):
        after = r["answer"].split("####")[-1].strip()
        with_commas += "," in after
        assert row["answer"] == after.replace(",", "")
        assert re.fullmatch(r"-?\d+(\.\d+)?", row["answer"]), row["answer"]
        assert row["solution"] == r["answer"]
        assert row["question"] == r["question"]
    assert with_commas > 0  # the files do contain "#### 1,234"-style answers, so commas were removed


def test_gsm8k_first_test_row_known_values():
    rows = _gsm8k_rows(gsm8k_file("test"))
    assert rows[0]["question"].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert rows[0]["answer"] == "18"
    assert rows[0]["solution"].endswith("#### 18")


def test_gsm8k_commas_removed_from_answer(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [
        json.dumps({"question": "q1", "answer": "Work.\n#### 1,234"}),
        json.dumps({"question": "q2", "answer": "x #### -5"}),
    ])
    rows = _gsm8k_rows(path)
    assert [r["answer"] for r in rows] == ["1234", "-5"]
    assert rows[0]["solution"] == "Work.\n#### 1,234"


def test_gsm8k_row_without_marker_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [
        json.dumps({"question": "q1", "answer": "#### 1"}),
        json.dumps({"question": "q2", "answer": "no final marker 7"}),
    ])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: expected GSM8K fields")):
        _gsm8k_rows(path)


def test_gsm8k_row_missing_question_is_an_error(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [json.dumps({"answer": "#### 1"})])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: expected GSM8K fields 'question'")):
        _gsm8k_rows(path)


def test_gsm8k_error_line_counts_blank_lines(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [
        json.dumps({"question": "q1", "answer": "#### 1"}),
        "",
        json.dumps({"question": "q2", "answer": "no marker"}),  # file line 3
    ])
    with pytest.raises(DataError, match=re.escape(f"{path}:3:")):
        _gsm8k_rows(path)


# ----------------------------------------------------------------------------- jsonl / load_split


def test_jsonl_dataset_custom_fields(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [
        json.dumps({"prompt": "2+2?", "target": 4, "meta": "a"}),
        json.dumps({"prompt": "10/4?", "target": 2.5, "meta": "b"}),
    ])
    test = write_lines(tmp_path / "test.jsonl", [json.dumps({"prompt": "1+1?", "target": "2"})])
    cfg = env_cfg(dataset="jsonl", train_path=str(train), test_path=str(test),
                  prompt_field="prompt", answer_field="target")
    rows = load_split(cfg, "train")
    assert [(r["question"], r["answer"], r["meta"]) for r in rows] == [("2+2?", "4", "a"), ("10/4?", "2.5", "b")]
    assert rows[0]["prompt"] == "2+2?" and rows[0]["target"] == 4  # original fields kept
    assert [(r["question"], r["answer"]) for r in load_split(cfg, "test")] == [("1+1?", "2")]


def test_jsonl_dataset_missing_field_names_file_line_and_field(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [
        json.dumps({"prompt": "a", "target": 1}),
        json.dumps({"prompt": "b"}),
    ])
    cfg = env_cfg(dataset="jsonl", train_path=str(path), prompt_field="prompt", answer_field="target")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: missing field 'target'")):
        load_split(cfg, "train")


def test_load_split_requires_path_and_known_dataset(tmp_path):
    with pytest.raises(DataError, match=re.escape("env.test_path is required for env.dataset=gsm8k")):
        load_split(env_cfg(dataset="gsm8k"), "test")
    with pytest.raises(DataError, match=re.escape("env.train_path is required for env.dataset=jsonl")):
        load_split(env_cfg(dataset="jsonl"), "train")
    with pytest.raises(DataError, match=r"env.dataset='csv' is unknown; expected one of quickstart, gsm8k, jsonl"):
        load_split(env_cfg(dataset="csv", train_path=str(tmp_path / "x")), "train")


def test_load_split_gsm8k_missing_file_is_named(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match=re.escape(f"data file not found: {missing}")):
        load_split(env_cfg(dataset="gsm8k", train_path=str(missing)), "train")


# ----------------------------------------------------------------------------- quickstart


def test_quickstart_split_heldout_disjoint_and_answers_correct():
    cfg = env_cfg(quickstart={"num_train": 3000, "num_test": 200})
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert len(train) == 3000 and len(test) == 200
    held_out = {r["question"] for r in test}
    assert not held_out & {r["question"] for r in train}
    for row in train + test:
        digits = [int(d) for d in row["question"].split()[1:]]
        assert row["question"] == "max " + " ".join(map(str, digits))
        assert len(digits) == 5 and row["digits"] == digits
        assert row["answer"] == str(max(digits))
    # deterministic: same config, same rows in the same order
    assert load_split(cfg, "train") == train and load_split(cfg, "test") == test
    # the training rows are still a seeded, varied sample (not degenerate)
    assert len({r["question"] for r in train}) > 2500
    assert {r["answer"] for r in train} == {str(d) for d in range(1, 10)}  # "0" needs 00000


def test_quickstart_rows_exclude_and_num_digits():
    base = quickstart_rows(50, seed=7)
    excluded = {base[0]["question"], base[3]["question"]}
    kept = quickstart_rows(50, seed=7, exclude=excluded)
    assert len(kept) == 50 and not excluded & {r["question"] for r in kept}
    short = quickstart_rows(5, seed=0, num_digits=2)
    assert all(len(r["digits"]) == 2 and r["answer"] == str(max(r["digits"])) for r in short)


# ----------------------------------------------------------------------------- PromptRenderer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


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
