"""The recipe needs neither Ray nor vLLM when the config uses neither (local sync, transformers
backend): it runs in an interpreter where both are not installed (a GPU image without them)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_without, site_without, train_lines
from tests.recipes.test_sync_recipe import REQUIRED_KEYS, tiny_overrides

pytestmark = pytest.mark.slow  # launches the recipe in a subprocess


def test_local_sync_runs_without_ray_and_vllm(env, tiny_dir, tmp_path):
    hidden = ["ray", "vllm"]
    site_dir = site_without(hidden, tmp_path / "site")
    run_dir = tmp_path / "run"
    run_without(hidden, site_dir, env, *tiny_overrides(tiny_dir, run_dir, "train.max_steps=2", "loss.kl_coef=0.05",
                                                       "checkpoint.every_n_steps=2"))
    lines = train_lines(run_dir)
    assert [r["step"] for r in lines] == [1, 2] and REQUIRED_KEYS <= lines[0].keys()
    assert "kl_ref" in lines[0]
    assert (run_dir / "checkpoints" / "step_2").is_dir() and (run_dir / "final_model" / "config.json").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["steps_done"] == 2
