"""End to end with ``inference_model.backend=vllm`` (the real CPU engine): the sync recipe learns the
quick start and resumes exactly, an interrupted run leaves no process behind, and on Ray (sync and
async) the collectors' engines follow the trainer's weights."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import REPO, SYNC_RECIPE, recipe_command, run_and_resume, run_recipe, train_lines

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

VLLM = "inference_model.backend=vllm"


def tiny_overrides(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [VLLM, f"model.name={model_dir}", f"hydra.run.dir={run_dir}", "env.num_prompts=2", "env.group_size=4",
            "train.optim_batch_size=4", "train.grad_accum_steps=2", "generation.max_new_tokens=6",
            "eval.heldout_size=8", "eval.every_n_steps=0", *extra]


def assert_synced(lines: list[dict], max_mismatch_kl: float = 1e-6) -> None:
    """Every batch after the first sync carries a passing probe; vLLM and the trainer agree."""
    assert all(r["mismatch_kl"] <= max_mismatch_kl for r in lines), [r["mismatch_kl"] for r in lines]
    probes = [r["weight_sync/probe_max_abs_diff"] for r in lines if "weight_sync/probe_max_abs_diff" in r]
    assert probes and all(0 <= p <= 1e-3 for p in probes), probes


def test_quickstart_learns_with_vllm(env, tmp_path):
    run_dir = tmp_path / "run"
    run_recipe(env, VLLM, f"hydra.run.dir={run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["heldout_accuracy_after"] - summary["heldout_accuracy_before"] >= 0.3, summary
    lines = train_lines(run_dir)
    assert len(lines) == 60
    assert_synced(lines)


def test_vllm_resume_continues_exactly(env, vllm_dir, tmp_path):
    """Steps 3-4 after resuming from step 2 equal the uninterrupted run's: the engine is reloaded
    with the checkpoint's weights and samples with the same per-request seeds."""
    args = ["train.max_steps=4", "checkpoint.every_n_steps=2", "checkpoint.keep_last=null", "seed=3"]
    full, resumed = run_and_resume(env, lambda run_dir, *extra: tiny_overrides(vllm_dir, run_dir, *extra),
                                   tmp_path, args)
    ref = {r["step"]: r for r in train_lines(full)}
    got = {r["step"]: r for r in train_lines(resumed)}
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("reward/mean", "response_length/mean", "loss", "grad_norm", "entropy", "mismatch_kl"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-4, abs=1e-6), (step, key)
    a = AutoModelForCausalLM.from_pretrained(full / "checkpoints" / "step_4")
    b = AutoModelForCausalLM.from_pretrained(resumed / "checkpoints" / "step_4")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert_synced(list(got.values()))


def test_sigterm_stops_a_vllm_run_with_one_line_and_leaves_no_process(env, vllm_dir, tmp_path):
    import psutil

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(vllm_dir, run_dir, "train.max_steps=500", "eval.before_after=false",
                               "checkpoint.every_n_steps=0")
    proc = subprocess.Popen(recipe_command(SYNC_RECIPE, *overrides),
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(train_lines(run_dir)) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("error: terminated (SIGTERM); last checkpoint: step "), err[-2000:]
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.cmdline() for p in alive]


@pytest.mark.ray
@pytest.mark.parametrize("in_flight", [False, True], ids=["between-batches", "in-flight"])
def test_async_vllm_collectors_follow_the_trainer(env, vllm_dir, tmp_path, in_flight):
    from tests.distributed.test_async import run_async

    run_dir = tmp_path / "run"
    # The collective weight sync: bucketed broadcasts (gloo here, NCCL on GPUs) into the collector,
    # which reloads the engine from the received tensors; in flight, between chunks of one token.
    extra = ["mode.in_flight_updates=true", "mode.in_flight_chunk_tokens=1"] if in_flight else []
    run_async(env, "mode=async", *tiny_overrides(vllm_dir, run_dir, "train.max_steps=6", "mode.max_staleness=1",
                                                 "mode.actor_timeout_s=120", "mode.weight_sync=collective", *extra),
              timeout=300)
    lines = train_lines(run_dir)
    if in_flight:  # every batch says how much of it weights newer than its first token's sampled
        assert all(0 <= r["inflight/new_token_fraction"] <= 1 and r["inflight/versions_spanned"] >= 0
                   for r in lines)
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert all(0 <= r["staleness/max"] <= 1 for r in lines)
    versions = [r["policy_version"] for r in lines]
    assert versions == sorted(versions) and versions[-1] >= 2, versions
    # In async the trainer's behaviour log-probs are computed from newer weights than the
    # collector's engine sampled with: the mismatch is real staleness, bounded but not ~0.
    assert all(r["mismatch_kl"] >= 0 for r in lines)
    probes = [r["weight_sync/probe_max_abs_diff"] for r in lines if "weight_sync/probe_max_abs_diff" in r]
    assert probes and all(p <= 1e-3 for p in probes), probes


@pytest.mark.ray
def test_sync_on_ray_vllm_collector_samples_each_batch_from_the_newest_weights(env, vllm_dir, tmp_path):
    from tests.distributed.test_async import run_async

    run_dir = tmp_path / "run"
    run_async(env, "mode=sync", "mode.ray=true", *tiny_overrides(vllm_dir, run_dir, "train.max_steps=4",
                                                                 "mode.actor_timeout_s=120"),
              recipe=SYNC_RECIPE, timeout=300)
    lines = train_lines(run_dir)
    assert [r["policy_version"] for r in lines] == [0, 0, 1, 1]  # two optimizer steps per batch
    assert_synced(lines)  # age 0: the engine sampled with exactly the weights the trainer starts from
