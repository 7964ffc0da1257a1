"""Tests for grpo_utils.data.datasets: JSONL reading, the datasets, their splits and validation.
Prompt rendering and prompt streams are in test_prompts.py."""

from __future__ import annotations

import ast
import json
import re
from fractions import Fraction
from functools import cache
from itertools import combinations
from pathlib import Path

import pytest

from grpo_utils.data.datasets import (
    DataError,
    Rows,
    _gsm8k_rows,
    countdown_question,
    countdown_rows,
    last_boxed_answer,
    load_split,
    quickstart_rows,
    read_jsonl,
    split_heldout,
    validate_env,
)
from tests.helpers import SHARED_DATA as SHARED
from tests.helpers import env_cfg

GSM8K = SHARED / "gsm8k"


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"shared data not present at {path}")
    return path


def gsm8k_file(split: str) -> Path:
    return shared_file("gsm8k", f"{split}.jsonl")


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
    with pytest.raises(DataError, match=re.escape(
            "env.dataset='csv' is unknown; expected one of quickstart, gsm8k, math, ifeval, countdown, jsonl")):
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


# ----------------------------------------------------------------------------- MATH


@pytest.mark.parametrize("name, expected_rows", [("train.jsonl", 7496), ("math500_test.jsonl", 500)])
def test_math_shared_files(name, expected_rows):
    path = shared_file("math", name)
    raw = read_jsonl(path)
    rows = load_split(env_cfg(dataset="math", train_path=str(path), test_path=str(path)), "test")
    assert isinstance(rows, Rows) and rows.skipped == 0 and len(rows) == len(raw) == expected_rows
    for r, row in zip(raw, rows):
        assert row["question"] == r["problem"] and row["answer"] == r["answer"].strip()
        assert (row["level"], row["subject"], row["solution"]) == (r["level"], r["subject"], r["solution"])
        # without the answer field the solution's last \\boxed{} gives the same answer
        assert last_boxed_answer(r["solution"]) == row["answer"]
    assert any("\\frac" in row["answer"] for row in rows)  # nested-brace answers are represented


def test_math500_first_row_known_values():
    rows = load_split(env_cfg(dataset="math", test_path=str(shared_file("math", "math500_test.jsonl"))), "test")
    assert rows[0]["question"].startswith("Convert the point $(0,3)$ in rectangular coordinates")
    assert rows[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert (rows[0]["subject"], rows[0]["level"]) == ("Precalculus", 2)


@pytest.mark.parametrize("text, expected", [
    ("so $x = \\boxed{5}$.", "5"),
    ("\\boxed{\\frac{1}{2}} then \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # the last one, nested
    ("$\\boxed{\\{1, 2\\}}$", "\\{1, 2\\}"),  # escaped (set) braces do not close the group
    ("\\fbox{ 7 }", "7"),
    ("the answer is $\\boxed 42$.", "42"),
    ("\\boxed{3} and a broken \\boxed{4", "3"),  # an unbalanced box is ignored
    ("no box here: 12", None),
])
def test_last_boxed_answer(text, expected):
    assert last_boxed_answer(text) == expected


def test_math_answer_from_solution_and_type_alias(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [
        json.dumps({"problem": "p1", "solution": "so $\\boxed{\\dfrac{3}{4}}$", "level": "Level 3", "type": "Algebra"}),
        json.dumps({"problem": "p2", "solution": "x \\boxed{1}", "answer": "2"}),  # an answer field wins
        json.dumps({"problem": "p3", "solution": "x \\boxed{9}", "answer": ""}),   # an empty one does not
    ])
    rows = load_split(env_cfg(dataset="math", train_path=str(path), test_path=str(path)), "train")
    assert [(r["question"], r["answer"]) for r in rows] == [("p1", "\\dfrac{3}{4}"), ("p2", "2"), ("p3", "9")]
    assert rows[0]["subject"] == rows[0]["type"] == "Algebra" and rows[0]["level"] == "Level 3"


def test_math_row_without_answer_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [
        json.dumps({"problem": "p1", "solution": "\\boxed{1}"}),
        json.dumps({"problem": "p2", "solution": "no box"}),
    ])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: expected MATH fields 'problem' and 'solution'")):
        load_split(env_cfg(dataset="math", train_path=str(path), test_path=str(path)), "train")


# ----------------------------------------------------------------------------- IFEval


def test_ifeval_shared_file_keeps_fields():
    path = shared_file("ifeval", "input_data.jsonl")
    raw = read_jsonl(path)
    rows = load_split(env_cfg(dataset="ifeval", test_path=str(path)), "test")
    assert len(rows) == len(raw) == 541
    for r, row in zip(raw, rows):
        assert row["question"] == r["prompt"] and row["answer"] == ""
        assert (row["key"], row["instruction_id_list"], row["kwargs"]) == (r["key"], r["instruction_id_list"], r["kwargs"])
    assert rows[0]["key"] == 1000 and rows[0]["instruction_id_list"][0] == "punctuation:no_comma"
    assert rows[0]["kwargs"][1] == {"num_highlights": 3}


def test_ifeval_bad_row_names_file_and_line(tmp_path):
    good = {"key": 1, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    path = write_lines(tmp_path / "i.jsonl", [json.dumps(good), json.dumps({**good, "kwargs": []})])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: expected IFEval fields 'prompt'")):
        load_split(env_cfg(dataset="ifeval", test_path=str(path)), "test")


# ----------------------------------------------------------------------------- countdown


def reachable(numbers: list[int]) -> set[Fraction]:
    """Every value of every expression over a sub-multiset of ``numbers`` (each used at most once)
    with + - * /, by brute force."""
    @cache
    def exact(ms: tuple[int, ...]) -> frozenset[Fraction]:  # values using all of ms
        if len(ms) == 1:
            return frozenset({Fraction(ms[0])})
        out = set()
        idx = range(len(ms))
        for r in range(1, len(ms)):
            for left in combinations(idx, r):
                if 0 not in left:  # each unordered split once; both operand orders below
                    continue
                right = tuple(ms[i] for i in idx if i not in left)
                for a in exact(tuple(ms[i] for i in left)):
                    for b in exact(right):
                        out |= {a + b, a - b, b - a, a * b}
                        out |= {a / b} if b else set()
                        out |= {b / a} if a else set()
        return frozenset(out)

    values = set()
    for r in range(1, len(numbers) + 1):
        for subset in combinations(sorted(numbers), r):
            values |= exact(subset)
    return values


def eval_expression(expr: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the numbers it uses."""
    used = []

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            used.append(node.value)
            return Fraction(node.value)
        ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
               ast.Div: lambda a, b: a / b}
        return ops[type(node.op)](ev(node.left), ev(node.right))

    return ev(ast.parse(expr, mode="eval")), used


def test_countdown_targets_reachable_by_brute_force():
    rows = countdown_rows(40, seed=5, min_numbers=3, max_numbers=4, max_number=30, max_target=200)
    for row in rows:
        numbers, target = row["numbers"], row["target"]
        assert 3 <= len(numbers) <= 4 and all(1 <= x <= 30 for x in numbers)
        assert 1 <= target <= 200 and target not in numbers and row["answer"] == str(target)
        assert Fraction(target) in reachable(numbers), row
        value, used = eval_expression(row["solution"])
        assert value == target and sorted(used) == sorted(numbers)  # the witness uses each number once
        assert row["question"] == countdown_question(numbers, target)
    assert {len(r["numbers"]) for r in rows} == {3, 4}


def test_countdown_question_text():
    assert countdown_question([3, 7, 25], 46) == (
        "Using the numbers [3, 7, 25], create an equation that equals 46. You can use basic arithmetic "
        "operations (+, -, *, /) and each number can be used at most once.")


def test_countdown_splits_deterministic_disjoint_and_seeded():
    cfg = env_cfg(dataset="countdown", countdown={"num_train": 300, "num_test": 50, "seed": 0})
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert len(train) == 300 and len(test) == 50 and train.source == "generated"
    assert load_split(cfg, "train") == train and load_split(cfg, "test") == test
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert [r["question"] for r in train[:50]] != [r["question"] for r in test]  # another seed stream
    other = load_split(env_cfg(dataset="countdown", countdown={"num_train": 300, "num_test": 50, "seed": 1}), "test")
    assert [r["question"] for r in other] != [r["question"] for r in test]
    assert all(max(r["numbers"]) <= 99 and r["target"] <= 999 for r in train)  # the defaults
    # the number of numbers is configurable
    five = load_split(env_cfg(dataset="countdown", countdown={"num_test": 10, "min_numbers": 5, "max_numbers": 5}),
                      "test")
    assert all(len(r["numbers"]) == 5 for r in five)


def test_countdown_bad_settings():
    with pytest.raises(DataError, match="min_numbers"):
        countdown_rows(3, seed=0, min_numbers=1, max_numbers=2)
    with pytest.raises(DataError, match=re.escape("env.countdown.min_numbers=4 must be >= 2 and <= "
                                                  "env.countdown.max_numbers=3")):
        validate_env(env_cfg(dataset="countdown", countdown={"min_numbers": 4, "max_numbers": 3}))
    with pytest.raises(DataError, match="could only generate"):  # no integer target in range exists
        countdown_rows(2, seed=0, min_numbers=2, max_numbers=2, max_number=1, max_target=1)


# ----------------------------------------------------------------------------- held-out slices


def numbered_file(tmp_path: Path, n: int, dup: int | None = None) -> Path:
    lines = [json.dumps({"prompt": f"q{i}", "target": i}) for i in range(n)]
    if dup is not None:
        lines.append(json.dumps({"prompt": f"q{dup}", "target": -1}))  # a duplicate question
    return write_lines(tmp_path / "d.jsonl", lines)


@pytest.mark.parametrize("holdout, size", [({"heldout_fraction": 0.2}, 10), ({"heldout_count": 7}, 7),
                                           ({"heldout_count": 3, "heldout_fraction": 0.5}, 3)])
def test_heldout_slice_of_train(tmp_path, holdout, size):
    path = numbered_file(tmp_path, 50)
    cfg = env_cfg(dataset="jsonl", train_path=str(path), test_path=None, prompt_field="prompt",
                  answer_field="target", **holdout)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert len(test) == size and len(train) == 50 - size
    assert sorted(r["target"] for r in train + test) == list(range(50))  # a partition of the file
    assert [r["target"] for r in test] == sorted(r["target"] for r in test)  # file order
    assert load_split(cfg, "test") == test and load_split(cfg, "train") == train  # fixed draw
    assert [r["target"] for r in test] != list(range(size))  # not just the head of the file


def test_heldout_removes_duplicate_questions_from_train(tmp_path):
    rows = [{"question": f"q{i % 5}", "answer": str(i)} for i in range(10)]  # every question twice
    train, heldout = split_heldout(rows, 2)
    held = {r["question"] for r in heldout}
    assert len(heldout) == 2 and not held & {r["question"] for r in train}
    assert len(train) == 10 - 2 * len(held)


def test_heldout_errors(tmp_path):
    path = numbered_file(tmp_path, 5)
    base = dict(dataset="jsonl", train_path=str(path), prompt_field="prompt", answer_field="target")
    with pytest.raises(DataError, match="exclusive"):
        load_split(env_cfg(**base, test_path=str(path), heldout_count=2), "test")
    with pytest.raises(DataError, match="hold out 5 of 5 rows; at least one must remain"):
        load_split(env_cfg(**base, test_path=None, heldout_count=5), "train")
    with pytest.raises(DataError, match=re.escape("env.test_path is required for env.dataset=jsonl (or hold out")):
        load_split(env_cfg(**base, test_path=None), "test")


def test_generated_datasets_ignore_heldout_settings():
    cfg = env_cfg(dataset="quickstart", heldout_fraction=0.5, quickstart={"num_train": 30, "num_test": 10})
    assert len(load_split(cfg, "train")) == 30 and len(load_split(cfg, "test")) == 10


# ----------------------------------------------------------------------------- malformed rows


BAD_LINES = [
    json.dumps({"question": "q1", "answer": "#### 1"}),
    '{"question": "q2", "answer": ',  # line 2: not JSON
    "",
    "[1, 2]",  # line 4: not an object
    json.dumps({"question": "q5", "answer": "5"}),  # line 5: no #### marker
    json.dumps({"question": "q6", "answer": "#### 6"}),
]


def test_bad_rows_error_names_the_first_bad_line(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", BAD_LINES)
    with pytest.raises(DataError, match=re.escape(f"{path}:2: not valid JSON")):
        load_split(env_cfg(dataset="gsm8k", train_path=str(path), test_path=str(path)), "train")
    path = write_lines(tmp_path / "g2.jsonl", [BAD_LINES[0], BAD_LINES[4]])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: expected GSM8K fields 'question' and 'answer'")):
        load_split(env_cfg(dataset="gsm8k", train_path=str(path), test_path=str(path)), "train")


def test_skip_bad_rows_skips_and_counts(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", BAD_LINES)
    cfg = env_cfg(dataset="gsm8k", train_path=str(path), test_path=str(path), skip_bad_rows=True)
    rows = load_split(cfg, "train")
    assert [r["answer"] for r in rows] == ["1", "6"] and rows.skipped == 3 and rows.source == str(path)
    # a held-out slice of the same file: the skipped rows are counted once, on the train split
    held = env_cfg(dataset="gsm8k", train_path=str(path), test_path=None, heldout_count=1, skip_bad_rows=True)
    assert load_split(held, "train").skipped == 3 and load_split(held, "test").skipped == 0
    jsonl = write_lines(tmp_path / "j.jsonl", [json.dumps({"p": "a", "t": 1}), json.dumps({"p": "b"})])
    jcfg = env_cfg(dataset="jsonl", train_path=str(jsonl), prompt_field="p", answer_field="t", skip_bad_rows=True)
    rows = load_split(jcfg, "train")
    assert [r["question"] for r in rows] == ["a"] and rows.skipped == 1


GOOD_ROW = json.dumps({"question": "q1", "answer": "#### 1"})


def write_bytes(path: Path, lines: list[bytes], prefix: bytes = b"") -> Path:
    path.write_bytes(prefix + b"".join(line + b"\n" for line in lines))
    return path


def gsm8k_env(path: Path, **overrides):
    return env_cfg(dataset="gsm8k", train_path=str(path), test_path=str(path), **overrides)


@pytest.mark.parametrize(("name", "lines", "message"), [
    ("non_utf8", [GOOD_ROW.encode(), b'{"question": "caf\xe9", "answer": "#### 2"}', GOOD_ROW.encode()],
     "not valid UTF-8 (byte 0xe9 at byte 18 of the line)"),
    ("list_answer", [GOOD_ROW.encode(), json.dumps({"question": "q", "answer": ["#### 2"]}).encode()],
     "expected GSM8K fields 'question' and 'answer' (ending in '#### N'), both strings; 'answer' is a list"),
    ("number_answer", [GOOD_ROW.encode(), json.dumps({"question": "q", "answer": 2}).encode()],
     "expected GSM8K fields 'question' and 'answer' (ending in '#### N'), both strings; 'answer' is a number"),
    ("null_question", [GOOD_ROW.encode(), json.dumps({"question": None, "answer": "#### 2"}).encode()],
     "expected GSM8K fields 'question' and 'answer' (ending in '#### N'), both strings; 'question' is missing or "
     "null"),
])
def test_bad_row_is_one_line_with_file_line_or_skipped_and_counted(tmp_path, name, lines, message):
    path = write_bytes(tmp_path / f"{name}.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_split(gsm8k_env(path), "train")
    assert str(info.value) == f"{path}:2: {message}"
    rows = load_split(gsm8k_env(path, skip_bad_rows=True), "train")
    assert rows.skipped == 1 and len(rows) == len(lines) - 1 and rows[0]["answer"] == "1"
    assert rows.lines == [1, 3][: len(lines) - 1]  # each kept row's file line, for later checks


def test_utf8_bom_does_not_spoil_the_first_row(tmp_path):
    path = write_bytes(tmp_path / "bom.jsonl", [GOOD_ROW.encode(), json.dumps({"question": "q2", "answer": "#### 2"})
                                                .encode()], prefix=b"\xef\xbb\xbf")
    rows = load_split(gsm8k_env(path), "train")
    assert [(r["question"], r["answer"]) for r in rows] == [("q1", "1"), ("q2", "2")] and rows.skipped == 0
    assert read_jsonl(path)[0] == {"question": "q1", "answer": "#### 1"}
    # a BOM anywhere else is not UTF-8's byte-order mark but a character inside the line
    later = write_bytes(tmp_path / "later.jsonl", [GOOD_ROW.encode(), b"\xef\xbb\xbf" + GOOD_ROW.encode()])
    with pytest.raises(DataError, match=re.escape(f"{later}:2: not valid JSON")):
        read_jsonl(later)


def test_math_answer_that_is_a_list_names_file_line(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps({"problem": "1+1?", "answer": 2}),
                                              json.dumps({"problem": "2+2?", "answer": ["4"]})])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: expected MATH fields") + r".*'answer' is a list"):
        load_split(env_cfg(dataset="math", train_path=str(path), test_path=str(path)), "train")
    rows = load_split(env_cfg(dataset="math", train_path=str(path), test_path=str(path), skip_bad_rows=True), "train")
    assert [r["answer"] for r in rows] == ["2"] and rows.skipped == 1


def test_heldout_slice_keeps_file_lines(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [json.dumps({"question": f"q{i}", "answer": f"#### {i}"})
                                              for i in range(1, 11)])
    cfg = env_cfg(dataset="gsm8k", train_path=str(path), test_path=None, heldout_count=3)
    for split in ("train", "test"):
        rows = load_split(cfg, split)
        assert [int(r["answer"]) for r in rows] == rows.lines  # row i of this file is on line i
        assert rows.where(0) == f"{path}:{rows.lines[0]}"


def test_skip_bad_rows_with_nothing_valid_is_an_error(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", ["nope", "[]"])
    with pytest.raises(DataError, match=re.escape(f"{path}: no valid rows (2 malformed rows skipped)")):
        load_split(env_cfg(dataset="gsm8k", train_path=str(path), skip_bad_rows=True), "train")


def test_jsonl_without_answer_field(tmp_path):
    path = write_lines(tmp_path / "j.jsonl", [json.dumps({"p": "write a haiku"})])
    rows = load_split(env_cfg(dataset="jsonl", train_path=str(path), prompt_field="p", answer_field=None), "train")
    assert rows == [{"p": "write a haiku", "question": "write a haiku", "answer": ""}]


# ----------------------------------------------------------------------------- validate_env


@pytest.mark.parametrize("overrides, splits, message", [
    ({"dataset": "math"}, ("train", "test"), "env.train_path is required for env.dataset=math"),
    ({"dataset": "math", "test_path": "/nope/t.jsonl"}, ("test",), "env.test_path=/nope/t.jsonl: file not found"),
    ({"dataset": "gsm8k", "heldout_fraction": 1.5}, ("train",), "env.heldout_fraction=1.5 must be in [0, 1)"),
    ({"dataset": "gsm8k", "heldout_count": -1}, ("train",), "env.heldout_count=-1 must be >= 0"),
    ({"dataset": "ifeval", "template": "llama"}, ("test",), "env.template='llama' is unknown"),
    ({"dataset": "countdown", "countdown": {"num_test": 0}}, ("test",), "env.countdown.num_test=0 must be >= 1"),
])
def test_validate_env_names_the_key(overrides, splits, message):
    with pytest.raises(DataError, match=re.escape(message)):
        validate_env(env_cfg(**overrides), splits)


def test_validate_env_accepts_good_settings(tmp_path):
    path = numbered_file(tmp_path, 5)
    validate_env(env_cfg(dataset="countdown"))  # generated: no paths needed
    validate_env(env_cfg(dataset="quickstart", template="r1_zero"))
    validate_env(env_cfg(dataset="math", test_path=str(path)), ("test",))  # eval on a test file only
    validate_env(env_cfg(dataset="math", train_path=str(path), heldout_fraction=0.1))  # held out of train


# ---- a dataset of the user's own: env.dataset=<dotted path of a function (split, env) -> rows> --------


def user_rows(split, env):
    """A user's dataset function, as ``env.dataset=tests.data.test_datasets.user_rows`` names it."""
    n = 6 if split == "train" else 2
    return ({"question": f"{split} {i} + {i}?", "answer": str(2 * i)} for i in range(n))


def no_rows(split, env):
    return []


def test_user_dataset_function_is_called_per_split():
    from grpo_utils.data.datasets import validate_env

    env = env_cfg(dataset="tests.data.test_datasets.user_rows")
    validate_env(env)
    train, test = load_split(env, "train"), load_split(env, "test")
    assert [r["answer"] for r in train] == ["0", "2", "4", "6", "8", "10"]
    assert test[1] == {"question": "test 1 + 1?", "answer": "2"}
    assert train.source == "tests.data.test_datasets.user_rows" and train.skipped == 0


def test_user_dataset_errors_are_one_line():
    from grpo_utils.data.datasets import validate_env

    with pytest.raises(DataError, match=r"^env.dataset=my_pkg.nowhere.rows cannot be imported \("):
        validate_env(env_cfg(dataset="my_pkg.nowhere.rows"))
    with pytest.raises(DataError, match=r"^env.dataset='squad' is unknown; expected one of .*or the dotted path"):
        validate_env(env_cfg(dataset="squad"))
    with pytest.raises(DataError, match=r"^env.dataset=tests.data.test_datasets.no_rows: the train split is empty$"):
        load_split(env_cfg(dataset="tests.data.test_datasets.no_rows"), "train")
