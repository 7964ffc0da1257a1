"""Trainer ranks: ``train_model.num_devices`` processes training one policy with FSDP2.

Rank 0 is the recipe's own process: it runs the loop (rollout, rewards, logging, checkpoints)
exactly as with one device, and drives the other ranks, which only train (see
:class:`~grpo_utils.train.sharded.ShardedTrainer`). The recipe launches the ranks itself, like
``torchrun`` would, so a user runs the same command for 1 or N devices:

* on one node (``train_model.num_nodes=1``) rank 0 starts ranks 1..N-1 as child processes of
  ``python -m grpo_utils.distributed.join``; they die with it (``PR_SET_PDEATHSIG``);
* over several nodes, each other node runs one ``python -m grpo_utils.distributed.join
  --address HOST:PORT --node-rank I`` (the sbatch scripts do), which starts that node's ranks.

Every rank reads the run's resolved config from rank 0's TCP store (the rendezvous at
``train_model.rendezvous``), so the joining nodes need no command line of their own and no
Hydra run directory. Rank 0 sends each command to all ranks with one ``scatter_object_list``
(each rank gets its own payload), which keeps the collectives in the same order on every rank.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from grpo_utils.errors import ConfigError, GRPOError

_CONFIG_KEY = "grpo/config"
_STORE_TIMEOUT = datetime.timedelta(minutes=10)  # joining nodes and local ranks starting up


class RankFailed(GRPOError, RuntimeError):
    """Another trainer rank stopped or cannot be reached (its own error is in its output)."""


@dataclass
class RankGroup:
    """This process's place among the trainer ranks and the commands between them."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    children: list[subprocess.Popen] = field(default_factory=list)
    closing: bool = False

    def watch_children(self) -> None:
        """Rank 0: end this process when one of its node's ranks dies before :meth:`close`.

        Rank 0 would otherwise wait in its next collective until ``train_model.timeout_s`` (gloo
        and NCCL cannot be interrupted from Python, and signals wait for the collective to
        return). A thread polls the children and, on a death, prints one line and exits at once:
        no checkpoint can be gathered without that rank, and the last one written stays intact.
        Ranks on other nodes that die close their connections, which fails the collective."""
        def watch() -> None:
            while not self.closing:
                for rank, child in enumerate(self.children, start=1):
                    code = child.poll()
                    if code is not None and not self.closing:
                        print(f"trainer rank {rank} stopped (exit code {code}; its error is above); stopping the "
                              "run", file=sys.stderr, flush=True)
                        os._exit(1)
                time.sleep(0.5)

        threading.Thread(target=watch, name="trainer-ranks-watch", daemon=True).start()

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def send(self, name: str, payloads: list[Any] | None = None) -> Any:
        """Rank 0: give every rank the command ``name`` with its own payload (``payloads[r]``;
        None: no payload); returns rank 0's own payload."""
        items = [(name, None if payloads is None else payloads[r]) for r in range(self.world_size)]
        out: list[Any] = [None]
        self._collective(dist.scatter_object_list, out, items, src=0)
        return out[0][1]

    def receive(self) -> tuple[str, Any]:
        """Ranks > 0: the next command and this rank's payload."""
        out: list[Any] = [None]
        self._collective(dist.scatter_object_list, out, None, src=0)
        return out[0]

    def _collective(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as e:
            raise RankFailed(f"trainer rank communication failed: {str(e).splitlines()[0]}") from None

    def abort(self) -> None:
        """Rank 0 failed before the ranks reached their command loop: kill this node's, leave."""
        self.closing = True
        for child in self.children:
            child.kill()
        self._leave()

    def close(self) -> None:
        """Stop the other ranks (rank 0) and leave the process group."""
        self.closing = True
        if self.is_driver and dist.is_initialized():
            try:
                self.send("stop")
            except RankFailed:
                pass
        self._leave()

    def _leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        for child in self.children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        self.children.clear()


def ranks_per_node(cfg: DictConfig) -> int:
    """Trainer ranks on each node: ``train_model.num_devices / train_model.num_nodes``."""
    return (OmegaConf.select(cfg, "train_model.num_devices", default=1)
            // OmegaConf.select(cfg, "train_model.num_nodes", default=1))


def host_port(address: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[v6]:PORT`` too) split, or None when ``address`` is not one (e.g. Ray's
    ``auto`` or a URL)."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "://" in address:
        return None
    return host.strip("[]"), int(port)


def rank_device(base: torch.device, local_rank: int) -> torch.device:
    """Rank ``r`` of a node trains on the node's ``r``-th GPU after the trainer's first (CPU ranks share the CPU)."""
    if base.type != "cuda":
        return base
    return torch.device("cuda", (base.index or 0) + local_rank)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timeout(cfg: DictConfig) -> datetime.timedelta:
    return datetime.timedelta(seconds=cfg.train_model.timeout_s)


def init_group(store: dist.Store, rank: int, world_size: int, device: torch.device, cfg: DictConfig) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=world_size, timeout=_timeout(cfg))


def start(cfg: DictConfig, device: torch.device) -> RankGroup:
    """Rank 0 (the recipe's process): open the rendezvous, publish the resolved config, start
    this node's other ranks and join the process group with them (and with the ranks the other
    nodes start when they join)."""
    world, per_node = cfg.train_model.num_devices, ranks_per_node(cfg)
    address = cfg.train_model.rendezvous or f"127.0.0.1:{_free_port()}"
    host, port = host_port(address)
    try:
        store = dist.TCPStore(host if cfg.train_model.rendezvous else "127.0.0.1", port, world_size=None,
                              is_master=True, timeout=_STORE_TIMEOUT, wait_for_workers=False)
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"train_model.rendezvous={address}: cannot listen there ({str(e).splitlines()[0]})") \
            from None
    store.set(_CONFIG_KEY, OmegaConf.to_yaml(cfg, resolve=True))
    children = [spawn_rank(f"127.0.0.1:{port}", rank=r, local_rank=r, world_size=world) for r in range(1, per_node)]
    group = RankGroup(0, world, 0, device, children)
    group.watch_children()
    try:
        init_group(store, 0, world, device, cfg)
    except BaseException:
        group.close()
        raise
    return group


def spawn_rank(address: str, rank: int, local_rank: int, world_size: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "grpo_utils.distributed.join", "--address", address, "--rank", str(rank),
            "--local-rank", str(local_rank), "--world-size", str(world_size)]
    return subprocess.Popen(args, preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    """In a child before exec: SIGKILL when the process that started it dies (Linux), so a rank
    never outlives rank 0 waiting in a collective (e.g. after ``kill -9`` of the recipe)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def fetch_config(address: str) -> tuple[dist.Store, DictConfig]:
    """The run's resolved config from rank 0's store at ``address`` (HOST:PORT)."""
    host, port = host_port(address)
    store = dist.TCPStore(host, port, is_master=False, timeout=_STORE_TIMEOUT)
    return store, OmegaConf.create(store.get(_CONFIG_KEY).decode())
