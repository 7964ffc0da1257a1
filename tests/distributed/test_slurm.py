"""The multi-node sbatch scripts (slurm/), run with bash under a fake SLURM on this one machine.

The fake ``srun`` runs a step's command here as if on the node ``-w`` names (both "nodes" are this
machine, reached at 127.0.0.1: the fake ``hostname -I`` says so), ``scontrol show hostnames``
lists the job's two nodes, and ``nvidia-smi`` fails as on a node without GPUs, so the scripts
choose one CPU rank per node (device=cpu). Two Ray nodes on one machine work: a head offering no
CPU and a worker offering one, so the collector can only run on the "other node".
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import REPO, train_lines

pytestmark = pytest.mark.slow  # each test runs a whole job script, most of them a recipe

SLURM = REPO / "slurm"
NODES = ("node0", "node1")

FAKE_SRUN = r"""#!/bin/bash
# Fake srun: run the command here as if on the node -w names (all of the first --nodes nodes
# without -w), with that node's SLURM_NODEID; exec, so that a signal to srun reaches the step.
nodes=1 node=""
echo "srun $*" >> "$FAKE_SLURM_LOG"
while [[ $# -gt 0 ]]; do
    case "$1" in
        -w) node="$2"; shift 2 ;;
        --nodelist=*) node="${1#*=}"; shift ;;
        --nodes=*) nodes="${1#*=}"; shift ;;
        --overlap|--ntasks=*|--cpus-per-task=*) shift ;;
        *) [[ "$1" == -* ]] && { echo "fake srun: unexpected option $1" >&2; exit 1; }; break ;;
    esac
done
mapfile -t all < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
run_on() {
    local i
    for i in "${!all[@]}"; do
        if [[ "${all[$i]}" == "$1" ]]; then
            shift
            SLURM_NODEID=$i SLURM_PROCID=0 SLURMD_NODENAME="${all[$i]}" exec "$@"
        fi
    done
    echo "fake srun: no node $1 in the job" >&2
    exit 1
}
if [[ -n "$node" ]]; then run_on "$node" "$@"; fi
for target in "${all[@]:0:nodes}"; do (run_on "$target" "$@") & done
wait
"""
FAKE_SCONTROL = r"""#!/bin/bash
[[ "$1 $2" == "show hostnames" ]] || { echo "fake scontrol: only show hostnames" >&2; exit 1; }
tr ',' '\n' <<< "$3"
"""
FAKE_HOSTNAME = r"""#!/bin/bash
if [[ "$1" == -I ]]; then echo "127.0.0.1 ::1"; else exec /bin/hostname "$@"; fi
"""
NO_GPU = "#!/bin/bash\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n"

TINY = ("env.num_prompts=2", "env.group_size=4", "train.optim_batch_size=4", "train.grad_accum_steps=2",
        "generation.max_new_tokens=6", "eval.heldout_size=10", "num_threads=1", "train.max_steps=2")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def job(env, tmp_path) -> dict:
    """A fake two-node SLURM job: the environment a batch script sees, its ports and srun log."""
    bin_dir = tmp_path / "fake-slurm"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("hostname", FAKE_HOSTNAME),
                       ("nvidia-smi", NO_GPU)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    job_env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "GRPO_HEAD_IP", "GRPO_GPUS",
                                                                  "GRPO_TRAINER_NODES", "GRPO_INFERENCE"))}
    rendezvous, ray_port = free_port(), free_port()
    job_env.update({
        "PATH": f"{bin_dir}:{env['PATH']}", "SLURM_JOB_NODELIST": ",".join(NODES), "SLURM_JOB_NUM_NODES": "2",
        "SLURM_SUBMIT_DIR": str(REPO), "SLURM_CPUS_ON_NODE": "1", "GRPO_PYTHON": sys.executable,
        "GRPO_REPO": str(REPO), "GRPO_RENDEZVOUS_PORT": str(rendezvous), "GRPO_RAY_PORT": str(ray_port),
        "FAKE_SLURM_LOG": str(tmp_path / "srun.log"), "OMP_NUM_THREADS": "1", "GRPO_STOP_GRACE_S": "60",
    })
    return {"env": job_env, "log": tmp_path / "srun.log", "ports": (rendezvous, ray_port)}


def run_script(job: dict, script: str, *args: str, extra_env: dict | None = None,
               timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM / script), *args], env={**job["env"], **(extra_env or {})},
                          cwd=job["log"].parent, capture_output=True, text=True, timeout=timeout)


def steps(job: dict) -> list[str]:
    """The fake srun's command lines, in the order the script called them."""
    return job["log"].read_text().splitlines()


def processes_of(job: dict, run_dir: Path) -> list[str]:
    """Processes that belong to the job: its recipe (run dir), joined ranks (rendezvous) and Ray
    daemons (the Ray port)."""
    rendezvous, ray_port = job["ports"]
    marks = (str(run_dir), f"127.0.0.1:{rendezvous}", f":{ray_port}", f"={ray_port}")
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if any(m in line for m in marks) and "ps -eo" not in line]


def assert_nothing_left(job: dict, run_dir: Path, grace_s: float = 15) -> None:
    deadline = time.monotonic() + grace_s
    while (left := processes_of(job, run_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the job left behind: {left}"


def assert_succeeded(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"job failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"


def _trained(run_dir: Path) -> bool:
    """At least one training step is in metrics.jsonl (read while the run may be writing it)."""
    try:
        return bool(train_lines(run_dir))
    except (OSError, ValueError):  # not there yet, or a line half written
        return False


def assert_two_step_run(run_dir: Path) -> None:
    assert [r["step"] for r in train_lines(run_dir)] == [1, 2]
    assert (run_dir / "final_model" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "step_2" / "trainer_state.pt").is_file()


# ------------------------------------------------------------------------------- bad invocations


@pytest.mark.parametrize("script, args, extra_env, message", [
    ("grpo-sync-multi-node.sbatch", [], {},
     "usage: [GRPO_INFERENCE_NODES=M] sbatch --nodes=K slurm/grpo-sync-multi-node.sbatch grpo-sync.py "
     "[hydra overrides...]"),
    ("grpo-sync-multi-node.sbatch", ["grpo-nope.py", "train.max_steps=1"], {},
     "unknown recipe grpo-nope.py: this script runs grpo-sync.py"),
    ("grpo-async-multi-node.sbatch", ["grpo-sync.py"], {}, "unknown recipe grpo-sync.py: this script runs grpo-async.py"),
    ("grpo-async-multi-node.sbatch", [], {},
     "usage: [GRPO_TRAINER_NODES=T] sbatch --nodes=K slurm/grpo-async-multi-node.sbatch grpo-async.py "
     "[hydra overrides...]"),
    ("grpo-async-multi-node.sbatch", ["grpo-async.py"], {"GRPO_TRAINER_NODES": "2"},
     "GRPO_TRAINER_NODES=2 must leave at least one of the job's 2 node(s) to Ray workers"),
    ("grpo-sync-multi-node.sbatch", ["grpo-sync.py"], {"GRPO_INFERENCE_NODES": "2"},
     "GRPO_INFERENCE_NODES=2 must leave at least one of the job's 2 node(s) to train"),
    ("grpo-sync-multi-node.sbatch", ["grpo-sync.py"], {"GRPO_PYTHON": "/nonexistent/python"},
     "no python at /nonexistent/python (set GRPO_PYTHON)"),
    ("grpo-ray.sbatch", ["grpo-eval.py"], {}, "unknown recipe grpo-eval.py: this script runs grpo-async.py grpo-sync.py"),
])
def test_bad_invocation_exits_2_with_one_line(job, script, args, extra_env, message):
    proc = run_script(job, script, *args, extra_env=extra_env, timeout=60)
    assert (proc.returncode, proc.stderr.splitlines(), proc.stdout) == (2, [message], "")
    # Nothing was started on any node (the recipe check comes before the first srun).
    assert not job["log"].exists() or not any("python" in s or "ray" in s for s in steps(job))


# ------------------------------------------------------------------------------------- sync


def test_sync_trains_over_two_nodes_and_leaves_nothing(job, tmp_path):
    """Also from a cold model cache: each node's rank builds the quick-start model itself (before
    joining the process group, else transformers saves no weights on rank 1)."""
    run_dir, cache = tmp_path / "sync", tmp_path / "cold-cache"
    proc = run_script(job, "grpo-sync-multi-node.sbatch", "grpo-sync.py", f"hydra.run.dir={run_dir}", *TINY,
                      extra_env={"GRPO_CACHE_DIR": str(cache)})
    assert_succeeded(proc)
    assert_two_step_run(run_dir)
    (model_dir,) = cache.glob("quickstart-*")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in model_dir.iterdir()}
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    rendezvous = f"127.0.0.1:{job['ports'][0]}"  # the first node's `hostname -I`, through srun
    assert (cfg.device, cfg.train_model.num_devices, cfg.train_model.num_nodes, cfg.train_model.rendezvous) == \
        ("cpu", 2, 2, rendezvous)
    # The recipe on node0, the other node's ranks joined from node1: every step with --overlap.
    lines = steps(job)
    assert all(s.startswith("srun --overlap --nodes=1 --ntasks=1 ") for s in lines), lines
    recipe = [s for s in lines if "grpo-sync.py" in s]
    join = [s for s in lines if "grpo_utils.distributed.join" in s]
    assert len(recipe) == 1 and " -w node0 " in recipe[0]
    assert join == [f"srun --overlap --nodes=1 --ntasks=1 --cpus-per-task=1 -w node1 {sys.executable} -m "
                    f"grpo_utils.distributed.join --address {rendezvous} --node-rank 1"]
    assert not any("start --head" in s for s in lines)  # no Ray without inference nodes
    assert_nothing_left(job, run_dir)


def test_sync_exit_status_is_the_recipes(job, tmp_path):
    """A recipe that stops with a config error: the job's exit status and last line are its; the
    already started node1 ranks (waiting for a rendezvous that never opens) are stopped."""
    run_dir = tmp_path / "bad"
    proc = run_script(job, "grpo-sync-multi-node.sbatch", "grpo-sync.py", f"hydra.run.dir={run_dir}", *TINY,
                      "train.optim_batch_size=3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: train.optim_batch_size=3"), proc.stderr
    assert any("grpo_utils.distributed.join" in s for s in steps(job))
    assert_nothing_left(job, run_dir)


def test_sigterm_to_the_job_reaches_the_recipe_and_stops_everything(job, tmp_path):
    """scancel-like: a SIGTERM to the batch script is passed on to the recipe, which finishes the
    ranks' command in progress, gathers a checkpoint with node1's rank, stops it and exits with its
    own status and line (well within GRPO_STOP_GRACE_S, after which the script would kill it); the
    job ends and takes the joined ranks with it."""
    run_dir = tmp_path / "cancelled"
    env = {**job["env"], "GRPO_STOP_GRACE_S": "60"}
    proc = subprocess.Popen(["bash", str(SLURM / "grpo-sync-multi-node.sbatch"), "grpo-sync.py",
                             f"hydra.run.dir={run_dir}", *TINY, "train.max_steps=500", "eval.every_n_steps=0"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not _trained(run_dir):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "did not stop within" not in err, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("error: terminated (SIGTERM)")]
    assert proc.returncode == 1 and "last checkpoint: step " in line, err[-3000:]
    step = int(line.rsplit(" ", 1)[1])
    assert (run_dir / "checkpoints" / f"step_{step}" / "manifest.json").is_file()
    assert len(train_lines(run_dir)) < 500
    assert_nothing_left(job, run_dir)


# ------------------------------------------------------------------------------------- Ray


def run_ray_job(job: dict, run_dir: Path, script: str, recipe: str, *args: str,
                extra_env: dict | None = None) -> None:
    """``script`` running ``recipe`` with a Ray cluster over the two nodes: a 2-step run completes."""
    pytest.importorskip("ray")
    proc = run_script(job, script, recipe, f"hydra.run.dir={run_dir}", *TINY, *args, "mode.actor_timeout_s=60",
                      "eval.before_after=false", extra_env=extra_env)
    assert_succeeded(proc)
    assert_two_step_run(run_dir)


@pytest.mark.ray
def test_async_trainer_node_and_ray_worker_node(job, tmp_path):
    run_dir = tmp_path / "async"
    run_ray_job(job, run_dir, "grpo-async-multi-node.sbatch", "grpo-async.py")
    rendezvous, ray_port = job["ports"]
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert (cfg.mode.name, cfg.mode.ray_address, cfg.train_model.num_devices, cfg.train_model.num_nodes) == \
        ("async", f"127.0.0.1:{ray_port}", 1, 1)
    lines = steps(job)
    head = [s for s in lines if "start --head" in s]
    worker = [s for s in lines if "start --address" in s]
    # The head on node0 offers nothing (node0 is the trainer's), node1's worker its one CPU: the
    # collector (1 CPU) can only have run on node1.
    assert len(head) == 1 and " -w node0 " in head[0] and "--num-cpus=0" in head[0] and "--num-gpus=0" in head[0]
    assert len(worker) == 1 and " -w node1 " in worker[0] and "--num-cpus=1" in worker[0]
    assert f"--address=127.0.0.1:{ray_port}" in worker[0]
    assert not any("grpo_utils.distributed.join" in s for s in lines)  # one trainer node
    assert_nothing_left(job, run_dir)


@pytest.mark.ray
def test_sync_with_an_inference_node_on_ray(job, tmp_path):
    """GRPO_INFERENCE_NODES=1: node0 trains, node1 hosts the collector of mode.ray=true."""
    run_dir = tmp_path / "sync_ray"
    run_ray_job(job, run_dir, "grpo-sync-multi-node.sbatch", "grpo-sync.py",
                extra_env={"GRPO_INFERENCE_NODES": "1"})
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert (cfg.mode.ray, cfg.mode.ray_address, cfg.train_model.num_nodes) == (True, f"127.0.0.1:{job['ports'][1]}", 1)
    assert [s.split(" -w ")[1].split()[0] for s in steps(job) if "start --address" in s] == ["node1"]
    assert_nothing_left(job, run_dir)


@pytest.mark.ray
def test_grpo_ray_sbatch_on_the_shared_bootstrap(job, tmp_path):
    """grpo-ray.sbatch (now on common.sh): the head node keeps GRPO_TRAINER_CPUS for the trainer
    and offers the rest, node1 all of its CPUs; the recipe joins that cluster."""
    run_dir = tmp_path / "ray"
    run_ray_job(job, run_dir, "grpo-ray.sbatch", "grpo-sync.py", "mode.ray=true",
                extra_env={"SLURM_CPUS_ON_NODE": "2", "GRPO_TRAINER_CPUS": "1"})
    lines = steps(job)
    (head,) = [s for s in lines if "start --head" in s]
    (worker,) = [s for s in lines if "start --address" in s]
    assert " -w node0 " in head and "--num-cpus=1" in head and " -w node1 " in worker and "--num-cpus=2" in worker
    (recipe,) = [s for s in lines if "grpo-sync.py" in s]
    assert "env CUDA_VISIBLE_DEVICES=0 " in recipe and "mode.trainer_cpus=1" in recipe and "device=cpu" in recipe
    assert_nothing_left(job, run_dir)
