"""End to end: grpo-eval.py launched through Hydra, as a user launches it."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.helpers import EVAL_RECIPE, run_recipe

pytestmark = pytest.mark.slow  # each test launches the recipe in a subprocess


def run_eval(env, *overrides: str) -> subprocess.CompletedProcess:
    return run_recipe(env, *overrides, recipe=EVAL_RECIPE, check=False, timeout=300)


@pytest.mark.parametrize("dataset", ["quickstart", "countdown"])
def test_grpo_eval_end_to_end(env, tiny_dir, tmp_path, dataset):
    run_dir = tmp_path / "run"
    report_path = tmp_path / "reports" / "r.json"
    extra = [f"eval.report_path={report_path}", f"eval.samples_path={tmp_path / 's.jsonl'}"] \
        if dataset == "countdown" else []
    proc = run_eval(env, f"model.name={tiny_dir}", f"hydra.run.dir={run_dir}", f"env.dataset={dataset}",
                    "eval.k=4", "eval.max_prompts=6", "eval.batch_size=8", "generation.max_new_tokens=4", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((report_path if extra else run_dir / "eval_report.json").read_text())
    assert report["model"] == str(tiny_dir) and report["dataset"] == dataset and report["split"] == "test"
    assert report["n_prompts"] == 6 and report["k"] == 4
    for key in ("greedy_accuracy", "pass@1", "pass@2", "pass@4", "maj@4", "mean@4"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["pass@4"] >= report["pass@2"] >= report["pass@1"] == pytest.approx(report["mean@4"])
    # the table is printed
    assert f"dataset          {dataset} (test split, 6 prompts, k=4)" in proc.stdout
    assert re.search(r"^pass@4\s+\d\.\d{4}$", proc.stdout, re.M) and "Report: " in proc.stdout
    if extra:
        samples = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
        assert len(samples) == 6 and all(len(s["samples"]) == 4 for s in samples)
        assert all("numbers" not in s and s["answer"].isdigit() for s in samples)


def test_grpo_eval_bad_input_fails_fast_with_one_line(env, tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2"}\n')
    proc = run_eval(env, f"model.name={tiny_dir}", f"hydra.run.dir={tmp_path / 'run'}", "env.dataset=gsm8k",
                    f"env.test_path={bad}")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"data error: {bad}:2: expected GSM8K fields 'question' and 'answer' (ending in '#### N'), "
        "both strings; 'answer' is missing or null"]
    assert not (tmp_path / "run" / "eval_report.json").exists()
