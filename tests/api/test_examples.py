"""The examples/ scripts run as a user runs them (CPU, a tiny locally built model)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def run_example(name: str, out, env) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "examples" / name), str(out)], env=env, cwd=out.parent,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_api_quickstart_example_learns(env, tmp_path):
    out = run_example("api_quickstart.py", tmp_path / "out", env)
    before, after = map(float, re.search(r"held-out accuracy (\S+) -> (\S+);", out).groups())
    assert after - before >= 0.3, out
    assert (tmp_path / "out" / "final_model" / "model.safetensors").is_file()


def test_walkthrough_example_runs_every_cell(env, tmp_path):
    out = run_example("walkthrough.py", tmp_path / "out", env)
    assert "now at step 40" in out
    assert "grpo-sync.py hydra.run.dir=" in out
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-30", "checkpoint-40"]
