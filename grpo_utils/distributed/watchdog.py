"""A watchdog for the local Ray cluster a run starts: nothing of it outlives the run's driver.

Ray stops its cluster when the driver calls ``ray.shutdown()``, but a driver killed with
``kill -9`` leaves agents behind (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``, re-parented
to pid 1 for about a minute) and its session directory under ``/tmp/ray`` for good. The driver
starts this watchdog in a process of its own (:func:`start`); it polls the driver and, once the
driver is gone, kills every process whose command line names the session and removes the
session directory. A driver that shuts Ray down normally stops the watchdog and removes the
directory itself (:func:`stop`).

    python -m grpo_utils.distributed.watchdog <driver pid> <session dir>
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.5


def session_processes(session_dir: str | Path) -> list:
    """Live processes whose command line names the session (its raylet, GCS, agents, workers)."""
    import psutil

    name = Path(session_dir).name
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and any(name in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def clean_up(session_dir: str | Path, grace_s: float = 5.0) -> None:
    """SIGKILL what is left of the session (after ``grace_s`` for it to exit on its own), then
    remove its directory (and ``session_latest`` if it points there)."""
    import psutil

    deadline = time.monotonic() + grace_s
    while (left := [p for p in session_processes(session_dir) if p.is_running()]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=5)
    session = Path(session_dir)
    latest = session.parent / "session_latest"
    if latest.is_symlink() and Path(os.readlink(latest)).name == session.name:
        latest.unlink(missing_ok=True)
    shutil.rmtree(session, ignore_errors=True)


def start(session_dir: str | Path) -> subprocess.Popen:
    """Watch this process; clean the session up when it dies."""
    return subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid()), str(session_dir)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # not in the driver's process group: a group kill spares it


def stop(watchdog: subprocess.Popen | None, session_dir: str | Path | None) -> None:
    """After a normal ``ray.shutdown()``: stop the watchdog and remove the session directory."""
    if watchdog is not None and watchdog.poll() is None:
        watchdog.kill()
        watchdog.wait()
    if session_dir is not None:
        clean_up(session_dir, grace_s=0)  # Ray is shut down: what still runs of it is only exiting


def alive(pid: int) -> bool:
    """Running (a killed driver its parent has not reaped yet is a zombie: gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main(driver_pid: int, session_dir: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the driver's to handle
    while alive(driver_pid):
        time.sleep(POLL_S)
    clean_up(session_dir)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
