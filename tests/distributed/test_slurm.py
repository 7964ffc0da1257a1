"""The multi-node sbatch scripts (slurm/), submitted with sbatch to a real two-node SLURM cluster.

The cluster (tests/slurm_cluster.py) is started once for this module: munged, slurmctld and two
``slurmd -N node1|node2`` daemons on this machine, every file in a temporary directory; it is
stopped after the last test. Without root or Debian's slurm packages (`.ci/run` installs them)
the tests are skipped with the reason. Both nodes are this host: they share its address, its
CPUs (each node offers all of them) and have no GPU, so the scripts choose one CPU rank per node.
A job's steps are placed by SLURM: the node a step ran on is read from that node's slurmd log.
"""

from __future__ import annotations

import functools
import secrets
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import REPO, free_port, read_lines, train_lines
from tests.slurm_cluster import ClusterUnavailable, LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.slurm]  # every test submits jobs, most of them a recipe run

SLURM = REPO / "slurm"
SYNC, ASYNC, RAY = "grpo-sync-multi-node.sbatch", "grpo-async-multi-node.sbatch", "grpo-ray.sbatch"
TINY = ("env.num_prompts=2", "env.group_size=4", "train.optim_batch_size=4", "train.grad_accum_steps=2",
        "generation.max_new_tokens=6", "eval.heldout_size=10", "num_threads=1", "train.max_steps=2")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> LocalCluster:
    cluster = LocalCluster(tmp_path_factory.mktemp("slurm-cluster"))
    try:
        cluster.start()
    except ClusterUnavailable as e:
        pytest.skip(f"no SLURM cluster on this machine: {e}")
    yield cluster
    cluster.stop()


@functools.cache
def _host_ip() -> str:
    return subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()[0]


@pytest.fixture(scope="module")
def host_ip() -> str:
    """The address the scripts give the first node (its `hostname -I`): every node's here."""
    return _host_ip()


class Job:
    """One submitted batch job: its id, ports, log files and the cluster's view of it."""

    def __init__(self, cluster: LocalCluster, env: dict, tmp: Path, script: str, *args: str,
                 extra_env: dict | None = None, sbatch_args: tuple[str, ...] = ()):
        self.cluster, self.tmp = cluster, tmp
        self.ports = (free_port(), free_port())
        job_env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "GRPO_HEAD_IP", "GRPO_GPUS",
                                                                      "GRPO_TRAINER_NODES", "GRPO_INFERENCE"))}
        job_env.update({
            "SLURM_CONF": str(cluster.conf), "GRPO_PYTHON": sys.executable, "GRPO_REPO": str(REPO),
            "GRPO_RENDEZVOUS_PORT": str(self.ports[0]), "GRPO_RAY_PORT": str(self.ports[1]),
            "OMP_NUM_THREADS": "1", "GRPO_STOP_GRACE_S": "60", **(extra_env or {}),
        })
        out = cluster.run("sbatch", "--parsable", "--nodes=2", f"--output={tmp}/job-%j.out",
                          f"--error={tmp}/job-%j.err", *sbatch_args, str(SLURM / script), *args,
                          env=job_env, cwd=tmp).stdout
        self.id = out.strip().split(";")[0]

    def wait(self, timeout: float = 300) -> dict[str, str]:
        return self.cluster.wait_job(self.id, timeout)

    @property
    def out(self) -> str:
        return (self.tmp / f"job-{self.id}.out").read_text(errors="replace")

    @property
    def err(self) -> str:
        return (self.tmp / f"job-{self.id}.err").read_text(errors="replace")

    def steps(self) -> dict[str, int]:
        """How many job steps each node's slurmd launched for this job (the batch script is none)."""
        return {node: len(self.cluster.steps_on(node, self.id)) for node in ("node1", "node2")}

    def assert_state(self, info: dict[str, str], state: str = "COMPLETED", exit_code: str = "0:0") -> None:
        assert (info["JobState"], info["ExitCode"]) == (state, exit_code), \
            f"job {self.id}: {info['JobState']} {info['ExitCode']}\n{self.out[-3000:]}\n{self.err[-4000:]}"

    def assert_clean_end(self) -> None:
        """The log ends with the recipe's summary: no step was killed or failed on its way out."""
        lines = [x for x in self.out.splitlines() if x.strip()]
        assert lines and lines[-1].startswith("Run directory: "), self.out[-2000:]
        bad = [x for x in self.err.splitlines() if x.startswith(("srun: ", "slurmstepd")) or "did not stop" in x]
        assert not bad, self.err[-3000:]

    def assert_nothing_left(self, run_dir: Path, grace_s: float = 15) -> None:
        """No process of the job is left: its recipe (run dir), joined ranks (rendezvous port) and
        Ray nodes (the Ray port)."""
        rendezvous, ray_port = self.ports
        marks = (str(run_dir), f"{_host_ip()}:{rendezvous}", f"{_host_ip()}:{ray_port}", f"--port={ray_port}")
        deadline = time.monotonic() + grace_s
        while True:
            out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
            left = [x for x in out.splitlines() if any(m in x for m in marks) and "ps -eo" not in x]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert not left, f"processes of job {self.id} left behind: {left}"


def assert_two_step_run(run_dir: Path) -> None:
    assert [r["step"] for r in train_lines(run_dir)] == [1, 2]
    assert (run_dir / "final_model" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "step_2" / "trainer_state.pt").is_file()


def ray_line(job: Job) -> str:
    (line,) = [x for x in job.out.splitlines() if x.startswith("Ray: ")]
    return line


def _train_steps(run_dir: Path) -> list[int]:
    """The training steps in metrics.jsonl so far (read while the run may be writing it)."""
    try:
        return [r["step"] for r in read_lines(run_dir / "metrics.jsonl") if "reward/mean" in r]
    except (OSError, ValueError):  # not there yet, or a line half written
        return []


def wait_for(condition, what: str, job: Job, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        info = job.cluster.job(job.id)
        state = info["JobState"]
        assert time.monotonic() < deadline and state in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"), \
            (f"job {job.id} ({state}, reason {info.get('Reason')}, exit code {info.get('ExitCode')}, "
             f"restarts {info.get('Restarts')}): no {what} within {timeout:g}s\n{job.out[-2000:]}\n{job.err[-3000:]}")
        time.sleep(0.5)


# ------------------------------------------------------------------- bad invocations, exit status

BAD = [
    (SYNC, [], {},
     "usage: [GRPO_INFERENCE_NODES=M] sbatch --nodes=K slurm/grpo-sync-multi-node.sbatch grpo-sync.py "
     "[hydra overrides...]"),
    (SYNC, ["grpo-nope.py", "train.max_steps=1"], {}, "unknown recipe grpo-nope.py: this script runs grpo-sync.py"),
    (ASYNC, ["grpo-sync.py"], {}, "unknown recipe grpo-sync.py: this script runs grpo-async.py"),
    (ASYNC, [], {},
     "usage: [GRPO_TRAINER_NODES=T] sbatch --nodes=K slurm/grpo-async-multi-node.sbatch grpo-async.py "
     "[hydra overrides...]"),
    (ASYNC, ["grpo-async.py"], {"GRPO_TRAINER_NODES": "2"},
     "GRPO_TRAINER_NODES=2 must leave at least one of the job's 2 node(s) to Ray workers"),
    (SYNC, ["grpo-sync.py"], {"GRPO_INFERENCE_NODES": "2"},
     "GRPO_INFERENCE_NODES=2 must leave at least one of the job's 2 node(s) to train"),
    (SYNC, ["grpo-sync.py"], {"GRPO_PYTHON": "/nonexistent/python"}, "no python at /nonexistent/python (set GRPO_PYTHON)"),
    (RAY, ["grpo-eval.py"], {}, "unknown recipe grpo-eval.py: this script runs grpo-async.py grpo-sync.py"),
]


@pytest.fixture(scope="module")
def quick_jobs(cluster, env, tmp_path_factory) -> tuple[list[tuple[Job, dict]], tuple[Job, dict, Path]]:
    """The jobs that end without training, submitted together (SLURM runs them one after the
    other): every bad invocation, and a sync job whose recipe stops on a config error."""
    tmp = tmp_path_factory.mktemp("quick-jobs")
    bad = [Job(cluster, env, tmp, script, *args, extra_env=extra_env) for script, args, extra_env, _ in BAD]
    run_dir = tmp / "bad-config"
    config_error = Job(cluster, env, tmp, SYNC, "grpo-sync.py", f"hydra.run.dir={run_dir}", *TINY,
                       "train.optim_batch_size=3")
    with ThreadPoolExecutor(len(bad) + 1) as pool:
        infos = list(pool.map(lambda job: job.wait(), [*bad, config_error]))
    return list(zip(bad, infos[:-1])), (config_error, infos[-1], run_dir)


@pytest.mark.parametrize("index", range(len(BAD)), ids=[f"{s.split('-')[1]}-{i}" for i, (s, *_) in enumerate(BAD)])
def test_bad_invocation_exits_2_with_one_line(quick_jobs, index):
    job, info = quick_jobs[0][index]
    job.assert_state(info, "FAILED", "2:0")
    assert (job.err.splitlines(), job.out) == ([BAD[index][3]], "")
    # Nothing was started on any node (the checks come before the first srun).
    assert job.steps() == {"node1": 0, "node2": 0}


def test_sync_exit_status_is_the_recipes(quick_jobs):
    """A recipe that stops with a config error: the job's exit status and last line (but srun's
    own report of the failed step) are its; the already started node2 ranks (waiting for a
    rendezvous that never opens) are stopped."""
    job, info, run_dir = quick_jobs[1]
    job.assert_state(info, "FAILED", "1:0")
    lines = [x for x in job.err.strip().splitlines() if not x.startswith("srun: ")]
    assert lines[-1].startswith("config error: train.optim_batch_size=3"), job.err[-3000:]
    assert job.steps()["node2"] == 1  # the joining ranks
    job.assert_nothing_left(run_dir)


# ------------------------------------------------------------------------------------- sync


def test_sync_trains_over_two_nodes_and_leaves_nothing(cluster, env, tmp_path, host_ip):
    """Rank 0 (the recipe) on node1, rank 1 joined from node2. Also from a cold model cache: each
    node's rank builds the quick-start model itself (before joining the process group, else
    transformers saves no weights on rank 1)."""
    run_dir, cache = tmp_path / "sync", tmp_path / "cold-cache"
    job = Job(cluster, env, tmp_path, SYNC, "grpo-sync.py", f"hydra.run.dir={run_dir}", *TINY,
              extra_env={"GRPO_CACHE_DIR": str(cache)})
    job.assert_state(job.wait())
    assert_two_step_run(run_dir)
    (model_dir,) = cache.glob("quickstart-*")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in model_dir.iterdir()}
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    rendezvous = f"{host_ip}:{job.ports[0]}"  # the first node's `hostname -I`, through srun
    assert (cfg.device, cfg.train_model.num_devices, cfg.train_model.num_nodes, cfg.train_model.rendezvous) == \
        ("cpu", 2, 2, rendezvous)
    assert f"trainer: 2 node(s) x 1 rank(s) on cpu (node1 node2), rendezvous {rendezvous}" in job.out.splitlines()
    # node1: `hostname -I` and the recipe; node2: the joined ranks only (no Ray without inference nodes).
    assert job.steps() == {"node1": 2, "node2": 1}
    assert not any(x.startswith("Ray: ") for x in job.out.splitlines())
    job.assert_clean_end()
    job.assert_nothing_left(run_dir)


def test_stop_requeue_resume_and_scancel(cluster, env, tmp_path):
    """One long run, in the run directory the script chooses (outputs/<job name>-<job id>, the
    same for every start of the job), stopped three ways:

    1. SIGTERM to the batch script alone (``scancel --batch --signal=TERM``, as ``sbatch
       --signal=B:TERM@T`` sends before a time limit): the script passes it on to the recipe,
       which finishes the ranks' command in progress, gathers a checkpoint with node2's rank and
       exits with its own status and line (well within GRPO_STOP_GRACE_S, after which the script
       would kill it); the job ends and takes the joined ranks with it.
    2. ``scontrol requeue``: the job starts again and resumes from that checkpoint (its steps
       continue the first start's: none is trained twice, it does not restart from 1).
    3. ``scancel``: SLURM SIGTERMs every step; the recipe checkpoints again and the job ends
       CANCELLED, nothing of it left running."""
    name = f"grpotest-{secrets.token_hex(4)}"
    job = Job(cluster, env, tmp_path, SYNC, "grpo-sync.py", *TINY, "train.max_steps=500", "eval.every_n_steps=0",
              "eval.before_after=false", sbatch_args=(f"--job-name={name}",))
    run_dir = REPO / "outputs" / f"{name}-{job.id}"
    try:
        wait_for(lambda: _train_steps(run_dir), "training step", job)
        cluster.run("scancel", "--batch", "--signal=TERM", job.id)
        stopped = job.wait(120)
        err = job.err
        job.assert_state(stopped, "FAILED", "130:0")
        (line,) = [x for x in err.splitlines() if x.startswith("interrupted")]
        assert "last checkpoint: step " in line and "did not stop within" not in err, err[-3000:]
        resumed_at = int(line.rsplit(" ", 1)[1])
        job.assert_nothing_left(run_dir)

        cluster.run("scontrol", "requeue", job.id)
        # A requeued job waits two minutes before it may start again (slurmctld's requeue delay):
        # once the requeue is done (the job waits for its BeginTime), it may start now.
        wait_for(lambda: cluster.job(job.id).get("Reason") == "BeginTime", "requeued job waiting to begin", job, 90)
        cluster.run("scontrol", "update", f"jobid={job.id}", "StartTime=now")
        wait_for(lambda: max(_train_steps(run_dir), default=0) > resumed_at, "training step after the requeue", job)
        cluster.run("scancel", job.id)
        info = job.wait(120)
        out, err, steps = job.out, job.err, _train_steps(run_dir)
        assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "1"), err[-3000:]
        assert f"requeued (start 2 of job {job.id}): resuming from the run's latest checkpoint" in out.splitlines()
        assert f"Resumed from {run_dir / 'checkpoints' / f'step_{resumed_at}'} at step {resumed_at}" in out, out[-2000:]
        assert "did not stop within" not in err, err[-3000:]
        (line,) = [x for x in err.splitlines() if x.startswith("error: terminated (SIGTERM)")]
        assert "last checkpoint: step " in line, err[-3000:]
        last = int(line.rsplit(" ", 1)[1])
        assert last > resumed_at and len(steps) < 500
        # One run: steps 1.. up to the first stop, then on from its checkpoint (not from 1 again).
        assert steps == list(range(1, steps[-1] + 1)), steps
        for step in (resumed_at, last):
            assert (run_dir / "checkpoints" / f"step_{step}" / "manifest.json").is_file()
        job.assert_nothing_left(run_dir)
    finally:
        cluster.run("scancel", job.id, check=False)  # a no-op once it has ended
        shutil.rmtree(run_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------- Ray


def run_ray_job(cluster: LocalCluster, env: dict, tmp_path: Path, script: str, recipe: str, *args: str,
                extra_env: dict | None = None) -> tuple[Job, Path]:
    """``script`` running ``recipe`` with a Ray cluster over the two nodes: a 2-step run completes,
    its log ends with the summary and nothing of it is left running."""
    pytest.importorskip("ray")
    run_dir = tmp_path / "run"
    job = Job(cluster, env, tmp_path, script, recipe, f"hydra.run.dir={run_dir}", *TINY, *args,
              "mode.actor_timeout_s=60", "eval.before_after=false", extra_env=extra_env)
    job.assert_state(job.wait())
    assert_two_step_run(run_dir)
    job.assert_clean_end()
    job.assert_nothing_left(run_dir)
    return job, run_dir


@pytest.mark.ray
def test_async_trainer_node_and_ray_worker_node(cluster, env, tmp_path, host_ip):
    job, run_dir = run_ray_job(cluster, env, tmp_path, ASYNC, "grpo-async.py")
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert (cfg.mode.name, cfg.mode.ray_address, cfg.train_model.num_devices, cfg.train_model.num_nodes) == \
        ("async", f"{host_ip}:{job.ports[1]}", 1, 1)
    # The head on node1 offers nothing (node1 is the trainer's), node2's worker all of its CPUs:
    # the collector can only have run on node2.
    assert ray_line(job) == (f"Ray: head on node1 ({host_ip}:{job.ports[1]}, 0 GPU(s), 0 CPU(s)), "
                             f"workers on: node2 (0 GPU(s), {cluster.cpus} CPU(s) each)")
    # node1: `hostname -I`, the Ray head and the recipe; node2: the Ray worker (no joined ranks:
    # one trainer node).
    assert job.steps() == {"node1": 3, "node2": 1}


@pytest.mark.ray
def test_sync_with_an_inference_node_on_ray(cluster, env, tmp_path, host_ip):
    """GRPO_INFERENCE_NODES=1: node1 trains, node2 hosts the collector of mode.ray=true."""
    job, run_dir = run_ray_job(cluster, env, tmp_path, SYNC, "grpo-sync.py",
                               extra_env={"GRPO_INFERENCE_NODES": "1"})
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert (cfg.mode.ray, cfg.mode.ray_address, cfg.train_model.num_nodes) == (True, f"{host_ip}:{job.ports[1]}", 1)
    assert ray_line(job) == (f"Ray: head on node1 ({host_ip}:{job.ports[1]}, 0 GPU(s), 0 CPU(s)), "
                             f"workers on: node2 (0 GPU(s), {cluster.cpus} CPU(s) each)")
    assert job.steps() == {"node1": 3, "node2": 1}


@pytest.mark.ray
def test_grpo_ray_sbatch_on_the_shared_bootstrap(cluster, env, tmp_path, host_ip):
    """grpo-ray.sbatch: the head node keeps GRPO_TRAINER_CPUS for the trainer and offers the rest,
    node2 all of its CPUs; the recipe joins that cluster."""
    if cluster.cpus < 2:
        pytest.skip("the trainer keeps one CPU of node1: needs 2")
    job, run_dir = run_ray_job(cluster, env, tmp_path, RAY, "grpo-sync.py", "mode.ray=true",
                               extra_env={"GRPO_TRAINER_CPUS": "1"})
    assert ray_line(job) == (f"Ray: head on node1 ({host_ip}:{job.ports[1]}, 0 GPU(s), {cluster.cpus - 1} CPU(s)), "
                             f"workers on: node2 (0 GPU(s), {cluster.cpus} CPU(s) each)")
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert (cfg.mode.trainer_cpus, cfg.device, cfg.mode.ray_address) == (1, "cpu", f"{host_ip}:{job.ports[1]}")
    assert job.steps() == {"node1": 3, "node2": 1}
