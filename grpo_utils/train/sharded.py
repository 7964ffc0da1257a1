"""Training one policy on ``train_model.num_devices`` ranks with PyTorch FSDP2 (``fully_shard``).

Every rank holds a shard of the parameters, gradients and AdamW state. Rank 0 runs the loop as
with one device and keeps, besides its shard, the full policy the loop generates with,
evaluates and saves (:attr:`PolicyTrainer.policy`); :meth:`ShardedTrainer.publish` gathers the
trained weights into it when the loop next needs them (before a rollout's log-probs, an
evaluation, a weight push or a checkpoint). The other ranks only train: they carry out rank 0's
commands (:meth:`ShardedTrainer.follow`).

Exactness: rank 0 splits each micro-batch of a mini-batch into one contiguous part per rank and
sends the whole mini-batch's loss denominators (token and sequence counts) with them; gradients
are summed over ranks (FSDP averages them, so each rank's loss is scaled by N first: exact for
N a power of two, and gloo has no pre-scaled sum to avoid the scaling), so N ranks take
the optimizer step one rank takes on the same mini-batch (tested to 1e-6 in fp32). The logged
metrics are one rank's too: the ranks add up each micro-batch's metric sums (token sums and
counts, see ``LossOutput.sums``) and rank 0 computes the metrics of the whole micro-batch.

Checkpoints hold the full optimizer state in the one-device format (parameters numbered in
optimizer order), gathered to rank 0, so a run saved on N ranks resumes on M (1 included) and a
one-device checkpoint resumes on N ranks.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from tensordict import TensorDict

from grpo_utils.algo.losses import BatchNormalizer
from grpo_utils.errors import signals_deferred
from grpo_utils.train.trainer import PolicyTrainer

if TYPE_CHECKING:
    from grpo_utils.distributed.ranks import RankGroup


def shard_policy(model: torch.nn.Module, param_dtype: str | None = None) -> torch.nn.Module:
    """``fully_shard`` each transformer block (the classes a Hugging Face model lists as
    ``_no_split_modules``), then the whole model (embeddings, final norm, head), in place. With
    ``param_dtype`` (``train_model.fsdp_param_dtype``) the blocks are all-gathered and run in that
    dtype and gradients are reduced in fp32 (FSDP2's ``MixedPrecisionPolicy``)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if param_dtype is not None:
        policy = MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype), reduce_dtype=torch.float32)

    blocks = set()
    for module in model.modules():
        blocks.update(getattr(module, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


class ShardedTrainer(PolicyTrainer):
    """A :class:`PolicyTrainer` whose module is sharded over ``group``'s ranks. On rank 0
    ``model`` is the full policy (kept for the loop; a copy is sharded), on the others it is
    sharded itself. Construction is collective: every rank broadcasts-in rank 0's weights."""

    def __init__(self, model: torch.nn.Module, loss_fn: torch.nn.Module, train_cfg, temperature: float,
                 group: RankGroup, ref_model: torch.nn.Module | None = None):
        self.group = group
        sharded = shard_policy(copy.deepcopy(model) if group.is_driver else model,
                               train_cfg.get("fsdp_param_dtype"))
        super().__init__(sharded, loss_fn, train_cfg, temperature, ref_model)
        self.policy = model if group.is_driver else None
        self._load_weights()
        self._stale = False  # whether the shards hold weights the full policy has not got yet

    # ---------------------------------------------------------------- rank 0: the loop's calls
    def optimizer_step(self, minibatch: TensorDict) -> dict[str, float]:
        with signals_deferred():  # a step half-done on rank 0 only would deadlock the ranks
            return self._driver_step(minibatch)

    def _driver_step(self, minibatch: TensorDict) -> dict[str, float]:
        t0 = time.perf_counter()
        n = self.group.world_size
        normalizer = BatchNormalizer.from_mask(minibatch["response_mask"])
        if self.max_tokens is None:
            parts = [mb.chunk(n) for mb in minibatch.chunk(self.grad_accum_steps)]
        else:  # token-budget groups, n at a time: one for each rank per micro-step
            groups = self.micro_batches(minibatch, parts=n)
            parts = [groups[i:i + n] for i in range(0, len(groups), n)]
        self.group.send("step", [None] + [(normalizer, [p[r].cpu() for p in parts]) for r in range(1, n)])
        self._stale = True
        sums = self._step(normalizer, [p[0] for p in parts])
        sums["time/train_s"] = time.perf_counter() - t0
        return sums

    @torch.no_grad()
    def annotate(self, batch: TensorDict, need_behaviour: bool, micro_batch_size: int) -> None:
        self.publish()  # behaviour log-probs come from the full policy, which must be current
        super().annotate(batch, need_behaviour, micro_batch_size)

    def publish(self) -> None:
        if self._stale:
            with signals_deferred():  # a step half-done on rank 0 only would deadlock the ranks
                self.group.send("publish")
                self._gather()
                self._stale = False

    def state_dict(self) -> dict[str, Any]:
        with signals_deferred():  # a step half-done on rank 0 only would deadlock the ranks
            self.group.send("state")
            named = self._optimizer_state()
        return {**super().state_dict(), "optimizer": _numbered(named, self._optimizer_names())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the optimizer (any world size's checkpoint) on every rank, and the schedule."""
        named = _named(state["optimizer"], self._optimizer_names())
        rest = {k: v for k, v in state.items() if k != "optimizer"}
        with signals_deferred():  # a step half-done on rank 0 only would deadlock the ranks
            self.group.send("load", [None] + [rest] * (self.group.world_size - 1))
            self._load_optimizer(named, rest)

    def close(self) -> None:
        self.group.close()

    # ------------------------------------------------------------------ every rank
    def follow(self, name: str, payload: Any) -> None:
        """Carry out rank 0's command ``name`` on a rank > 0."""
        if name == "step":
            normalizer, parts = payload
            self._step(normalizer, [p.to(self.group.device) for p in parts])
        elif name == "publish":
            self._gather()
        elif name == "state":
            self._optimizer_state()
        elif name == "load":
            self._load_optimizer({}, payload)
        else:
            raise ValueError(f"unknown trainer command {name!r}")

    def _backward(self, loss: torch.Tensor) -> None:
        super()._backward(loss * self.group.world_size)

    @property
    def _parts(self) -> int:
        return self.group.world_size

    def _combine(self, table: torch.Tensor) -> torch.Tensor:
        """Each micro-batch's loss and metric sums added up over the ranks (one all-reduce), so
        rank 0 logs the metrics of whole micro-batches, as one rank would."""
        table = table.to(self.group.device)
        dist.all_reduce(table)
        return table

    @torch.no_grad()
    def _load_weights(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = self.policy.state_dict() if self.group.is_driver else {}
        set_model_state_dict(self.model, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    @torch.no_grad()
    def _gather(self) -> None:
        """All-gather each trained parameter, one at a time (rank 0 copies it into the full
        policy), so no rank ever holds a second full copy of the model."""
        target = dict(self.policy.named_parameters()) if self.group.is_driver else None
        for name, param in self.model.named_parameters():
            if not param.requires_grad:  # frozen (e.g. LoRA's base weights): never changes
                continue
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            if target is not None:
                target[name].copy_(full)

    def _optimizer_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load_optimizer(self, named: dict[str, Any], rest: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, named,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        super().load_state_dict({"optimizer": None, **rest}, optimizer=False)

    def _optimizer_names(self) -> list[str]:
        """Parameter names in the optimizer's order (the numbering of a one-device checkpoint)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]


def _numbered(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A name-keyed optimizer state (``get_optimizer_state_dict``) as ``optimizer.state_dict()``
    of the same model on one device numbers it."""
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def _named(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Inverse of :func:`_numbered`."""
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
