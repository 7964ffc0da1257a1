"""End to end: the async recipe (Ray collector actors + trainer) launched as a user launches it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from grpo_utils.tiny_model import save_tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "sota-implementations" / "grpo" / "grpo-async.py"
SYNC_RECIPE = REPO / "sota-implementations" / "grpo" / "grpo-sync.py"
RAY_DAEMONS = ("raylet", "gcs_server")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", hidden_size=32, num_layers=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    cache = os.environ.get("GRPO_CACHE_DIR") or str(tmp_path_factory.mktemp("cache"))
    return {**os.environ, "GRPO_CACHE_DIR": cache, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline",
            "RAY_USAGE_STATS_ENABLED": "0"}


def ray_daemons() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,comm=,args="], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines()
            if any(d in line for d in RAY_DAEMONS) and "ps -eo" not in line}


def assert_no_new_ray_processes(before: set[int], grace_s: float = 10.0) -> None:
    deadline = time.monotonic() + grace_s
    while (left := ray_daemons() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes left behind: {left}"


def run_async(env, *overrides: str, recipe: Path = RECIPE, timeout: float = 120,
              check: bool = True) -> subprocess.CompletedProcess:
    before = ray_daemons()
    proc = subprocess.run([sys.executable, str(recipe), "num_threads=1", *overrides], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert_no_new_ray_processes(before)
    if check and proc.returncode != 0:
        raise AssertionError(f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def tiny_overrides(tiny_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["mode=async", f"model.name={tiny_dir}", f"hydra.run.dir={run_dir}", "env.num_prompts=2",
            "env.group_size=4", "train.optim_batch_size=4", "train.grad_accum_steps=2",
            "generation.max_new_tokens=6", "eval.heldout_size=8", "eval.every_n_steps=0", "mode.actor_timeout_s=30",
            *extra]


def train_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if "reward/mean" in r]


def test_async_run_bounded_staleness_and_advancing_version(env, tiny_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_async(env, *tiny_overrides(tiny_dir, run_dir, "train.max_steps=8", "mode.max_staleness=1",
                                   "checkpoint.every_n_steps=4"))
    train = train_lines(run_dir)
    assert [r["step"] for r in train] == list(range(1, 9))
    for r in train:
        assert {"policy_version", "staleness/mean", "staleness/max", "buffer/size", "samples_dropped"} <= r.keys()
        assert 0 <= r["staleness/max"] <= 1
        assert 0 <= r["staleness/mean"] <= r["staleness/max"] and r["buffer/size"] >= 0
    versions = [r["policy_version"] for r in train]
    assert versions == sorted(versions) and versions[-1] >= 2, versions
    dropped = [r["samples_dropped"] for r in train]
    assert dropped == sorted(dropped)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_done"] == 8 and "heldout_accuracy_after" in summary
    assert (run_dir / "checkpoints" / "step_8" / "trainer_state.pt").is_file()


def test_max_staleness_zero_trains_only_fresh_samples(env, tiny_dir, tmp_path):
    run_dir = tmp_path / "fresh"
    run_async(env, *tiny_overrides(tiny_dir, run_dir, "train.max_steps=4", "mode.max_staleness=0",
                                   "eval.before_after=false"))
    train = train_lines(run_dir)
    assert len(train) == 4
    assert all(r["staleness/max"] == 0 and r["staleness/mean"] == 0 for r in train)
    assert train[-1]["policy_version"] >= 1


def test_dead_collector_stops_the_run_with_a_clear_message(env, tiny_dir, tmp_path):
    run_dir = tmp_path / "dead"
    t0 = time.monotonic()
    proc = run_async({**env, "GRPO_ASYNC_TEST_COLLECTOR_DIES_AFTER": "2"},
                     *tiny_overrides(tiny_dir, run_dir, "train.max_steps=200", "eval.before_after=false",
                                     "mode.max_staleness=5"), check=False, timeout=90)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: collector actor 0 died"), proc.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    # The batches the collector produced before dying were trained on and checkpointed.
    ckpts = list((run_dir / "checkpoints").glob("step_*"))
    assert ckpts and f"last checkpoint: step {ckpts[0].name[5:]}" in last


@pytest.mark.parametrize(
    ("recipe", "override", "expected"),
    [
        (RECIPE, "mode=sync", "config error: mode=sync cannot run with grpo-async.py"),
        (SYNC_RECIPE, "mode=async", "config error: mode=async cannot run with grpo-sync.py"),
    ],
)
def test_wrong_recipe_for_mode_fails_fast_with_one_line(env, tmp_path, recipe, override, expected):
    proc = run_async(env, f"hydra.run.dir={tmp_path / 'bad'}", *override.split(), recipe=recipe, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def _async_cfg(**mode):
    from omegaconf import OmegaConf

    return OmegaConf.create({"mode": {"name": "async", **mode}})


def test_resource_plan_fits_two_cores_and_names_what_is_short():
    import torch

    from grpo_utils.ray_resources import check_async_options, plan_resources

    plan = plan_resources(_async_cfg(cluster_cpus=2), torch.device("cpu"), available_gpus=0)
    assert (plan.ray_cpus, plan.ray_gpus, plan.trainer_threads) == (1, 0, 1)
    with pytest.raises(ValueError, match=r"not enough CPUs: .* = 3 CPUs, but the machine has 2 \(short by 1\)"):
        plan_resources(_async_cfg(cluster_cpus=2, num_collectors=2), torch.device("cpu"), available_gpus=0)
    with pytest.raises(ValueError, match=r"not enough GPUs: .*short by 2"):
        plan_resources(_async_cfg(cluster_cpus=8, collector_gpus=1), torch.device("cuda"), available_gpus=0)
    with pytest.raises(ValueError, match=r"mode.max_staleness=-1 must be >= 0"):
        check_async_options(_async_cfg(max_staleness=-1))
    check_async_options(_async_cfg())  # the defaults are valid


def test_sync_configs_need_no_async_keys():
    """The async keys are optional: the shipped sync mode file has only ``name``."""
    from omegaconf import OmegaConf

    assert set(OmegaConf.load(REPO / "config" / "mode" / "sync.yaml")) == {"name"}
    from grpo_utils.ray_resources import ASYNC_DEFAULTS

    assert set(OmegaConf.load(REPO / "config" / "mode" / "async.yaml")) == {"name", *ASYNC_DEFAULTS}
