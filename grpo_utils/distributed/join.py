"""The entry point of every trainer rank but rank 0, and of the nodes that join a multi-node run.

    python -m grpo_utils.distributed.join --address HOST:PORT --node-rank I   # on node I >= 1

A rank reads the run's config from rank 0's store (:mod:`grpo_utils.distributed.ranks`), builds
its shard of the policy and optimizer exactly as rank 0 does, then carries out rank 0's commands.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
import torch.distributed as dist

from grpo_utils.distributed.ranks import RankGroup, fetch_config, init_group, rank_device, ranks_per_node, spawn_rank
from grpo_utils.errors import ConfigError, GRPOError


def leave_stops_to_rank_0() -> None:
    """Ctrl-C in a terminal and a scheduler's SIGTERM reach every process of the job: once the
    run's ranks exist only rank 0 acts on them (it finishes the ranks' current command,
    checkpoints with them, then sends stop). A rank that died of the signal itself would leave
    rank 0 nothing to checkpoint with. A joining node's launcher still waiting for the run's
    config (rank 0 may have stopped before publishing it) keeps the default: a stop ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def follow(address: str, rank: int, local_rank: int, world_size: int) -> None:
    """A rank > 0: build this rank's shard of the policy and its optimizer from the run's config,
    then carry out rank 0's commands until it says stop."""
    from grpo_utils import build
    from grpo_utils.config.validate import resolve_device, seed_everything
    from grpo_utils.models.loading import resolve_model_path
    from grpo_utils.train.run import quiet_libraries

    leave_stops_to_rank_0()
    store, cfg = fetch_config(address)
    device = rank_device(resolve_device(cfg.device), local_rank)
    torch.set_num_threads(cfg.num_threads or 1)
    seed_everything(cfg.seed)
    quiet_libraries()
    # Build a builtin model (cold cache) before joining the group: in an initialized process group
    # transformers' save_pretrained writes weights on rank 0 only, so this rank would cache a
    # model directory holding just the tokenizer, which every later run then fails to load.
    resolve_model_path(cfg.model.name)
    init_group(store, rank, world_size, device, cfg)
    group = RankGroup(rank, world_size, local_rank, device)
    try:
        model, _ = build.policy(cfg, device)
        trainer = build.trainer(cfg, model, build.loss(cfg.loss), group=group)
        while True:
            name, payload = group.receive()
            if name == "stop":
                break
            trainer.follow(name, payload)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def join_node(address: str, node_rank: int) -> int:
    """A node other than rank 0's: start its ranks and wait for them; returns the worst exit code."""
    _, cfg = fetch_config(address)
    per_node, world = ranks_per_node(cfg), cfg.train_model.num_devices
    if not 0 < node_rank < cfg.train_model.num_nodes:
        raise ConfigError(f"--node-rank {node_rank}: train_model.num_nodes={cfg.train_model.num_nodes} "
                          f"has nodes 1..{cfg.train_model.num_nodes - 1} to join")
    leave_stops_to_rank_0()
    children = [spawn_rank(address, rank=node_rank * per_node + r, local_rank=r, world_size=world)
                for r in range(per_node)]
    return max(child.wait() for child in children)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpo_utils.distributed.join",
                                     description="Join a GRPO run's trainer ranks (started by its recipe).")
    parser.add_argument("--address", required=True, help="the run's train_model.rendezvous, HOST:PORT")
    parser.add_argument("--node-rank", type=int, help="this node's index (1..num_nodes-1): start its ranks")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        if args.node_rank is not None:
            return join_node(args.address, args.node_rank)
        follow(args.address, args.rank, args.local_rank, args.world_size)
    except GRPOError as e:
        print(f"trainer rank {args.rank if args.node_rank is None else 'node ' + str(args.node_rank)}: "
              f"{e.one_line()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
