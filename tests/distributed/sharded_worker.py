"""One trainer rank for tests/distributed/test_sharded.py (run as a script, one process per rank).

For each case of ``--cases`` (``aggregation:accumulation_steps``, comma-separated) rank 0 builds a
fresh trainer, takes ``--steps`` optimizer steps on a fixed ragged mini-batch, and keeps the full
weights, each step's metrics and the trainer's checkpoint state; all cases go to ``--out`` as one
dict. Other ranks follow it. World size 1 is the plain one-device PolicyTrainer, the reference the
sharded one must match. One process per rank for all cases: starting them dominates the test's time.
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tensordict import TensorDict
from transformers import AutoModelForCausalLM

from grpo_utils.algo.losses import ClippedSurrogateLoss
from grpo_utils.distributed.ranks import RankGroup
from grpo_utils.train.sharded import ShardedTrainer
from grpo_utils.train.trainer import PolicyTrainer


def ragged_batch(n: int = 8, prompt: int = 5, response: int = 6) -> TensorDict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (n, prompt + response), generator=g)
    lengths = torch.randint(1, response + 1, (n,), generator=g)
    mask = torch.arange(response)[None, :] < lengths[:, None]
    old = -3 - torch.rand(n, response, generator=g)
    return TensorDict({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                       "response_mask": mask, "advantage": torch.randn(n, generator=g),
                       "old_log_probs": old, "rollout_log_probs": old + 0.5 * torch.randn(n, response, generator=g)},
                      batch_size=[n])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cases", default="token_mean:1")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--param-dtype", help="train_model.fsdp_param_dtype")
    p.add_argument("--weights", help="a state dict to start from")
    p.add_argument("--trainer-state", help="a trainer state (optimizer, schedule) to resume")
    a = p.parse_args()
    torch.set_num_threads(1)
    group = None
    if a.world > 1:
        store = dist.TCPStore("127.0.0.1", a.port, is_master=a.rank == 0, timeout=datetime.timedelta(seconds=120))
        dist.init_process_group("gloo", store=store, rank=a.rank, world_size=a.world)
        group = RankGroup(a.rank, a.world, a.rank, torch.device("cpu"))
    results = {}
    for case in a.cases.split(","):
        # aggregation:accum[:packed][:tokens=N] (train.packing, train.max_tokens_per_micro_batch)
        aggregation, accum, *flags = case.split(":")
        tokens = next((int(f.split("=")[1]) for f in flags if f.startswith("tokens=")), None)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        if a.weights:
            model.load_state_dict(torch.load(a.weights))
        cfg = OmegaConf.create({"lr": 1e-3, "weight_decay": 0.01, "betas": [0.9, 0.99], "adam_eps": 1e-8,
                                "max_grad_norm": 1.0, "warmup_steps": 1, "max_steps": 10, "min_lr_ratio": 0.1,
                                "grad_accum_steps": int(accum), "optim_batch_size": 8, "epochs": 1,
                                "fsdp_param_dtype": a.param_dtype, "packing": "packed" in flags,
                                "max_tokens_per_micro_batch": tokens})
        # a truncated IS correction: the metrics of the rollout mismatch and its weights are logged too
        loss = ClippedSurrogateLoss(aggregation=aggregation, is_correction="truncate", is_cap=1.5)
        if group is None:
            trainer = PolicyTrainer(model, loss, cfg, temperature=0.9)
        else:
            trainer = ShardedTrainer(model, loss, cfg, 0.9, group)
            if a.rank:
                while (command := group.receive())[0] != "stop":
                    trainer.follow(*command)
                continue
        if a.trainer_state:
            trainer.load_state_dict(torch.load(a.trainer_state, weights_only=False))
        batch = ragged_batch()
        metrics = [trainer.optimizer_step(batch) for _ in range(a.steps)]
        trainer.publish()
        results[case] = {"weights": {k: v.clone() for k, v in trainer.policy.state_dict().items()},
                         "metrics": metrics, "trainer": trainer.state_dict()}
        if group is not None:
            group.send("stop")  # this case's followers move on to the next
    if group is not None:
        dist.destroy_process_group()
    if a.rank == 0:
        torch.save(results, a.out)


if __name__ == "__main__":
    main()
