"""End to end: the async recipe (Ray collector actors + trainer) launched as a user launches it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]  # recipe runs in the Ray modes, in a subprocess

from tests.helpers import (  # noqa: E402
    ASYNC_RECIPE,
    REPO,
    SYNC_RECIPE,
    assert_succeeded,
    free_port,
    recipe_command,
    run_recipe,
    train_lines,
)

RECIPE = ASYNC_RECIPE
RAY_DAEMONS = ("raylet", "gcs_server")


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
    """run_recipe, checking that the run leaves no Ray process behind (also when it fails)."""
    before = ray_daemons()
    proc = run_recipe(env, *overrides, recipe=recipe, timeout=timeout, check=False)
    assert_no_new_ray_processes(before)
    if check:
        assert_succeeded(proc)
    return proc


def assert_same_training(a: list[dict], b: list[dict]) -> None:
    """Two runs' training lines agree step by step (rewards, losses, versions, lengths)."""
    for key in ("reward/mean", "loss", "policy_version", "response_length/mean"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5, abs=1e-6), key


def tiny_overrides(tiny_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["mode=async", f"model.name={tiny_dir}", f"hydra.run.dir={run_dir}", "env.num_prompts=2",
            "env.group_size=4", "train.optim_batch_size=4", "train.grad_accum_steps=2",
            "generation.max_new_tokens=6", "eval.heldout_size=8", "eval.every_n_steps=0", "mode.actor_timeout_s=30",
            *extra]


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
    proc = run_async({**env, "GRPO_TEST_COLLECTOR_DIES_AFTER": "2"},
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


# ---- sync on Ray (grpo-sync.py mode.ray=true) ---------------------------------------------------

def sync_ray_overrides(tiny_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [o for o in tiny_overrides(tiny_dir, run_dir, "mode.ray=true", *extra) if o != "mode=async"]


def test_sync_on_ray_sync_iter_trains_only_fresh_samples(env, tiny_dir, tmp_path):
    run_dir = tmp_path / "sync_ray"
    run_async(env, *sync_ray_overrides(tiny_dir, run_dir, "train.max_steps=6", "eval.before_after=false"),
              recipe=SYNC_RECIPE)
    train = train_lines(run_dir)
    assert [r["step"] for r in train] == list(range(1, 7))
    assert all(r["staleness/max"] == 0 and r["staleness/mean"] == 0 for r in train)
    # Two optimizer steps per batch (8 samples, 4 per step), one weight push per batch.
    assert [r["policy_version"] for r in train] == [0, 0, 1, 1, 2, 2]


def test_sync_on_ray_without_sync_iter_trains_one_version_behind(env, tiny_dir, tmp_path):
    run_dir = tmp_path / "sync_ray_overlap"
    run_async(env, *sync_ray_overrides(tiny_dir, run_dir, "train.max_steps=6", "eval.before_after=false",
                                       "mode.sync_iter=false"), recipe=SYNC_RECIPE)
    train = train_lines(run_dir)
    # The first batch is made before any update; each later one while training on the one before.
    assert [r["staleness/max"] for r in train] == [0, 0, 1, 1, 1, 1]


def test_sync_on_ray_resume_equals_uninterrupted_run(env, tiny_dir, tmp_path):
    common = ("train.max_steps=4", "eval.before_after=false", "checkpoint.every_n_steps=2", "checkpoint.keep_last=null")
    full, part = tmp_path / "full", tmp_path / "part"
    run_async(env, *sync_ray_overrides(tiny_dir, full, *common), recipe=SYNC_RECIPE)
    run_async(env, *sync_ray_overrides(tiny_dir, part, *common[1:], "train.max_steps=2"), recipe=SYNC_RECIPE)
    run_async(env, *sync_ray_overrides(tiny_dir, part, *common, "resume=true"), recipe=SYNC_RECIPE)
    a, b = train_lines(full), train_lines(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert_same_training(a, b)


def test_sync_on_ray_dead_collector_stops_the_run(env, tiny_dir, tmp_path):
    run_dir = tmp_path / "sync_dead"
    t0 = time.monotonic()
    proc = run_async({**env, "GRPO_TEST_COLLECTOR_DIES_AFTER": "2"},
                     *sync_ray_overrides(tiny_dir, run_dir, "train.max_steps=50", "eval.before_after=false"),
                     recipe=SYNC_RECIPE, check=False, timeout=90)
    assert proc.returncode != 0 and time.monotonic() - t0 < 60
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: collector actor 0 died"), proc.stderr[-2000:]
    # Both batches were trained on (2 steps each) and the step reached is checkpointed.
    assert last.endswith("last checkpoint: step 4"), last
    assert (run_dir / "checkpoints" / "step_4" / "trainer_state.pt").is_file()


# ---- async: several collectors, resume -----------------------------------------------------------

def test_two_collectors_both_feed_the_trainer_over_a_collective_weight_sync(env, tiny_dir, tmp_path):
    run_dir = tmp_path / "two"
    run_async(env, *tiny_overrides(tiny_dir, run_dir, "train.max_steps=12", "eval.before_after=false",
                                   "mode.num_collectors=2", "mode.collector_cpus=0.5", "mode.max_staleness=2",
                                   "mode.weight_sync=collective"))
    train = train_lines(run_dir)
    assert {r["collector"] for r in train} == {0, 1}
    assert all(r["staleness/max"] <= 2 for r in train)
    # Weights reached the collectors through the broadcast group: later batches carry newer versions.
    batch_versions = [r["policy_version"] - r["staleness/max"] for r in train]
    assert max(batch_versions) >= 2, batch_versions


def test_async_resume_continues_steps_versions_and_prompt_streams(env, tiny_dir, tmp_path):
    import torch

    run_dir = tmp_path / "resume"
    common = ("eval.before_after=false", "checkpoint.every_n_steps=2", "checkpoint.keep_last=null")
    run_async(env, *tiny_overrides(tiny_dir, run_dir, *common, "train.max_steps=4"))
    first = torch.load(run_dir / "checkpoints" / "step_4" / "trainer_state.pt", weights_only=True)
    run_async(env, *tiny_overrides(tiny_dir, run_dir, *common, "train.max_steps=8", "resume=true"))
    train = train_lines(run_dir)
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(r["policy_version"] >= first["policy_version"] for r in train[4:])
    last = torch.load(run_dir / "checkpoints" / "step_8" / "trainer_state.pt", weights_only=True)
    assert last["policy_version"] > first["policy_version"]
    # The collector's prompt stream went on from where the trainer had consumed it.
    pos = lambda s: (s["collectors"][0]["prompts"]["epoch"], s["collectors"][0]["prompts"]["position"])  # noqa: E731
    assert pos(last) > pos(first)


@pytest.mark.parametrize(("mode", "sig"), [("async", "SIGINT"), ("sync_ray", "SIGTERM"), ("sync_local", "SIGTERM")])
def test_interrupted_run_checkpoints_the_step_reached_and_leaves_no_ray_process(env, tiny_dir, tmp_path, mode, sig):
    import signal

    import torch

    run_dir = tmp_path / mode
    extra = ("train.max_steps=500", "eval.before_after=false", "checkpoint.every_n_steps=0")
    if mode == "async":
        overrides, recipe = tiny_overrides(tiny_dir, run_dir, *extra), RECIPE
    else:
        overrides, recipe = sync_ray_overrides(tiny_dir, run_dir, *extra), SYNC_RECIPE
        if mode == "sync_local":
            overrides = [o for o in overrides if o != "mode.ray=true"]
    before = ray_daemons()
    # A shell's background job inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: give the run the default disposition, as a terminal would.
    proc = subprocess.Popen(recipe_command(recipe, *overrides), env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(train_lines(run_dir)) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert_no_new_ray_processes(before)
    logged = train_lines(run_dir)[-1]["step"]
    last = err.strip().splitlines()[-1]
    prefix = "interrupted" if sig == "SIGINT" else "error: terminated (SIGTERM)"
    assert proc.returncode == (130 if sig == "SIGINT" else 1) and last.startswith(f"{prefix}; last checkpoint: step "), \
        err[-2000:]
    reached = int(last.rsplit(" ", 1)[1])
    # The signal may land between an optimizer step and its metrics line: that step is saved too.
    assert reached in (logged, logged + 1) and reached < 500, (reached, logged)
    state = torch.load(run_dir / "checkpoints" / f"step_{reached}" / "trainer_state.pt", weights_only=True)
    assert state["step"] == reached


def test_sync_on_ray_restarted_collector_continues_exactly(env, tiny_dir, tmp_path):
    """A collector that dies is restarted at the trainer's position: the run equals an uninterrupted one."""
    common = ("train.max_steps=6", "eval.before_after=false", "mode.max_restarts=1")
    run_async(env, *sync_ray_overrides(tiny_dir, tmp_path / "full", *common), recipe=SYNC_RECIPE)
    proc = run_async({**env, "GRPO_TEST_COLLECTOR_DIES_AFTER": "2"},
                     *sync_ray_overrides(tiny_dir, tmp_path / "restarted", *common), recipe=SYNC_RECIPE)
    assert "collector actor 0 died" in proc.stdout and "restarting it (1/1)" in proc.stdout
    a, b = train_lines(tmp_path / "full"), train_lines(tmp_path / "restarted")
    assert [r["collector_restarts"] for r in b] == [0, 0, 0, 0, 1, 1]
    assert_same_training(a, b)


def test_async_restarts_a_dead_collector_then_stops_when_restarts_run_out(env, tiny_dir, tmp_path):
    run_dir = tmp_path / "restarts"
    t0 = time.monotonic()
    proc = run_async({**env, "GRPO_TEST_COLLECTOR_DIES_AFTER": "2"},
                     *tiny_overrides(tiny_dir, run_dir, "train.max_steps=200", "eval.before_after=false",
                                     "mode.max_staleness=5", "mode.max_restarts=1", "mode.buffer_size=1"),
                     check=False, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - t0 < 90
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: collector actor 0 died") and "(after 1 restart(s), mode.max_restarts=1)" in last
    train = train_lines(run_dir)
    # Two actors' lifetimes of 2 batches each (2 steps per batch): more than one actor alone made.
    assert train[-1]["step"] == 8 and train[-1]["collector_restarts"] == 1, [r["step"] for r in train]


def test_torchrl_collector_engine_runs_inside_the_ray_actor(env, tiny_dir, tmp_path):
    run_dir = tmp_path / "engine"
    run_async(env, *sync_ray_overrides(tiny_dir, run_dir, "train.max_steps=4", "eval.before_after=false",
                                       "rollout=collector"), recipe=SYNC_RECIPE)
    train = train_lines(run_dir)
    assert [r["staleness/max"] for r in train] == [0, 0, 0, 0]
    assert [r["policy_version"] for r in train] == [0, 0, 1, 1]
    assert all(0.0 <= r["reward/mean"] <= 1.0 and r["response_length/mean"] > 0 for r in train)


@pytest.mark.parametrize("extra", [
    # KL in the reward: the trainer (which holds the reference) assigns the advantages.
    ("loss.kl_coef=0.1", "loss.kl_in=reward"),
    # Sampler-vs-trainer correction and DAPO shaping, all applied in the actor.
    ("loss=dapo", "loss.is_correction=truncate"),
])
def test_async_with_reference_kl_and_off_policy_corrections(env, tiny_dir, tmp_path, extra):
    run_dir = tmp_path / "variants"
    run_async(env, *tiny_overrides(tiny_dir, run_dir, "train.max_steps=4", "eval.before_after=false",
                                   "mode.max_staleness=2", *extra))
    train = train_lines(run_dir)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    if "loss.kl_in=reward" in extra:
        assert all("kl_reward_penalty/mean" in r for r in train)
    else:
        # The actor sent its sampler log-probs (first token repaired): the gap is small, not missing.
        assert all(0 <= r["mismatch_kl"] < 0.05 for r in train), [r.get("mismatch_kl") for r in train]


def test_local_sync_checkpoint_resumes_on_ray_at_the_same_prompt_position(env, tiny_dir, tmp_path):
    import torch

    run_dir = tmp_path / "switch"
    common = ("eval.before_after=false", "checkpoint.every_n_steps=2", "checkpoint.keep_last=null")
    local = [o for o in sync_ray_overrides(tiny_dir, run_dir, *common) if o != "mode.ray=true"]
    run_async(env, *local, "train.max_steps=2", recipe=SYNC_RECIPE)
    run_async(env, *sync_ray_overrides(tiny_dir, run_dir, *common, "train.max_steps=4", "resume=true"),
              recipe=SYNC_RECIPE)
    load = lambda n: torch.load(run_dir / "checkpoints" / f"step_{n}" / "trainer_state.pt", weights_only=True)  # noqa: E731
    before, after = load(2)["prompts"], load(4)["prompts"]["collector"]["prompts"]
    # One more batch of env.num_prompts=2 prompts, drawn from the same permutation.
    assert (after["epoch"], after["position"]) == (before["epoch"], before["position"] + 2)
    assert [r["step"] for r in train_lines(run_dir)] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def external_cluster(env):
    """A Ray cluster started the way a multi-node job starts its head node (1 CPU here)."""
    import shutil

    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    port = free_port()
    env = {**env, "RAY_AUTH_MODE": "token"}  # as slurm/grpo-ray.sbatch runs it: the token in ~/.ray on every client
    start = subprocess.run([ray_cli, "start", "--head", f"--port={port}",
                            "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_joins_a_running_cluster_and_leaves_it_running(tiny_dir, tmp_path, external_cluster):
    external_cluster, env = external_cluster
    run_dir = tmp_path / "joined"
    run_async(env, *sync_ray_overrides(tiny_dir, run_dir, "train.max_steps=2", "eval.before_after=false",
                                       f"mode.ray_address={external_cluster}"), recipe=SYNC_RECIPE)
    assert [r["step"] for r in train_lines(run_dir)] == [1, 2]
    # The cluster is not ours to stop: it still answers, with its CPU free again.
    probe = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='" + external_cluster + "',"
                            " logging_level='ERROR'); print(ray.available_resources().get('CPU'))"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip().splitlines()[-1] == "1.0", probe.stderr[-2000:]
    short = run_async(env, *sync_ray_overrides(tiny_dir, tmp_path / "short", f"mode.ray_address={external_cluster}",
                                               "mode.collector_cpus=2"), recipe=SYNC_RECIPE, check=False)
    last = short.stderr.strip().splitlines()[-1]
    assert last == (f"config error: not enough CPUs in the Ray cluster at mode.ray_address={external_cluster}: "
                    "mode.num_collectors=1 x mode.collector_cpus=2 = 2, but 1 are free (short by 1)"), last


def test_unreachable_cluster_is_a_one_line_error(env, tiny_dir, tmp_path):
    port = free_port()  # nobody listens there
    proc = run_async({**env, "RAY_AUTH_MODE": "disabled"},
                     *sync_ray_overrides(tiny_dir, tmp_path / "nowhere", f"mode.ray_address=127.0.0.1:{port}"),
                     recipe=SYNC_RECIPE, check=False, timeout=60)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and not (tmp_path / "nowhere" / "metrics.jsonl").exists() and last.startswith(
        f"config error: cannot join the Ray cluster at mode.ray_address=127.0.0.1:{port}: "), last


def test_short_machine_fails_before_any_model_loads(env, tmp_path):
    proc = run_async(env, "mode=async", f"hydra.run.dir={tmp_path / 'short'}", "mode.num_collectors=4", "mode.cluster_cpus=2",
                     "model.name=/nonexistent/model", check=False, timeout=60)
    last = proc.stderr.strip().splitlines()[-1]
    # The plan is checked before the (here missing) model would be loaded.
    assert last.startswith("config error: not enough CPUs: mode.num_collectors=4 x mode.collector_cpus=1"), last
    assert not (tmp_path / "short" / "metrics.jsonl").exists()
