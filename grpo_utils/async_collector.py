"""Async collection: Ray collector actors that generate scored groups with their own copy of the
policy and push them into a bounded queue; the trainer pulls them, drops stale ones and pushes
new weights back through the object store.

Every batch carries the policy version that generated it and its behaviour log-probs
(``old_log_probs``), computed in the actor with the very weights that sampled, so the
importance ratio of a stale sample is taken against the right policy.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import ray
import torch
from omegaconf import OmegaConf
from ray.util.queue import Empty, Full
from tensordict import TensorDict

# Test hook: a collector exits (as a crash would) after this many batches.
DIE_AFTER_ENV = "GRPO_ASYNC_TEST_COLLECTOR_DIES_AFTER"


class CollectorFailed(RuntimeError):
    """A collector actor died or stopped answering; the message says which and why."""


def batch_to_payload(batch: TensorDict, stats: dict[str, float], worker: int) -> dict[str, Any]:
    """A plain, picklable dict of CPU tensors (plus the rollout stats)."""
    return {"tensors": {k: v.detach().cpu() for k, v in batch.items()}, "size": batch.batch_size[0],
            "stats": stats, "worker": worker}


def payload_to_batch(payload: dict[str, Any]) -> TensorDict:
    return TensorDict(dict(payload["tensors"]), batch_size=[payload["size"]])


def sample_ages(policy_version: torch.Tensor, current_version: int) -> torch.Tensor:
    """Policy age of each sample: how many weight pushes happened since it was generated."""
    return current_version - policy_version.long()


@torch.no_grad()
def behaviour_log_probs(model, batch: TensorDict, temperature: float, micro_batch_size: int) -> torch.Tensor:
    """Exact log-probs of the sampled response tokens under ``model`` (the weights that sampled)."""
    from grpo_utils.logprobs import response_log_probs

    was_training = model.training
    model.eval()
    out = []
    for mb in batch.split(micro_batch_size):
        start = mb["input_ids"].shape[1] - mb["response_mask"].shape[1]
        out.append(response_log_probs(model, mb["input_ids"], mb["attention_mask"], start, temperature)[0])
    model.train(was_training)
    return torch.cat(out)


class RolloutWorker:
    """Body of a collector actor (wrapped with ``ray.remote`` by :func:`make_collector_class`).

    ``run`` loops: apply pending weights, generate one scored batch, push it to the queue.
    ``update_weights`` may arrive at any time (threaded actor); weights are only swapped
    between generations.
    """

    def __init__(self, cfg: dict, worker_index: int, queue, shaping, keep_rollout_log_probs: bool,
                 micro_batch_size: int, die_after: int = 0):
        import tensordict

        tensordict.set_list_to_stack(True).set()
        torch.set_num_threads(1)
        from grpo_utils.config import seed_everything
        from grpo_utils.data import PromptStream, load_split, renderer_from_config
        from grpo_utils.models import load_policy
        from grpo_utils.rewards import build_reward
        from grpo_utils.rollout import GroupRollout, generation_kwargs

        cfg = OmegaConf.create(cfg)
        seed = cfg.seed + 1000 * worker_index
        seed_everything(seed)
        device = torch.device("cuda" if cfg.mode.get("collector_gpus", 0) and torch.cuda.is_available() else "cpu")
        self.model, tokenizer, _ = load_policy(cfg.model, device)
        self.model.eval()
        rows = load_split(cfg.env, "train")
        renderer = renderer_from_config(cfg.env, tokenizer)
        # Each collector walks its own seeded permutation of the training rows.
        stream = PromptStream(rows, cfg.env.num_prompts, seed=seed, shuffle=cfg.env.shuffle)
        self.rollout = GroupRollout(self.model, tokenizer, renderer, build_reward(cfg.reward),
                                    generation_kwargs(cfg.generation), cfg.env.group_size, stream,
                                    keep_rollout_log_probs=keep_rollout_log_probs)
        self.temperature = cfg.generation.temperature
        self.worker_index = worker_index
        self.queue = queue
        self.shaping = shaping
        self.micro_batch_size = micro_batch_size
        self.put_timeout = float(cfg.mode.get("actor_timeout_s", 120.0))
        self.die_after = die_after
        self.version = 0
        self.batches = 0
        self._lock = threading.Lock()
        self._pending: tuple[int, dict] | None = None
        self._stop = False

    def ready(self) -> int:
        return self.worker_index

    def update_weights(self, state_dict: dict, version: int) -> None:
        with self._lock:
            self._pending = (version, state_dict)

    def stop(self) -> None:
        self._stop = True

    def _apply_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            version, state = pending
            self.model.load_state_dict(state)
            self.version = version

    def run(self) -> int:
        """Generate until stopped; returns the number of batches pushed."""
        while not self._stop:
            self._apply_pending()
            batch, stats = self.rollout.collect(policy_version=self.version, shaping=self.shaping)
            batch["old_log_probs"] = behaviour_log_probs(self.model, batch, self.temperature, self.micro_batch_size)
            if "rollout_log_probs" in batch.keys():
                # TorchRL's wrapper reports 0 for the first sampled token: use the exact value there.
                batch["rollout_log_probs"][:, 0] = batch["old_log_probs"][:, 0]
            payload = batch_to_payload(batch, stats, self.worker_index)
            deadline = time.monotonic() + self.put_timeout
            while not self._stop:
                try:
                    # The queue actor itself enforces the timeout; the ray.get bound is a backstop.
                    ray.get(self.queue.actor.put.remote(payload, 1.0), timeout=30)
                    break
                except (Full, ray.exceptions.GetTimeoutError):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"collector {self.worker_index}: queue full for "
                                           f"{self.put_timeout:g}s (trainer not pulling)") from None
            self.batches += 1
            if self.die_after and self.batches >= self.die_after:
                os._exit(1)  # simulates a crash (test hook)
        return self.batches


def make_collector_class(num_cpus: float, num_gpus: float):
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=2, max_restarts=0)(RolloutWorker)


class CollectorPool:
    """The collector actors, the bounded queue they fill, and the weight pushes to them."""

    def __init__(self, cfg: dict, num_collectors: int, num_cpus: float, num_gpus: float, buffer_size: int,
                 timeout_s: float, shaping, keep_rollout_log_probs: bool, micro_batch_size: int):
        from ray.util.queue import Queue

        self.timeout_s = timeout_s
        self.queue = Queue(maxsize=buffer_size, actor_options={"num_cpus": 0})
        die_after = int(os.environ.get(DIE_AFTER_ENV, "0") or 0)
        cls = make_collector_class(num_cpus, num_gpus)
        self.actors = [cls.remote(cfg, i, self.queue, shaping, keep_rollout_log_probs, micro_batch_size,
                                  die_after) for i in range(num_collectors)]
        self._get(*(a.ready.remote() for a in self.actors), what="start")
        self.runs = {a.run.remote(): i for i, a in enumerate(self.actors)}

    def all_actors(self) -> list:
        return [*self.actors, self.queue.actor]

    def _get(self, *refs, what: str):
        try:
            return ray.get(list(refs), timeout=self.timeout_s)
        except ray.exceptions.RayActorError as e:
            raise CollectorFailed(f"collector actor died during {what}: {_first_line(e)}") from None
        except ray.exceptions.GetTimeoutError:
            raise CollectorFailed(f"collector actors did not {what} within mode.actor_timeout_s="
                                  f"{self.timeout_s:g}s") from None

    def check_alive(self) -> None:
        """Raise :class:`CollectorFailed` if any collector's ``run`` has ended (crash or error)."""
        done, _ = ray.wait(list(self.runs), num_returns=len(self.runs), timeout=0)
        for ref in done:
            index = self.runs[ref]
            try:
                ray.get(ref, timeout=self.timeout_s)
                reason = "stopped unexpectedly"
            except ray.exceptions.RayActorError as e:
                reason = f"died ({_first_line(e)})"
            except ray.exceptions.RayTaskError as e:
                reason = f"failed: {_first_line(e.cause if getattr(e, 'cause', None) else e)}"
            raise CollectorFailed(f"collector actor {index} {reason}")

    def get(self) -> tuple[dict[str, Any], int]:
        """The next batch payload and the queue size after taking it; polls the collectors'
        health every second and gives up after ``timeout_s`` without a batch."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            self.check_alive()
            try:
                payload = ray.get(self.queue.actor.get.remote(1.0), timeout=self.timeout_s)
                size = ray.get(self.queue.actor.qsize.remote(), timeout=self.timeout_s)
                return payload, size
            except ray.exceptions.RayActorError as e:
                raise CollectorFailed(f"the rollout queue actor died: {_first_line(e)}") from None
            except Empty:
                pass
            if time.monotonic() > deadline:
                self.check_alive()
                raise CollectorFailed(f"no rollout batch within mode.actor_timeout_s={self.timeout_s:g}s")

    def push_weights(self, model: torch.nn.Module, version: int) -> None:
        """One ``ray.put`` of the CPU weights, shared by all collectors (applied between generations)."""
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        ref = ray.put(state)
        for actor in self.actors:
            actor.update_weights.remote(ref, version)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
