"""A real two-node SLURM cluster on this one machine, for the tests of slurm/ (and by hand).

Debian's slurm packages (``apt-get install slurmd slurmctld slurm-client munge``) and root are
needed. Everything lives in one directory: the munge key and socket, slurm.conf (clients find it
through SLURM_CONF, which sbatch passes on to the job), the controller's state, the nodes' spool
directories and every daemon's log and pid file. Nothing under /etc is read or written, so each
start is a fresh cluster (no job ids, queue or node state from an earlier one), and ports are
picked free each time, so it does not clash with another cluster on the machine.

The two nodes (``node1``, ``node2``) are two ``slurmd -N`` daemons on this host: they share its
address, so whatever a job starts on both (rendezvous, Ray) needs a port per node.

By hand (as root, from the checkout): ``.venv/bin/python -m tests.slurm_cluster DIR`` starts one,
prints the ``SLURM_CONF`` to export, and stops it on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "scontrol", "squeue", "scancel")
NODES = ("node1", "node2")


class ClusterUnavailable(RuntimeError):
    """The daemons cannot run here (not root, packages missing, a daemon would not start)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LocalCluster:
    """munged, slurmctld and one slurmd per node, all with their files in ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pids: list[int] = []  # the daemons this object started

    # ------------------------------------------------------------------------------ start/stop

    def start(self, wait_s: float = 60) -> LocalCluster:
        """Start every daemon and return once ``sinfo`` shows both nodes idle; raises
        ClusterUnavailable (with the reason) if that cannot happen here, after stopping whatever
        it had started."""
        if os.geteuid() != 0:
            raise ClusterUnavailable("needs root (slurmd runs jobs as their user and tracks their processes)")
        search = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"  # daemons live in sbin, not on every PATH
        self.bin = {d: shutil.which(d, path=search) for d in COMMANDS}
        missing = [d for d, path in self.bin.items() if not path]
        if missing:
            raise ClusterUnavailable(f"{', '.join(missing)} not installed "
                                     "(apt-get install slurmd slurmctld slurm-client munge)")
        try:
            self._start(wait_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, wait_s: float) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged: its socket's directory must be reachable by every user
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
        key = self.root / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        socket_path = self.root / "munge.socket"
        self._daemon(self.root / "munged.pid", [
            self.bin["munged"], "--force", f"--key-file={key}", f"--socket={socket_path}", f"--pid-file={self.root / 'munged.pid'}",
            f"--log-file={self.root / 'munged.log'}", f"--seed-file={self.root / 'munged.seed'}"])
        self.conf.write_text(self.slurm_conf(socket_path))
        self._daemon(self.root / "slurmctld.pid", [self.bin["slurmctld"], "-f", str(self.conf)])
        for node in NODES:
            self._daemon(self.root / f"slurmd.{node}.pid", [self.bin["slurmd"], "-f", str(self.conf), "-N", node])
        deadline, states = time.monotonic() + wait_s, ""
        while time.monotonic() < deadline:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            states = proc.stdout.strip().replace("\n", ", ")
            if proc.returncode == 0 and sorted(proc.stdout.split()) == sorted([*NODES, "idle", "idle"]):
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"the nodes are not idle after {wait_s:g}s (sinfo: {states or 'nothing'}); "
                                 f"slurmctld.log: {_tail(self.root / 'slurmctld.log')}")

    def slurm_conf(self, munge_socket: Path) -> str:
        """slurm.conf: root runs everything; processes tracked without cgroups (a container has
        none to give); jobs requeued on request; FIFO scheduling (a queued job starts as soon as
        the one before ends, not at the next backfill pass); job records kept 10 minutes after
        the end (``scontrol show job`` reads their state and exit code, no accounting daemon)."""
        r = self.root
        ports = [_free_port() for _ in range(1 + len(NODES))]
        nodes = "\n".join(f"NodeName={node} NodeHostname={self.host} Port={port} CPUs={self.cpus} RealMemory=8000"
                          for node, port in zip(NODES, ports[1:]))
        return f"""\
ClusterName=grpotest
SlurmctldHost={self.host}
SlurmctldPort={ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=60
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
"""

    def _daemon(self, pid_file: Path, cmd: list[str]) -> None:
        """Start a daemon (it forks into the background) and note its pid (from its pid file)."""
        pid_file.unlink(missing_ok=True)
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise ClusterUnavailable(f"{Path(cmd[0]).name} did not start ({proc.returncode}): "
                                     f"{(proc.stderr or proc.stdout).strip()[-500:]}")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                self._pids.append(int(pid_file.read_text().split()[0]))
                return
            except (OSError, ValueError, IndexError):  # not there yet, or half written
                time.sleep(0.1)
        raise ClusterUnavailable(f"{Path(cmd[0]).name} wrote no {pid_file.name} within 15s")

    def stop(self, grace_s: float = 30) -> None:
        """Cancel every job (waiting for them to end), then stop the daemons; a daemon still
        running after ``grace_s`` is killed. Nothing of the cluster is left running."""
        if self._pids:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=30)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                proc = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True, timeout=30)
                if proc.returncode != 0 or not proc.stdout.strip():
                    break
                time.sleep(0.5)
        # All at once: each takes about 2 s to shut down, none needs another for it.
        _terminate(self._pids, grace_s)
        self._pids = []

    # ------------------------------------------------------------------------------ jobs

    def run(self, *cmd: str, timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """A client command (sbatch, scontrol, ...) against this cluster."""
        proc = subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, ExitCode, Restarts, NodeList, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait_job(self, job_id: int | str, timeout: float = 300) -> dict[str, str]:
        """The job's fields once it has ended (raises TimeoutError with its state if it has not)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout:g}s")
            time.sleep(0.5)

    def steps_on(self, node: str, job_id: int | str) -> list[str]:
        """The job steps (``JOB.STEP``) the node's slurmd launched, from its log."""
        text = (self.root / f"slurmd.{node}.log").read_text(errors="replace")
        mark = f"launch task StepId={job_id}."
        return [line.split("StepId=")[1].split()[0] for line in text.splitlines() if mark in line]


def _terminate(pids: list[int], grace_s: float) -> None:
    """SIGTERM to each of ``pids``, SIGKILL to those still running ``grace_s`` later."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        time.sleep(0.1)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.slurm_cluster DIR")
    cluster = LocalCluster(Path(sys.argv[1]))
    try:
        cluster.start()
    except ClusterUnavailable as e:
        sys.exit(f"no SLURM cluster: {e}")
    print(f"two idle nodes; in another shell: export SLURM_CONF={cluster.conf}; Ctrl-C stops the cluster",
          flush=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # a kill stops it too
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
