"""The console shows the progress bar, warnings and the summary; library details go to the run's log file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from grpo_utils.models.tiny import save_tiny

REPO = Path(__file__).resolve().parents[2]


def test_console_is_quiet_and_details_go_to_the_run_log(tmp_path):
    model = save_tiny(tmp_path / "model", hidden_size=32, num_layers=1)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "sota-implementations" / "grpo" / "grpo-sync.py"), f"model.name={model}",
         f"hydra.run.dir={run_dir}", "num_threads=1", "env.num_prompts=2", "env.group_size=4",
         "train.optim_batch_size=4", "train.max_steps=2", "generation.max_new_tokens=4", "eval.heldout_size=4",
         "eval.every_n_steps=0"],
        capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torchrl" not in proc.stdout and "torchrl" not in proc.stderr
    assert proc.stdout.splitlines()[0].startswith("steps done: 2")  # the summary, nothing before it
    assert "Initialized LazyTensorStorage" in (run_dir / "grpo-sync.log").read_text()
    assert (run_dir / "final_model" / "config.json").is_file()  # the run-directory contract's final model
