"""No process of a run's local Ray cluster survives the run's driver, even after ``kill -9``, and
the cluster's session directory is removed (grpo_utils.distributed.watchdog)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.ray]

from grpo_utils.distributed.watchdog import session_processes  # noqa: E402
from tests.helpers import REPO  # noqa: E402

DRIVER = """
import sys, time
from grpo_utils.distributed.resources import ResourcePlan, start_ray
plan = ResourcePlan(cluster_cpus=2, cluster_gpus=0, collector_cpus=1, collector_gpus=0, num_collectors=1,
                    trainer_cpus=1, trainer_gpus=0)
start_ray(plan)
from ray._private import worker
print(worker._global_node.get_session_dir_path(), flush=True)
if sys.argv[1] == "shutdown":
    from grpo_utils.distributed.resources import shutdown_ray
    shutdown_ray([])
    print("done", flush=True)
else:
    time.sleep(600)
"""


def start_driver(how: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, how], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)})
    session = Path(proc.stdout.readline().strip())
    assert session.name.startswith("session_"), session
    return proc, session


def wait_until_gone(session: Path, timeout_s: float = 45.0) -> list:
    deadline = time.monotonic() + timeout_s
    while (left := session_processes(session)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def test_kill_9_of_the_driver_leaves_no_ray_process_and_no_session_dir():
    proc, session = start_driver("sleep")
    assert session_processes(session), "the cluster's processes name their session"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = wait_until_gone(session)
    assert not left, [p.cmdline() for p in left]
    deadline = time.monotonic() + 10
    while session.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not session.exists()


def test_normal_shutdown_removes_the_session_dir_and_the_watchdog():
    proc, session = start_driver("shutdown")
    assert proc.stdout.readline().strip() == "done"
    proc.wait(timeout=60)
    assert not session.exists()
    assert not wait_until_gone(session, timeout_s=10)
