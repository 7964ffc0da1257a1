"""`python -m grpo_utils.rewards`: offline scoring of a JSONL file, end to end in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import REPO, SHARED_DATA

GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"  # ../shared/data from the repo root

try:
    import grpo_utils.rewards.ifeval  # noqa: F401
    HAS_IFEVAL = True
except ImportError:
    HAS_IFEVAL = False


def run_cli(*args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (REPO, pythonpath) if p)
    return subprocess.run([sys.executable, "-m", "grpo_utils.rewards", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_gsm8k_end_to_end(tmp_path):
    rows = [{"prompt": "2+2?", "completion": "so #### 4", "answer": "4", "id": 1},
            {"prompt": "3+3?", "completion": "maybe 5", "answer": "6", "id": 2},
            {"prompt": "cost?", "completion": "The answer is $1,200.", "answer": "1200", "id": 3}]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "sub" / "scored.jsonl"
    proc = run_cli("--reward", "gsm8k", "--input", src, "--output", out, "--option", "format_weight=0.5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"scored 3 rows with gsm8k -> {out}: mean reward 1.0000, mean correct 0.6667, "
                                   "failures 0 (timeouts 0)")
    scored = read_jsonl(out)
    assert scored == [{**rows[0], "reward": 1.5, "correct": 1.0, "format": 1.0},
                      {**rows[1], "reward": 0.0, "correct": 0.0, "format": 0.0},
                      {**rows[2], "reward": 1.5, "correct": 1.0, "format": 1.0}]


@pytest.mark.parametrize("name", ["gsm8k", "numeric_answer"])
def test_official_gsm8k_rows_answering_themselves_all_score_one(tmp_path, name):
    """Rows as GSM8K ships them (``answer``: the worked solution ending in ``#### N``), each scored
    with its own answer as the completion: the reward reads the reference itself."""
    if not GSM8K_TEST.is_file():
        pytest.skip(f"GSM8K data not present at {GSM8K_TEST}")
    rows = read_jsonl(GSM8K_TEST)
    src = write_jsonl(tmp_path / "official.jsonl", [{**r, "completion": r["answer"]} for r in rows])
    out = tmp_path / "scored.jsonl"
    proc = run_cli("--reward", name, "--input", src, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"scored {len(rows)} rows with {name} -> {out}: mean reward 1.0000, "
                                   "mean correct 1.0000, failures 0 (timeouts 0)")
    assert proc.stderr == ""
    scored = read_jsonl(out)
    assert len(scored) == len(rows) == 1319
    assert all(s["reward"] == 1.0 and s["correct"] == 1.0 and "reward_error" not in s for s in scored)


def test_failing_rows_are_reported_not_fatal(tmp_path):
    """Offline scoring never stops on the consecutive-failure rule: every row is written, failed ones
    with their reason, and one stderr line counts them (a user reward calling exit included)."""
    (tmp_path / "cli_exit_rewards.py").write_text(textwrap.dedent('''
        import sys

        def leaves(prompt, completion, **row):
            if row["id"] % 2:
                sys.exit(3)
            return 1.0
    '''))
    rows = [{"prompt": "p", "completion": "c", "id": i} for i in range(600)]  # 3 chunks of the CLI
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    proc = run_cli("--reward", "callable", "--option", "_target_=cli_exit_rewards.leaves", "--input", src,
                   "--output", out, pythonpath=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("mean reward 0.5000, failures 300 (timeouts 0)")
    assert proc.stderr == ("warning: reward callable failed on 300/600 rows (last: SystemExit(3) raised by the "
                           "reward); see their reward_error\n")
    scored = read_jsonl(out)
    assert len(scored) == 600 and scored[1]["reward_error"] == "callable: SystemExit(3) raised by the reward"

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"completion": "#### 4", "answer": "abc"}] * 600)
    proc = run_cli("--reward", "gsm8k", "--input", bad, "--output", out)
    assert proc.returncode == 0 and len(read_jsonl(out)) == 600  # 3 all-failing chunks: no RewardError
    assert proc.stderr == ("warning: reward gsm8k failed on 600/600 rows (last: ValueError: reference "
                           "row['answer']='abc' is not a number); see their reward_error\n")


def test_countdown_end_to_end(tmp_path):
    base = {"prompt": "Use 3 5 7 2 to make 26", "numbers": [3, 5, 7, 2], "target": 26}
    completions = ["<answer>3*7+5</answer>", "<answer>3*7+5+3-3</answer>",
                   "<answer>__import__('os').system('echo pwned')</answer>", "<answer>9**9**9</answer>"]
    src = write_jsonl(tmp_path / "cd.jsonl", [{**base, "completion": c} for c in completions])
    out = tmp_path / "cd_scored.jsonl"
    proc = run_cli("--reward", "countdown", "--input", src, "--output", out, "--timeout-s", "5")
    assert proc.returncode == 0, proc.stderr
    assert "pwned" not in proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("mean reward 0.2500, mean correct 0.2500, failures 0 (timeouts 0)")
    scored = read_jsonl(out)
    assert [(s["correct"], s["format"], s["valid"]) for s in scored] == [
        (1.0, 1.0, 1.0), (0.0, 1.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)]
    assert all(s["numbers"] == [3, 5, 7, 2] and s["target"] == 26 for s in scored)


def test_weighted_sum_from_config_reports_failed_rows(tmp_path):
    (tmp_path / "cli_user_rewards.py").write_text(textwrap.dedent('''
        def picky(prompt, completion, **row):
            if row["id"] == 2:
                raise ValueError("cannot score row 2")
            return {"reward": len(prompt), "plen": len(prompt)}
    '''))
    config = tmp_path / "reward.yaml"
    config.write_text(textwrap.dedent('''
        reward:
          timeout_s: 5
          components:
            - {name: gsm8k, weight: 1.0}
            - {name: callable, _target_: cli_user_rewards.picky, weight: 0.1, label: plen}
    '''))
    src = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "abc", "completion": "#### 4", "answer": "4", "id": 1},
                                                {"prompt": "abcd", "completion": "#### 4", "answer": "4", "id": 2}])
    out = tmp_path / "scored.jsonl"
    proc = run_cli("--config", config, "--input", src, "--output", out, pythonpath=tmp_path)
    assert proc.returncode == 0, proc.stderr
    first, second = read_jsonl(out)
    assert first["reward"] == pytest.approx(1.3) and first["plen/plen"] == 3.0 and first["gsm8k/correct"] == 1.0
    assert "reward_error" not in first
    assert second["reward"] == 0.0 and second["reward_error"] == "plen: ValueError: cannot score row 2"
    assert proc.stdout.strip().endswith("failures 1 (timeouts 0)")


@pytest.mark.skipif(not HAS_IFEVAL, reason="grpo_utils.rewards.ifeval is not importable")
def test_ifeval_end_to_end_writes_per_instruction_results(tmp_path):
    row = {"key": 1, "prompt": "Write two words, no commas, all lowercase.",
           "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [{}, {}]}
    src = write_jsonl(tmp_path / "if.jsonl", [{**row, "completion": "hello world"},
                                              {**row, "completion": "Hello, world"}])
    out = tmp_path / "if_scored.jsonl"
    proc = run_cli("--reward", "ifeval", "--input", src, "--output", out)
    assert proc.returncode == 0, proc.stderr
    good, bad = read_jsonl(out)
    assert good["reward"] == 1.0 and good["correct"] == 1.0
    assert bad["reward"] == 0.0 and bad["correct"] == 0.0
    assert [(i["instruction_id"], i["strict"], i["loose"]) for i in good["instructions"]] == [
        ("punctuation:no_comma", True, True), ("change_case:english_lowercase", True, True)]
    assert [i["strict"] for i in bad["instructions"]] == [False, False]


@pytest.mark.parametrize("lines, args, message", [
    (None, ("--reward", "gsm8k"), "error: input file not found: {src}"),
    (['{"completion": "#### 1", "answer": "1"}', "", "{not json"], ("--reward", "gsm8k"),
     "error: {src}:3: malformed JSON (Expecting property name enclosed in double quotes)"),
    (['[1, 2]'], ("--reward", "gsm8k"), "error: {src}:1: expected a JSON object, got list"),
    (['{"completion": "#### 1", "answer": "1"}', '{"completion": "#### 2"}'], ("--reward", "gsm8k"),
     "error: {src}:2: missing field 'answer' needed by reward 'gsm8k'"),
    (['{"answer": "1"}'], ("--reward", "gsm8k"), "error: {src}:1: missing field 'completion' needed by reward 'gsm8k'"),
    (['{"completion": "x", "numbers": [1]}'], ("--reward", "countdown"),
     "error: {src}:1: missing field 'target' needed by reward 'countdown'"),
    (['{"completion": "x"}'], ("--reward", "math"), "error: {src}:1: missing field 'answer' (or 'solution') needed by reward 'math'"),
    (['{"completion": "x", "answer": "1"}'], ("--reward", "gsm8k", "--option", "fromat_weight=1"),
     "error: reward.fromat_weight is not an option of reward 'gsm8k'; its options: format_weight, require_format"),
    (['{"completion": "x", "answer": "1"}'], ("--reward", "gsm8k", "--option", "format_weight"),
     "error: --option 'format_weight' must look like key=value"),
    (['{"completion": "x", "answer": "1"}'], ("--reward", "bleu"), "error: reward.name='bleu' is unknown; expected one of"),
    ([], ("--reward", "gsm8k"), "error: {src}: no rows"),
])
def test_cli_errors_are_one_line(tmp_path, lines, args, message):
    src = tmp_path / "in.jsonl"
    if lines is not None:
        write_jsonl(src, lines)
    out = tmp_path / "out.jsonl"
    proc = run_cli(*args, "--input", src, "--output", out)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message.format(src=src)), proc.stderr
    assert proc.stderr.count("\n") == 1 and not out.exists()


def test_cli_list_names_every_reward():
    proc = run_cli("--list")
    assert proc.returncode == 0
    for name in ("gsm8k", "math", "countdown", "text_similarity", "reward_model", "callable", "ifeval"):
        assert f"\n{name}: " in "\n" + proc.stdout
