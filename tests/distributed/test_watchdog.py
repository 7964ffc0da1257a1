"""No process of a run's local Ray cluster survives the run's driver, even after ``kill -9``, and
the cluster's session directory is removed (grpo_utils.distributed.watchdog)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]

from grpo_utils.distributed.watchdog import session_tree  # noqa: E402
from tests.helpers import REPO  # noqa: E402

DRIVER = """
import sys, time
from grpo_utils.distributed.resources import ResourcePlan, start_ray
plan = ResourcePlan(cluster_cpus=2, cluster_gpus=0, collector_cpus=1, collector_gpus=0, num_collectors=1,
                    trainer_cpus=1, trainer_gpus=0)
start_ray(plan)
import ray
from grpo_utils.distributed import resources

@ray.remote(num_cpus=1)
class Actor:  # stands in for a collector: an actor's worker process, with a child of its own
    def start_child(self):
        import subprocess
        self.child = subprocess.Popen(["sleep", "600"])
        return self.child.pid

actor = Actor.remote()
ray.get(actor.start_child.remote())
if sys.argv[1] == "sleep":
    time.sleep(4)  # the watchdog records the cluster's processes every 2 s: it has seen the child now
print(resources._WATCH[1], flush=True)  # the session directory the watchdog watches
if sys.argv[1] == "shutdown":
    sys.stdin.readline()  # the test has recorded the cluster's processes
    from grpo_utils.distributed.resources import shutdown_ray
    shutdown_ray([])
    print("done", flush=True)
else:
    time.sleep(600)
"""
AGENTS = {"ray::DashboardAgent", "ray::RuntimeEnvAgent"}


def start_driver(how: str) -> tuple[subprocess.Popen, Path, list]:
    """The driver, its session directory and its processes (the cluster's, agents included, and
    the watchdog): what must be gone once the driver is."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, how], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)})
    session = Path(proc.stdout.readline().strip())
    assert session.name.startswith("session_"), session
    tree = psutil.Process(proc.pid).children(recursive=True)
    # Ray's agents rename themselves: nothing in their command line names the session.
    assert AGENTS | {"ray::Actor", "sleep"} <= {p.name() for p in tree}, [p.name() for p in tree]
    return proc, session, tree


def wait_until_gone(tree: list, timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    while (left := [p.name() for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_kill_9_of_the_driver_leaves_no_ray_process_and_no_session_dir():
    """Within 10 s of the driver's kill -9: none of its processes (Ray's agents included) is left."""
    proc, session, tree = start_driver("sleep")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = wait_until_gone(tree, timeout_s=10)
    assert not left
    assert not session_tree(session)
    deadline = time.monotonic() + 5
    while session.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not session.exists()


def test_normal_shutdown_removes_the_session_dir_and_the_watchdog():
    """shutdown_ray leaves no process of the cluster, agents included, and no session dir."""
    proc, session, tree = start_driver("shutdown")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "done"
    assert not wait_until_gone(tree, timeout_s=2)
    proc.wait(timeout=60)
    assert not session.exists()
