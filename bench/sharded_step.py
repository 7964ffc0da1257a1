"""Sharded training on CPU: step time and memory of 1 trainer rank against 2 FSDP2 ranks (gloo).

    python bench/sharded_step.py                        # ~30M-parameter Qwen2, 16 sequences x 128 tokens
    python bench/sharded_step.py --rounds 1             # quicker
    python bench/sharded_step.py --hidden 256 --layers 2 --steps 2 --warmup 1   # a smoke run

Each rank is its own process with one thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``),
so 2 ranks use 2 cores against 1 rank's one. World size 1 is the plain ``PolicyTrainer`` (what
``train_model.num_devices=1`` runs); world size 2 is ``ShardedTrainer`` over a gloo group, driven as
the recipe drives it (rank 0 splits each micro-batch, rank 1 follows its commands). Both take the
same optimizer steps on the same fixed batch, in alternating rounds (1, 2, 1, 2, ...) so machine
noise hits both. Per rank it reports the median optimizer-step time after ``--warmup`` steps (and
the process's CPU seconds per step: with other jobs on the cores the wall time of 2 ranks rises
while their CPU time does not, so the two together tell contention from overhead), the
RSS high-water mark (``ru_maxrss``: model load and the first steps included; also less the
interpreter's and imports' RSS before the model loads, which no sharding can reduce), and the bytes of
parameters and AdamW state this rank holds (its shards; rank 0 of a sharded run also keeps the full
policy the loop generates with, counted separately).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- one rank (a subprocess)


def fixed_batch(n: int, seq: int, response: int, vocab: int):
    """``n`` sequences of ``seq`` tokens, the last ``response`` of which are the response: full
    masks, fixed advantages and behaviour log-probs (a mid-range importance ratio, clipped on some
    tokens), so every step does the same work."""
    import torch
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    return TensorDict({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                       "response_mask": torch.ones(n, response, dtype=torch.bool),
                       "advantage": torch.randn(n, generator=g),
                       "old_log_probs": -6 - torch.rand(n, response, generator=g)}, batch_size=[n])


def local_bytes(tensors) -> int:
    """Bytes of ``tensors`` this process holds (a DTensor's local shard only)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def worker(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from grpo_utils.algo.losses import ClippedSurrogateLoss
    from grpo_utils.train.trainer import PolicyTrainer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    a.base_rss = maxrss()  # the interpreter and its imports, before the model: the same for every rank
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    cfg = OmegaConf.create({"lr": 1e-5, "weight_decay": 0.0, "betas": [0.9, 0.999], "adam_eps": 1e-8,
                            "max_grad_norm": 1.0, "warmup_steps": 1, "max_steps": 1000, "min_lr_ratio": 0.1,
                            "grad_accum_steps": a.accum, "optim_batch_size": a.batch, "epochs": 1})
    loss = ClippedSurrogateLoss(aggregation="token_mean")
    group = None
    if a.world == 1:
        trainer = PolicyTrainer(model, loss, cfg, temperature=1.0)
    else:
        from grpo_utils.distributed.ranks import RankGroup
        from grpo_utils.train.sharded import ShardedTrainer

        store = dist.TCPStore("127.0.0.1", a.port, is_master=a.rank == 0, timeout=datetime.timedelta(seconds=300))
        dist.init_process_group("gloo", store=store, rank=a.rank, world_size=a.world)
        group = RankGroup(a.rank, a.world, a.rank, torch.device("cpu"))
        trainer = ShardedTrainer(model, loss, cfg, 1.0, group)
        if a.rank:
            cpu, c0 = [], time.process_time()
            while (command := group.receive())[0] != "stop":
                trainer.follow(*command)
                if command[0] == "step":
                    cpu.append(time.process_time() - c0)
                c0 = time.process_time()
            report(a, trainer, [], 0, cpu[a.warmup:])
            dist.destroy_process_group()
            return
    batch = fixed_batch(a.batch, a.seq, a.response, model.config.vocab_size)
    times, cpu = [], []
    for _ in range(a.warmup + a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = trainer.optimizer_step(batch)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        assert metrics["loss"] == metrics["loss"], "NaN loss"  # a broken step would time nothing useful
    full_policy = local_bytes(trainer.policy.parameters()) if group is not None else 0
    trainer.publish()
    report(a, trainer, times[a.warmup:], full_policy, cpu[a.warmup:])
    trainer.close()


def report(a: argparse.Namespace, trainer, times: list[float], full_policy: int, cpu: list[float]) -> None:
    """One JSON line: step wall times (rank 0), CPU seconds per step (this process's user + system
    time: below the wall time when the rank waits for the other or for a core), bytes held."""
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if hasattr(t, "numel") and t.ndim]
    print(json.dumps({
        "world": a.world, "rank": a.rank, "step_s": times, "cpu_s": cpu,
        "params_bytes": local_bytes(trainer.model.parameters()), "optim_bytes": local_bytes(state),
        "full_policy_bytes": full_policy,
        "maxrss_bytes": maxrss(), "base_rss_bytes": a.base_rss,
    }), flush=True)


def maxrss() -> int:
    """This process's RSS high-water mark in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- the driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(model_dir: Path, world: int, a: argparse.Namespace) -> list[dict]:
    """One training run on ``world`` rank processes; each rank's report, by rank."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    args = [f"--model={model_dir}", f"--world={world}", f"--port={port}", f"--batch={a.batch}", f"--seq={a.seq}",
            f"--response={a.response}", f"--accum={a.accum}", f"--steps={a.steps}", f"--warmup={a.warmup}"]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", f"--rank={r}", *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for r in range(world)]
    reports = []
    for r, p in enumerate(procs):
        out, err = p.communicate(timeout=3600)
        if p.returncode:
            raise SystemExit(f"rank {r} of {world} failed:\n{err[-3000:]}")
        reports.append(json.loads([line for line in out.splitlines() if line.startswith("{")][-1]))
    return reports


def mib(n: float) -> str:
    return f"{n / 2**20:7.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=10, help="head size hidden/heads; KV heads = heads/2")
    ap.add_argument("--batch", type=int, default=16, help="sequences per optimizer step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (prompt + response)")
    ap.add_argument("--response", type=int, default=96, help="response tokens per sequence (the loss's tokens)")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per round")
    ap.add_argument("--warmup", type=int, default=1, help="optimizer steps dropped at the start of each round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (1 rank, 2 ranks, ...)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    if a.batch % 2 or a.response >= a.seq:
        ap.error("--batch must be even (2 ranks split it) and --response < --seq")

    import transformers

    from grpo_utils.models.tiny import save_tiny

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny(Path(tmp) / "model", hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads)
        params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        print(f"Qwen2 hidden {a.hidden}, {a.layers} layers: {params / 1e6:.1f}M parameters; {a.batch} sequences x "
              f"{a.seq} tokens ({a.response} response), {a.accum} micro-batch(es); 1 thread per rank; "
              f"{a.rounds} alternating rounds of {a.steps} steps (+{a.warmup} warm-up)", flush=True)
        runs: dict[int, list[list[dict]]] = {1: [], 2: []}
        for r in range(a.rounds):
            for world in (1, 2):
                reports = run_world(model_dir, world, a)
                runs[world].append(reports)
                cpu_s = ", ".join(f"{statistics.median(rep['cpu_s']):.2f}" for rep in reports)
                print(f"  round {r}, {world} rank(s): {statistics.median(reports[0]['step_s']):.2f} s/step "
                      f"(CPU s/step by rank: {cpu_s}; load average {os.getloadavg()[0]:.1f})", flush=True)
    step = {w: statistics.median(t for reports in runs[w] for t in reports[0]["step_s"]) for w in runs}
    last = {w: runs[w][-1] for w in runs}
    rss = {(w, rank): max(reports[rank]["maxrss_bytes"] for reports in runs[w])
           for w in runs for rank in range(w)}
    base = {(w, rank): min(reports[rank]["base_rss_bytes"] for reports in runs[w])
            for w in runs for rank in range(w)}
    print()
    cpu = {(w, rank): statistics.median(t for reports in runs[w] for t in reports[rank]["cpu_s"])
           for w in runs for rank in range(w)}
    print("| ranks | rank | s/step (median) | speed-up | CPU s/step | params | AdamW state | full policy copy "
          "| peak RSS | of which above imports |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for w in (1, 2):
        for rank, rep in enumerate(last[w]):
            timing = (f"{step[w]:.2f} | {step[1] / step[w]:.2f}x" if rank == 0 else "(follows rank 0) | ")
            print(f"| {w} | {rank} | {timing} | {cpu[w, rank]:.2f} | {mib(rep['params_bytes'])} | "
                  f"{mib(rep['optim_bytes'])} | "
                  f"{mib(rep['full_policy_bytes']) if rep['full_policy_bytes'] else '-'} | {mib(rss[w, rank])} | "
                  f"{mib(rss[w, rank] - base[w, rank])} |")
    one = last[1][0]["params_bytes"] + last[1][0]["optim_bytes"]
    for rank in range(2):
        held = last[2][rank]["params_bytes"] + last[2][rank]["optim_bytes"]
        above = (rss[2, rank] - base[2, rank]) / (rss[1, 0] - base[1, 0])
        print(f"2 ranks, rank {rank}: parameter + AdamW state {held / one:.2f} of 1 rank's; "
              f"peak RSS {rss[2, rank] / rss[1, 0]:.2f} of 1 rank's ({above:.2f} above the imports)")


if __name__ == "__main__":
    main()
