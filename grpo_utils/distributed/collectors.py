"""Ray collector actors: each builds its own copy of the policy from the model path, generates
scored groups with it, applies the group advantage, and hands the batch to the trainer.

Two ways to drive them:

* ``grpo-async.py``: :class:`CollectorPool` with ``streaming=True``: every actor generates
  continuously into a bounded queue; the trainer pulls, drops stale batches, pushes weights.
* ``grpo-sync.py mode.ray=true``: :class:`RayRollout` asks the one actor for a batch made with a
  given policy version (``sync_iter=true``: the newest, age 0) or keeps one request in flight
  while the trainer trains (``sync_iter=false``: age at most 1).

Every batch carries the policy version that generated it and its behaviour log-probs
(``old_log_probs``), computed in the actor with the very weights that sampled, so the importance
ratio of a stale sample is taken against the right policy. With it comes the actor's prompt-stream
position and RNG state after that batch, which checkpoints store so a resumed run neither repeats
nor skips prompts.

We use a ``ray.util.queue.Queue`` rather than TorchRL's ``RayReplayBuffer``: batches must be
consumed once each, in order per actor, and a full buffer must block the writers (backpressure
bounds staleness); a replay buffer samples with replacement and overwrites when full.
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

from grpo_utils.errors import CollectorFailed

# Test hook: a collector exits (as a crash would) once it has produced this many batches.
DIE_AFTER_ENV = "GRPO_TEST_COLLECTOR_DIES_AFTER"


class CollectorDied(CollectorFailed):
    """The actor process is gone (crash, OOM kill): it may be restarted."""


def payload_to_batch(payload: dict[str, Any]) -> TensorDict:
    return TensorDict(dict(payload["tensors"]), batch_size=[payload["size"]])


def sample_ages(policy_version: torch.Tensor, current_version: int) -> torch.Tensor:
    """Policy age of each sample: how many weight pushes happened since it was generated."""
    return current_version - policy_version.long()


def staleness_stats(ages: torch.Tensor) -> dict[str, float]:
    return {"staleness/mean": ages.float().mean().item(), "staleness/max": int(ages.max())}


class RolloutWorker:
    """Body of a collector actor (wrapped with ``ray.remote`` by :func:`make_collector_class`).

    Threaded (two concurrent calls): ``update_weights`` may arrive while a batch is being
    generated; the new weights are swapped in only between batches.
    """

    def __init__(self, cfg: dict, worker_index: int, receiver, queue=None, start: dict | None = None):
        import tensordict

        tensordict.set_list_to_stack(True).set()
        from grpo_utils import build
        from grpo_utils.config.validate import seed_everything
        from grpo_utils.data.datasets import load_split
        from grpo_utils.data.prompts import PromptStream

        cfg = OmegaConf.create(cfg)
        torch.set_num_threads(max(1, int(cfg.mode.get("collector_cpus", 1))))
        seed = cfg.seed + 1000 * (worker_index + 1)
        seed_everything(seed)
        use_gpu = cfg.inference_model.num_devices and torch.cuda.is_available()
        # The same builders as the trainer's (grpo_utils.build), so a part is configured one way.
        self.model, tokenizer = build.policy(cfg, torch.device("cuda" if use_gpu else "cpu"), for_training=False)
        self.model.eval()
        self.loss_fn = build.loss(cfg.loss)  # the trainer's loss: its rollout shaping and reward-side terms
        self.cfg = cfg
        self.advantages = build.advantage_stage(cfg, self.loss_fn)
        # Each collector walks its own seeded permutation of the training rows; collector 0 the
        # same one as the local loop (the same rows: those whose prompt fits the context), so a run
        # can switch between mode.ray=false/true on resume.
        rows = load_split(cfg.env, "train")
        renderer = build.renderer(cfg.env, tokenizer, rows[0])
        (rows,) = build.prompts_that_fit(cfg, self.model, tokenizer, renderer, report=False, train=rows)
        self.stream = PromptStream(rows, cfg.env.num_prompts, seed=cfg.seed + 1000 * worker_index,
                                   shuffle=cfg.env.shuffle)
        self.rollout = build.rollout(cfg, self.model, tokenizer, renderer, build.reward(cfg), self.stream,
                                     self.loss_fn, seed=seed, colocated=False)
        self.micro_batch_size = cfg.train.optim_batch_size // cfg.train.grad_accum_steps
        self.timeout_s = float(cfg.mode.get("actor_timeout_s", 120.0))
        self.worker_index = worker_index
        self.receiver = receiver
        self.queue = queue
        self.die_after = int(os.environ.get(DIE_AFTER_ENV, "0") or 0)
        self.batches = 0
        self.version = 0
        self._cond = threading.Condition()
        self._pending: tuple[int, dict] | None = None
        if start:
            self.load_state(start)
        if cfg.mode.get("in_flight_updates", False):
            # vLLM generates in chunks and takes weights that arrived between two of them
            self.rollout.generator.chunk_tokens = int(cfg.mode.in_flight_chunk_tokens)
            self.rollout.generator.between_chunks = self._take_weights_in_flight

    def ready(self) -> int:
        return self.worker_index

    def connect_weight_sync(self) -> None:
        self.receiver.connect(self.model)

    def load_state(self, state: dict) -> None:
        """Continue from a checkpointed position: prompt stream, RNGs and policy version."""
        from grpo_utils.train.checkpoint import restore_rng_state

        self.stream.load_state_dict(state["prompts"])
        restore_rng_state(state["rng"])
        self.version = int(state["version"])

    def update_weights(self, payload, version: int) -> None:
        state = self.receiver.receive(payload)
        with self._cond:
            self._pending = (version, state)
            self._cond.notify_all()

    def _apply_pending(self, min_version: int) -> None:
        """Load the newest received weights; wait (bounded) until they are at least ``min_version``."""
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while max(self.version, self._pending[0] if self._pending else -1) < min_version:
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"collector {self.worker_index}: weights of policy version {min_version} "
                                       f"did not arrive within {self.timeout_s:g}s")
            pending, self._pending = self._pending, None
        if pending is not None:
            version, state = pending
            self.model.load_state_dict(state)
            self.rollout.sync_weights(self.model, version)  # a vLLM engine gets them (and is probed) here
            self.version = version

    def _take_weights_in_flight(self) -> int:
        """Between two chunks of a generation: load weights that arrived meanwhile (no waiting);
        the policy version the next chunk samples with."""
        with self._cond:
            pending, self._pending = self._pending, None
        if pending is not None:
            version, state = pending
            self.model.load_state_dict(state)
            self.rollout.sync_weights(self.model, version)  # into vLLM (prefix cache reset), probed
            self.version = version
        return self.version

    def collect_batch(self, min_version: int = 0) -> dict[str, Any]:
        """One scored batch from weights of at least ``min_version``, as a picklable payload."""
        from grpo_utils.algo.logprobs import add_behaviour_log_probs
        from grpo_utils.train.checkpoint import capture_rng_state

        if self.die_after and self.batches >= self.die_after:
            os._exit(1)  # simulates a crash (test hook)
        self._apply_pending(min_version)
        batch, stats = self.rollout.collect(policy_version=self.version)
        if self.cfg.inference_model.backend != "vllm":  # with vLLM the trainer computes them (see the loop)
            add_behaviour_log_probs(self.model, batch, self.cfg.generation.temperature, self.micro_batch_size,
                                    self.cfg.train.packing)
        if not self.loss_fn.kl_in_reward:  # a KL-in-reward penalty needs the trainer's reference model
            stats |= self.advantages(batch)
        self.batches += 1
        return {"tensors": {k: v.detach().cpu() for k, v in batch.items()}, "size": batch.batch_size[0],
                "stats": stats, "worker": self.worker_index,
                "state": {"prompts": self.stream.state_dict(), "rng": capture_rng_state(), "version": self.version}}

    def run(self) -> None:
        """Generate into the queue until the actor is killed. Each batch reports how long the
        generator stood idle before it (``collector/idle_s``: blocked on the full queue)."""
        idle = 0.0
        while True:
            payload = self.collect_batch()
            payload["stats"]["collector/idle_s"] = idle
            t0 = deadline = time.monotonic()
            deadline += self.timeout_s
            while True:
                try:
                    # The queue actor itself enforces the 1 s timeout; the ray.get bound is a backstop.
                    ray.get(self.queue.actor.put.remote(payload, 1.0), timeout=30)
                    idle = time.monotonic() - t0
                    break
                except (Full, ray.exceptions.GetTimeoutError):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"collector {self.worker_index}: queue full for "
                                           f"{self.timeout_s:g}s (trainer not pulling)") from None


def make_collector_class(num_cpus: float, num_gpus: float):
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=2, max_restarts=0)(RolloutWorker)


class CollectorPool:
    """The collector actors, the bounded queue they fill (streaming), the weight pushes, and the
    restart of an actor that dies (at most ``max_restarts`` times in the run).

    ``consumed[i]`` is collector ``i``'s position (prompt stream, RNGs, version) after the last
    batch the trainer took from it: checkpoints store it, and a restarted actor starts there, so
    neither a restart nor a resume skips or repeats prompts.
    """

    def __init__(self, cfg: dict, plan, weight_sync, timeout_s: float, streaming: bool, buffer_size: int = 1,
                 start_states: dict[int, dict] | None = None, model: torch.nn.Module | None = None,
                 max_restarts: int = 0):
        from ray.util.queue import Queue

        self.cfg, self.timeout_s, self.weight_sync, self.streaming = cfg, timeout_s, weight_sync, streaming
        self.model, self.max_restarts, self.restarts = model, max_restarts, 0
        self.version = 0
        self.consumed: dict[int, dict] = dict(start_states or {})
        self.backlog: list[dict[str, Any]] = []  # batches taken off the queue during a restart
        self.queue = Queue(maxsize=buffer_size, actor_options={"num_cpus": 0}) if streaming else None
        self.actor_class = make_collector_class(plan.collector_cpus, plan.collector_gpus)
        self.actors = [self._new_actor(i) for i in range(plan.num_collectors)]
        self.wait_for(*(a.ready.remote() for a in self.actors), what="start")
        try:
            weight_sync.connect(self.actors)
        except RuntimeError as e:
            raise CollectorFailed(f"weight sync could not connect: {e}") from None
        self.runs = {a.run.remote(): i for i, a in enumerate(self.actors)} if streaming else {}

    def _new_actor(self, index: int, start: dict | None = None):
        return self.actor_class.remote(self.cfg, index, self.weight_sync.receiver(index), self.queue,
                                       start or self.consumed.get(index))

    def all_actors(self) -> list:
        return [*self.actors, *([self.queue.actor] if self.queue is not None else [])]

    def wait_for(self, *refs, what: str):
        try:
            return ray.get(list(refs), timeout=self.timeout_s)
        except ray.exceptions.RayActorError as e:
            raise CollectorDied(f"collector actor died during {what}: {_first_line(e)}") from None
        except ray.exceptions.RayTaskError as e:
            raise CollectorFailed(f"collector actor failed during {what}: {_cause(e)}") from None
        except ray.exceptions.GetTimeoutError:
            raise CollectorFailed(f"collector actors did not {what} within mode.actor_timeout_s="
                                  f"{self.timeout_s:g}s") from None

    def restart(self, index: int, reason: str) -> None:
        """Replace dead actor ``index`` by a fresh one that continues its prompt stream from the last
        batch the trainer took and gets the trainer's current weights; raise if no restart is left."""
        if self.restarts >= self.max_restarts:
            extra = (f" (after {self.restarts} restart(s), mode.max_restarts={self.max_restarts})"
                     if self.restarts else "")
            raise CollectorFailed(f"collector actor {index} {reason}{extra}")
        self.restarts += 1
        print(f"collector actor {index} {reason}; restarting it ({self.restarts}/{self.max_restarts})", flush=True)
        ray.kill(self.actors[index], no_restart=True)
        start = self.consumed.get(index)
        if self.streaming:
            # Batches the dead actor queued are still good: keep them, and start its successor
            # after the last of them, not after the last one trained on.
            self.backlog += self.queue.get_nowait_batch(self.queue.qsize())
            start = next((b["state"] for b in reversed(self.backlog) if b["worker"] == index), start)
        actor = self._new_actor(index, start)
        self.actors[index] = actor
        self.wait_for(actor.ready.remote(), what="restart")
        if self.version > 0 and self.model is not None:
            self.push_weights(self.model, self.version, [actor])
        if self.streaming:
            self.runs = {ref: i for ref, i in self.runs.items() if i != index}
            self.runs[actor.run.remote()] = index

    def request(self, worker: int, min_version: int):
        """Start one batch on ``worker`` (on-demand mode); pass the returned ref to :meth:`result`."""
        return self.actors[worker].collect_batch.remote(min_version)

    def result(self, ref, worker: int = 0, min_version: int = 0) -> dict[str, Any]:
        """The payload of a :meth:`request`; a dead actor is restarted (if allowed) and asked again."""
        while True:
            try:
                payload = self.wait_for(ref, what="collect a batch")[0]
                break
            except CollectorDied as e:
                self.restart(worker, f"died ({e})")
                ref = self.request(worker, min_version)
        self.consumed[payload["worker"]] = payload["state"]
        return payload

    def check_alive(self) -> None:
        """Restart (or raise :class:`CollectorFailed` for) any streaming collector whose ``run`` ended."""
        done, _ = ray.wait(list(self.runs), num_returns=len(self.runs), timeout=0)
        for ref in done:
            index = self.runs[ref]
            try:
                ray.get(ref, timeout=self.timeout_s)
                raise CollectorFailed(f"collector actor {index} stopped unexpectedly")
            except ray.exceptions.RayActorError as e:
                self.restart(index, f"died ({_first_line(e)})")
            except ray.exceptions.RayTaskError as e:
                raise CollectorFailed(f"collector actor {index} failed: {_cause(e)}") from None

    def get(self) -> tuple[dict[str, Any], int]:
        """The next streamed payload and the queue size after taking it; polls the collectors'
        health every second and gives up after ``timeout_s`` without a batch."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            self.check_alive()
            if self.backlog:
                payload = self.backlog.pop(0)
                self.consumed[payload["worker"]] = payload["state"]
                return payload, len(self.backlog) + self.queue.qsize()
            try:
                payload = ray.get(self.queue.actor.get.remote(1.0), timeout=self.timeout_s)
                size = ray.get(self.queue.actor.qsize.remote(), timeout=self.timeout_s)
                self.consumed[payload["worker"]] = payload["state"]
                return payload, size
            except ray.exceptions.RayActorError as e:
                raise CollectorFailed(f"the rollout queue actor died: {_first_line(e)}") from None
            except Empty:
                pass
            if time.monotonic() > deadline:
                self.check_alive()
                raise CollectorFailed(f"no rollout batch within mode.actor_timeout_s={self.timeout_s:g}s")

    def push_weights(self, model: torch.nn.Module, version: int, actors: list | None = None) -> None:
        self.version = version
        try:
            self.weight_sync.push(model, version, self.actors if actors is None else actors)
        except ray.exceptions.RayActorError as e:
            raise CollectorFailed(f"collector actor died during a weight push: {_first_line(e)}") from None
        except RuntimeError as e:
            raise CollectorFailed(f"weight push failed: {e}") from None

    def close(self) -> None:
        """Tear down the weight sync, kill the actors and the queue, stop the local Ray cluster."""
        from grpo_utils.distributed.resources import shutdown_ray

        try:
            self.weight_sync.close()
        finally:
            shutdown_ray(self.all_actors())


class RayRollout:
    """The sync recipe's rollout with the generator in one Ray actor (``mode.ray=true``).

    Same interface as :class:`grpo_utils.rollout.group.GroupRollout` (``collect``, ``sync_weights``,
    ``data_state``/``load_data_state``, ``close``). ``sync_iter=true``: each batch is generated
    after the last weight push (policy age 0). ``sync_iter=false``: the next batch is generated
    while the trainer trains on this one, so it comes from the weights one push older (age <= 1).
    """

    def __init__(self, pool: CollectorPool, sync_iter: bool):
        self.pool, self.sync_iter = pool, sync_iter
        self.version = 0
        self._in_flight = None

    def collect(self) -> tuple[TensorDict, dict[str, float]]:
        # Rollout shaping is applied inside the actor (it builds the same parts from the config).
        ref = self._in_flight or self.pool.request(0, self.version)
        payload = self.pool.result(ref, 0, self.version)
        self._in_flight = None if self.sync_iter else self.pool.request(0, self.version)
        batch = payload_to_batch(payload)
        stats = dict(payload["stats"]) | staleness_stats(sample_ages(batch["policy_version"], self.version))
        stats["collector_restarts"] = self.pool.restarts
        return batch, stats

    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        self.version = version
        self.pool.push_weights(model, version)

    def data_state(self) -> dict:
        """The actor's position after the last batch the trainer took (an in-flight batch is
        regenerated after a resume, so nothing is skipped)."""
        return {"collector": self.pool.consumed.get(0)}

    def checkpoint_state(self) -> dict:
        return {"prompts": self.data_state()}

    def load_data_state(self, state: dict) -> None:
        """Accepts this class's state or the local loop's (a bare prompt-stream position)."""
        collector = state.get("collector") if "collector" in state else {"prompts": state, "rng": None, "version": 0}
        if collector is not None:
            self.pool.consumed[0] = collector
            self.pool.wait_for(self.pool.actors[0].load_state.remote(collector), what="load its state")

    def eval_engine(self, model: torch.nn.Module) -> None:
        """None: the engines are in the collectors; held-out evaluation generates with ``model``."""
        return None

    def close(self) -> None:
        self.pool.close()


class StreamedBatches:
    """The async loop's batches: collector actors keep generating into a bounded queue; a batch
    more than ``max_staleness`` policy versions old is dropped whole (it comes from one generation
    round, so its samples share one version) and counted in ``samples_dropped``."""

    def __init__(self, pool: CollectorPool, max_staleness: int, version: int = 0):
        self.pool, self.max_staleness, self.dropped = pool, max_staleness, 0
        self.version = pool.version = version

    def collect(self) -> tuple[TensorDict, dict[str, float]]:
        while True:
            payload, queue_size = self.pool.get()
            batch = payload_to_batch(payload)
            ages = sample_ages(batch["policy_version"], self.version)
            if int(ages.max()) <= self.max_staleness:
                break
            self.dropped += int((ages > self.max_staleness).sum())
        stats = dict(payload["stats"]) | staleness_stats(ages)
        return batch, stats | {"buffer/size": queue_size, "samples_dropped": self.dropped,
                               "collector": payload["worker"], "collector_restarts": self.pool.restarts}

    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        self.version = version
        self.pool.push_weights(model, version)

    def checkpoint_state(self) -> dict:
        """Each collector's position after the last batch the trainer took from it."""
        return {"collectors": self.pool.consumed}

    def eval_engine(self, model: torch.nn.Module) -> None:
        """None: the engines are in the collectors; held-out evaluation generates with ``model``."""
        return None

    def close(self) -> None:
        self.pool.close()


def _cause(e: BaseException) -> str:
    return _first_line(e.cause if getattr(e, "cause", None) else e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
