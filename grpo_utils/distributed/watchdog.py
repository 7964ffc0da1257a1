"""A watchdog for the local Ray cluster a run starts: nothing of it outlives the run's driver.

Ray stops its cluster when the driver calls ``ray.shutdown()``, but a driver killed with
``kill -9`` leaves agents behind (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``, children of
the raylet that notice its death only about a minute later) and its session directory under
``/tmp/ray`` for good. The driver starts this watchdog in a process of its own (:func:`start`); it
polls the driver and, once the driver is gone, kills every process of the session and removes the
session directory. A driver that shuts Ray down normally stops the watchdog, kills what is left of
the session and removes the directory itself (:func:`stop`).

The session's processes are those whose command line names the session directory (GCS, raylet,
dashboard, monitors) and all their descendants: the agents and workers rename themselves
(``ray::...``, overwriting the command line and environment), so only their ancestry tells. The
watchdog records that tree every few seconds while the driver lives, since a dead raylet's
children are re-parented and lose it.

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

POLL_S = 0.5  # how often the driver is checked
TREE_S = 2.0  # how often the session's process tree is recorded (a scan of every process)
GRACE_S = 3.0  # how long the session's processes get to exit on their own once the driver is gone


def session_tree(session_dir: str | Path) -> list:
    """The session's processes: those whose command line names it (its raylet, GCS, dashboard,
    monitors) and all their descendants (the agents and workers, which do not name it), this
    process excepted."""
    import psutil

    children: dict[int, list] = {}
    roots = []
    name = Path(session_dir).name
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        try:
            children.setdefault(proc.info["ppid"], []).append(proc)
            if any(name in part for part in proc.info["cmdline"] or ()):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    tree, todo = {}, list(roots)
    while todo:
        proc = todo.pop()
        if proc.pid not in tree and proc.pid != os.getpid():
            tree[proc.pid] = proc
            todo.extend(children.get(proc.pid, ()))
    return list(tree.values())


def _running(procs) -> list:
    """Those of ``procs`` still running (psutil tells a reused pid from the process it recorded)."""
    import psutil

    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.NoSuchProcess:
            continue
    return left


def clean_up(session_dir: str | Path, grace_s: float = GRACE_S, known=()) -> None:
    """SIGKILL what is left of the session (after ``grace_s`` for it to exit on its own): the
    processes of its tree now and ``known`` ones recorded earlier, then remove its directory (and
    ``session_latest`` if it points there)."""
    import psutil

    def left() -> list:
        procs = {p.pid: p for p in (*known, *session_tree(session_dir))}
        return _running(procs.values())

    deadline = time.monotonic() + grace_s
    while (procs := left()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for _ in range(3):  # what the killed ones started meanwhile, if anything
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=5)
        if not (procs := left()):
            break
    session = Path(session_dir)
    latest = session.parent / "session_latest"
    if latest.is_symlink() and Path(os.readlink(latest)).name == session.name:
        latest.unlink(missing_ok=True)
    shutil.rmtree(session, ignore_errors=True)


def start(session_dir: str | Path) -> subprocess.Popen:
    """Watch this process; clean the session up when it dies. Returns once the watchdog has
    recorded the session's processes: a driver killed before that would orphan the agents."""
    watchdog = subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid()), str(session_dir)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # not in the driver's process group: a group kill spares it
    with watchdog.stdout:
        watchdog.stdout.readline()  # "ready" (or nothing, should it fail)
    return watchdog


def stop(watchdog: subprocess.Popen | None, session_dir: str | Path | None, known=()) -> None:
    """After a normal ``ray.shutdown()``: stop the watchdog, kill what is left of the session
    (``known``: its :func:`session_tree` from before the shutdown, when the agents still had their
    raylet as parent) and remove the session directory."""
    if watchdog is not None and watchdog.poll() is None:
        watchdog.kill()
        watchdog.wait()
    if session_dir is not None:
        clean_up(session_dir, grace_s=0, known=known)  # Ray is shut down: what still runs of it is only exiting


def alive(pid: int) -> bool:
    """Running (a killed driver its parent has not reaped yet is a zombie: gone)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main(driver_pid: int, session_dir: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the driver's to handle
    known: dict[int, object] = {}
    recorded = 0.0
    while alive(driver_pid):
        if time.monotonic() - recorded >= TREE_S:
            known.update({p.pid: p for p in session_tree(session_dir)})
            known = {p.pid: p for p in _running(known.values())}
            if not recorded:
                print("ready", flush=True)
                os.close(sys.stdout.fileno())  # the driver reads no more
            recorded = time.monotonic()
        time.sleep(POLL_S)
    clean_up(session_dir, known=known.values())


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
