"""Optimization: AdamW, warmup + cosine LR, exact gradient accumulation, gradient clipping,
optional mixed precision.

One call to :meth:`PolicyTrainer.optimizer_step` is one optimizer step on a mini-batch of
``optim_batch_size`` sequences, split into ``grad_accum_steps`` micro-batches. Loss
denominators come from the whole mini-batch (``BatchNormalizer``), so the accumulated gradient
equals the gradient of the mini-batch in one piece.

Mixed precision (``train.mixed_precision``): the policy's forwards run under ``torch.autocast``
in bf16 or fp16 while weights, gradients and optimizer state stay fp32 (the loaded weights are
the master weights); log-probs and the loss are computed in fp32. fp16 adds a ``GradScaler``:
its small exponent range would flush small gradients to zero without loss scaling.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from tensordict import TensorDict

from grpo_utils.algo.logprobs import add_behaviour_log_probs, batch_log_probs, response_log_probs
from grpo_utils.algo.losses import TOKENS, BatchNormalizer, LossOutput, metrics_from_sums
from grpo_utils.algo.packing import token_budget_groups, trim_padding

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
# train.mixed_precision -> the autocast dtype of the policy's forwards (None: no autocast at all).
MIXED_PRECISION: dict[str, torch.dtype | None] = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_host_memory_kept = False


def keep_freed_host_memory() -> bool:
    """Stop glibc from handing freed heap memory back to the OS after every CPU training step.

    A forward pass with grad allocates its saved activations together and the backward frees them
    together. When they end up at the top of the heap, glibc returns that memory to the OS (its
    trim threshold is a few MiB) and the next forward page-faults it back in: on a 4M-parameter
    model about 30k page faults and 50 ms of system time per step (7% of the step), depending only
    on where earlier allocations happened to land. Fixing the thresholds (heap up to glibc's dynamic
    maximum of 32 MiB per allocation, trim only beyond 1 GiB free) keeps that memory in the
    process for the next step. Allocation only: no computation changes. Done once per process;
    not on other C libraries, nor when ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_``
    are set (the user's choice wins). Returns whether the thresholds are set.
    """
    global _host_memory_kept
    if _host_memory_kept:
        return True
    if not sys.platform.startswith("linux") or {"MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"} & set(os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _host_memory_kept = bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _host_memory_kept


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay), not decayed on biases and norms, as is standard for LMs."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _item(value: torch.Tensor) -> float:
    """A scalar tensor's value; a sharded (DTensor) one is gathered first."""
    full = getattr(value, "full_tensor", None)
    return (full() if full is not None else value).item()


def _additive(out: LossOutput) -> dict[str, torch.Tensor]:
    """What of a micro-batch's loss output adds up over its parts: the loss (each part's is
    divided by the whole mini-batch's counts), the metrics' sums, and as ``avg:<name>`` each
    metric that has no sums (a custom loss's)."""
    values = {"loss": out.loss, **out.sums}
    derived = {key.partition(":")[2] for key in out.sums}  # the metric each sum belongs to
    values.update({f"avg:{k}": torch.as_tensor(v, device=out.loss.device)
                   for k, v in out.metrics.items() if k not in derived})
    return values


def _step_metrics(keys: list[str], table: torch.Tensor, parts: int) -> dict[str, float]:
    """A step's metrics from its micro-batches' :func:`_additive` values (``table``, summed over
    the ``parts`` processes that computed them): the loss summed over micro-batches, every other
    metric computed from the sums of the whole mini-batch (a token mean over all its tokens), so
    the same mini-batch logs the same metrics however it is split: into micro-batches by count or
    by token budget, and over any number of ranks. A metric without sums (a custom loss's) is
    averaged over micro-batches and parts."""
    total = dict(zip(keys, table.sum(0), strict=True))
    metrics = {"loss": total["loss"].item()}
    if TOKENS in total:
        metrics.update({k: v.item() for k, v in metrics_from_sums(total).items()})
    metrics.update({k[4:]: v.item() / (parts * len(table)) for k, v in total.items() if k.startswith("avg:")})
    return metrics


class PolicyTrainer:
    def __init__(self, model: torch.nn.Module, loss_fn: torch.nn.Module, train_cfg,
                 temperature: float, ref_model: torch.nn.Module | None = None):
        self.model = model
        self.policy = model  # what generates, is evaluated and saved: the trained module itself here
        self.loss_fn = loss_fn
        self.ref_model = ref_model
        self.temperature = temperature
        self.grad_accum_steps = train_cfg.grad_accum_steps
        # Forwards on packed sequences (grpo_utils.algo.packing): the same values, no padding computed.
        self.packing = bool(train_cfg.get("packing", False))
        # Micro-batches formed by token count instead of grad_accum_steps equal parts (None: by count).
        self.max_tokens = train_cfg.get("max_tokens_per_micro_batch", None)
        # Only train_on_batch uses these (unit tests drive optimizer_step with partial configs).
        self.optim_batch_size = train_cfg.get("optim_batch_size")
        self.epochs = train_cfg.get("epochs", 1)
        self.max_grad_norm = train_cfg.max_grad_norm
        self.optimizer = make_optimizer(model, train_cfg.lr, train_cfg.weight_decay,
                                        tuple(train_cfg.betas), train_cfg.adam_eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(train_cfg.warmup_steps, train_cfg.max_steps, train_cfg.min_lr_ratio))
        if any(p.device.type == "cpu" for p in model.parameters()):
            keep_freed_host_memory()
        self.mixed_precision = train_cfg.get("mixed_precision", "no")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"train.mixed_precision={self.mixed_precision!r} is unknown; expected one of "
                             f"{', '.join(MIXED_PRECISION)}")
        self.autocast_dtype = MIXED_PRECISION[self.mixed_precision]
        self.device_type = next(model.parameters()).device.type
        # fp16 only: bf16 has fp32's exponent range, so its gradients need no scaling.
        self.scaler = torch.amp.GradScaler(self.device_type) if self.mixed_precision == "fp16" else None
        self._buffer = None  # train_on_batch's replay buffer, kept while batches share a layout
        self._buffer_layout: tuple | None = None
        self._buffer_user = 0  # which train_on_batch call the buffer's contents belong to

    def _log_probs(self, model, mb: TensorDict, with_entropy: bool):
        start = mb["input_ids"].shape[1] - mb["response_mask"].shape[1]
        return response_log_probs(model, mb["input_ids"], mb["attention_mask"], start,
                                  self.temperature, with_entropy, packed=self.packing)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context every forward of the policy (and reference) runs in: ``torch.autocast`` in
        the ``train.mixed_precision`` dtype, or a no-op with ``no`` (nothing changes then)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def annotate(self, batch: TensorDict, need_behaviour: bool, micro_batch_size: int) -> None:
        """Adds behaviour (and reference) log-probs computed with the current weights, in the same
        precision as the training forward, so the first update's ratio is exactly 1."""
        with self.autocast():
            if need_behaviour:
                add_behaviour_log_probs(self.policy, batch, self.temperature, micro_batch_size, self.packing)
            if self.ref_model is not None:
                batch["ref_log_probs"] = batch_log_probs(self.ref_model, batch, self.temperature, micro_batch_size,
                                                         self.packing)

    def _backward(self, loss: torch.Tensor) -> None:
        """Accumulate ``loss``'s gradients (scaled first with fp16)."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def _clip_and_step(self) -> dict[str, float]:
        """Clip the accumulated gradients and take the optimizer step. With fp16 the gradients are
        unscaled first (so clipping sees their true norm) and a step whose gradients hold an inf or
        NaN is skipped by the scaler, which then halves its scale. Returns ``grad_norm`` (and, with
        fp16, ``grad_scale``: the scale this step's loss was multiplied by, and ``skipped_step``)."""
        if self.scaler is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            return {"grad_norm": _item(grad_norm)}
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # update() only lowers the scale when this step's gradients were not finite.
        skipped = self.scaler.get_scale() < scale
        return {"grad_norm": _item(grad_norm), "grad_scale": scale, "skipped_step": float(skipped)}

    def optimizer_step(self, minibatch: TensorDict) -> dict[str, float]:
        """Forward/backward over micro-batches, clip, step. Returns averaged metrics."""
        t0 = time.perf_counter()
        normalizer = BatchNormalizer.from_mask(minibatch["response_mask"])
        sums = self._step(normalizer, self.micro_batches(minibatch))
        sums["time/train_s"] = time.perf_counter() - t0
        return sums

    def micro_batches(self, minibatch: TensorDict, parts: int = 1) -> list[TensorDict]:
        """``minibatch`` split for gradient accumulation: ``grad_accum_steps`` equal parts, or with
        ``train.max_tokens_per_micro_batch`` groups of sequences of similar length costing at most
        that many tokens each (packed: their tokens; padded: count x longest). With ``parts`` > 1
        (trainer ranks) their number is a multiple of ``parts``. Loss denominators are the whole
        mini-batch's either way, so the accumulated gradient is the same."""
        if self.max_tokens is None:
            return list(minibatch.chunk(self.grad_accum_steps))
        lengths = minibatch["attention_mask"].sum(-1).tolist()
        groups = token_budget_groups(lengths, self.max_tokens, self.packing, parts)
        return [trim_padding(minibatch[torch.tensor(group)]) for group in groups]

    def _step(self, normalizer: BatchNormalizer, micro_batches) -> dict[str, float]:
        """One optimizer step over ``micro_batches`` whose loss denominators are ``normalizer``'s
        (the whole mini-batch's, wherever its micro-batches are)."""
        self.model.train()
        rows = []  # per micro-batch: its loss and the additive statistics of its metrics
        for mb in micro_batches:
            with self.autocast():  # the forward only: log-probs come out fp32, the loss and backward stay outside
                log_probs, entropy = self._log_probs(self.model, mb, with_entropy=True)
            old = mb.get("old_log_probs", None)
            out = self.loss_fn(
                log_probs,
                log_probs.detach() if old is None else old,
                mb["advantage"],
                mb["response_mask"],
                ref_log_probs=mb.get("ref_log_probs", None),
                rollout_log_probs=mb.get("rollout_log_probs", None),
                entropy=entropy,
                normalizer=normalizer,
            )
            self._backward(out.loss)
            rows.append(_additive(out))
        keys = sorted(rows[0])
        table = torch.stack([torch.stack([row[k].detach().double() for k in keys]) for row in rows])
        sums = _step_metrics(keys, self._combine(table).cpu(), self._parts)
        lr = self.scheduler.get_last_lr()[0]
        sums.update(self._clip_and_step())
        if self.scaler is None:
            self.scheduler.step()
        else:
            with warnings.catch_warnings():
                # The LR follows the step count, skipped fp16 steps included; torch warns (wrongly
                # for a LambdaLR read before stepping) when the scaler skipped the very first step.
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before")
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums["lr"] = lr
        return sums

    #: How many processes compute a part of each micro-batch (:meth:`_combine` sums over them).
    _parts = 1

    def _combine(self, table: torch.Tensor) -> torch.Tensor:
        """``table`` (micro-batches x :func:`_additive` values) summed over every process that
        computed a part of each micro-batch (here: one)."""
        return table

    def publish(self) -> None:
        """Make :attr:`policy` (the model the loop generates with, evaluates and saves) hold the
        trained weights. It is the trained module itself here; a sharded trainer gathers."""

    def _fill_buffer(self, batch: TensorDict):
        """A TorchRL replay buffer (``LazyTensorStorage``, ``SamplerWithoutReplacement``) holding
        exactly ``batch``. Building one costs more than the copy into it (about 1.3 ms: TorchRL
        allocates shared-memory counters for every storage and writer), so the buffer is kept and
        refilled while batches have the same keys, shapes and dtypes, and rebuilt when they do not
        (sequence widths may change from batch to batch). ``empty()`` resets its sampler, so each
        batch's mini-batches are drawn exactly as a fresh buffer's would be: the same permutations
        from the same global generator, at the same points."""
        from torchrl.data import LazyTensorStorage, ReplayBuffer, SamplerWithoutReplacement

        layout = tuple((key, value.shape, getattr(value, "dtype", None)) for key, value in batch.items(True, True))
        if self._buffer is None or layout != self._buffer_layout:
            self._buffer = ReplayBuffer(storage=LazyTensorStorage(len(batch)), sampler=SamplerWithoutReplacement(),
                                        batch_size=self.optim_batch_size)
            self._buffer_layout = layout
        else:
            self._buffer.empty()
        self._buffer.extend(batch)
        return self._buffer

    def train_on_batch(self, batch: TensorDict, generate_s: float) -> Iterator[dict[str, float]]:
        """``train.epochs`` passes over one scored batch in ``optim_batch_size`` mini-batches drawn
        without replacement from a TorchRL replay buffer; yields each optimizer step's metrics
        (with ``tokens_per_s`` over generation plus training so far). Stop iterating to stop early.
        The buffer is reused by the next call, so an earlier call's iteration cannot be resumed."""
        buffer = self._fill_buffer(batch)
        self._buffer_user += 1
        user = self._buffer_user
        t_train, tokens = 0.0, batch["response_mask"].sum().item()
        for _ in range(self.epochs * len(batch) // self.optim_batch_size):
            if self._buffer_user != user:
                raise RuntimeError("train_on_batch was called again before this batch's iteration finished")
            metrics = self.optimizer_step(buffer.sample())
            t_train += metrics["time/train_s"]
            metrics["tokens_per_s"] = tokens / (generate_s + t_train)
            yield metrics

    def close(self) -> None:
        """Release what the trainer started (the other ranks of a sharded trainer)."""

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:  # plain floats and ints: loads with weights_only=True
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], optimizer: bool = True) -> None:
        """``optimizer=False``: the schedule only (a sharded trainer restores its optimizer itself)."""
        if optimizer:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):  # a checkpoint without one: a fresh scaler
            self.scaler.load_state_dict(state["scaler"])
