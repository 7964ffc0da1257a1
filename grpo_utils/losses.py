"""Tensor-level policy-gradient losses for GRPO-family training.

The loss is model-agnostic: the trainer computes per-token log-probabilities (and optionally
entropies) and hands over ``[B, T]`` tensors of response tokens together with a boolean mask.

One module, :class:`ClippedSurrogateLoss`, covers the GRPO family through configuration:

* GRPO: symmetric clipping, ``seq_mean_token_mean`` or ``token_mean``, optional KL to a reference.
* DAPO: decoupled ``clip_eps_high > clip_eps_low`` ("clip-higher"), ``token_mean``.
* Dr. GRPO: ``constant_sum`` with ``constant_normalizer`` = maximum completion length.

Variants that change the per-token objective itself (sequence-level ratios, clipped
importance weights) override :meth:`ClippedSurrogateLoss.surrogate` and reuse the rest.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant_sum")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; choose one of {allowed}")


def _check_non_negative(field: str, value: float) -> None:
    # Written as `not >=` so that NaN is rejected too.
    if not value >= 0:
        raise ValueError(f"{field} must be >= 0, got {value!r}")


def _check_mask(mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(
            f"mask must be a bool [B, T] tensor, got {mask.dtype} of shape {tuple(mask.shape)}"
        )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detached mean over unmasked entries; 0 (not NaN) when nothing is unmasked."""
    values = values.detach()
    total = torch.where(mask, values, 0.0).sum()
    return total / mask.sum().clamp(min=1)


@dataclass
class LossOutput:
    """Differentiable scalar loss plus detached, micro-batch-local scalar metrics."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


@dataclass(frozen=True)
class BatchNormalizer:
    """Loss denominators computed once over the whole optimizer batch.

    Gradient accumulation splits an optimizer batch into micro-batches whose losses are summed.
    If each micro-batch divided by its own token or sequence count, the result would depend on how
    the batch happened to be split (a micro-batch of short answers would get larger per-token
    weights). Dividing every micro-batch by the same whole-batch counts makes the summed loss,
    and hence the gradient, identical to that of the unsplit batch.
    """

    num_tokens: float
    num_sequences: float

    def __post_init__(self) -> None:
        _check_non_negative("num_tokens", self.num_tokens)
        _check_non_negative("num_sequences", self.num_sequences)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> BatchNormalizer:
        """Counts from the ``[B, T]`` response mask of the *full* optimizer batch."""
        _check_mask(mask)
        return cls(num_tokens=float(mask.sum().item()), num_sequences=float(mask.shape[0]))


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    normalizer: BatchNormalizer,
    constant: float | None = None,
) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar using whole-batch denominators.

    Every mode is a sum of per-sequence terms divided by a batch constant, so summing it over
    micro-batches (split along B) reproduces the full-batch value exactly. Padding is excluded with
    ``torch.where`` rather than multiplication so non-finite padding values cannot leak in. A
    normalizer count of zero is treated as one: an empty batch yields a zero loss, not NaN.
    """
    _check_choice("aggregation", mode, AGGREGATIONS)
    _check_mask(mask)
    if per_token.shape != mask.shape:
        raise ValueError(
            f"per_token has shape {tuple(per_token.shape)}, expected mask shape {tuple(mask.shape)}"
        )
    masked = torch.where(mask, per_token, 0.0)
    if mode == "token_mean":
        return masked.sum() / max(normalizer.num_tokens, 1.0)
    num_sequences = max(normalizer.num_sequences, 1.0)
    if mode == "seq_mean_token_mean":
        # Each sequence's own length is local to that sequence, so splitting by sequence is exact.
        lengths = mask.sum(dim=-1).clamp(min=1)
        return (masked.sum(dim=-1) / lengths).sum() / num_sequences
    if mode == "seq_mean_token_sum":
        return masked.sum() / num_sequences
    if constant is None or not constant > 0:
        raise ValueError(f"aggregation='constant_sum' needs a constant > 0, got {constant!r}")
    return masked.sum() / (constant * num_sequences)


def kl_penalty(
    log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs.

    k1 is unbiased but can be negative, k2 is low-variance but biased, and k3 is unbiased and
    always non-negative (Schulman, "Approximating KL divergence").
    """
    _check_choice("kl_estimator", estimator, KL_ESTIMATORS)
    log_ratio = ref_log_probs - log_probs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    # expm1 keeps precision for the small ratios typical near the reference.
    return torch.expm1(log_ratio) - log_ratio


class ClippedSurrogateLoss(torch.nn.Module):
    """PPO-style clipped surrogate (GRPO), with optional reference KL and entropy bonus.

    Per token: ``-min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + kl_coef * KL
    - entropy_coef * H``, with ``r = exp(log_probs - old_log_probs)``, reduced by ``aggregation``.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        entropy_coef: float = 0.0,
        aggregation: str = "token_mean",
        constant_normalizer: float | None = None,
    ) -> None:
        super().__init__()
        _check_non_negative("clip_eps_low", clip_eps_low)
        _check_non_negative("clip_eps_high", clip_eps_high)
        _check_non_negative("kl_coef", kl_coef)
        _check_non_negative("entropy_coef", entropy_coef)
        _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
        _check_choice("aggregation", aggregation, AGGREGATIONS)
        if aggregation == "constant_sum" and (
            constant_normalizer is None or not constant_normalizer > 0
        ):
            raise ValueError(
                "constant_normalizer must be > 0 when aggregation='constant_sum' "
                f"(e.g. the maximum completion length), got {constant_normalizer!r}"
            )
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.kl_coef = kl_coef
        self.kl_estimator = kl_estimator
        self.entropy_coef = entropy_coef
        self.aggregation = aggregation
        self.constant_normalizer = constant_normalizer

    @property
    def needs_reference(self) -> bool:
        """Whether the trainer must compute reference-model log-probs."""
        return self.kl_coef > 0

    @property
    def needs_entropy(self) -> bool:
        """Whether the trainer must compute per-token entropies."""
        return self.entropy_coef > 0

    def surrogate(
        self, log_ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token policy loss and boolean maps of where the low / high clip is active.

        This is the hook for variants that change the objective; ``log_ratio`` is already zero on
        padding and ``advantages`` is broadcast to ``[B, T]``.
        """
        ratio = log_ratio.exp()
        low, high = 1.0 - self.clip_eps_low, 1.0 + self.clip_eps_high
        clipped_ratio = ratio.clamp(low, high)
        per_token = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
        # The clipped branch only wins (and kills the gradient) on the side that would otherwise
        # keep pushing the ratio further in the advantage's direction.
        clip_low = (advantages < 0) & (ratio < low) & mask
        clip_high = (advantages > 0) & (ratio > high) & mask
        return per_token, clip_low, clip_high

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        ref_log_probs: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
        normalizer: BatchNormalizer,
    ) -> LossOutput:
        """Loss for one (micro-)batch; ``normalizer`` must describe the whole optimizer batch.

        ``old_log_probs``, ``ref_log_probs`` and ``advantages`` are treated as constants.
        """
        advantages = self._check_inputs(
            log_probs, old_log_probs, advantages, mask, ref_log_probs, entropy
        )
        # Zero the log-ratio on padding *before* any exp so that junk or infinite padding values
        # cannot produce inf * 0 = NaN in the forward or backward pass.
        log_ratio = torch.where(mask, log_probs - old_log_probs.detach(), 0.0)
        per_token, clip_low, clip_high = self.surrogate(log_ratio, advantages, mask)

        detached_log_ratio = log_ratio.detach()
        frac_low = _masked_mean(clip_low.to(log_ratio.dtype), mask)
        frac_high = _masked_mean(clip_high.to(log_ratio.dtype), mask)
        metrics = {
            "loss/policy": _masked_mean(per_token, mask),
            "clip_fraction": frac_low + frac_high,
            "clip_fraction/low": frac_low,
            "clip_fraction/high": frac_high,
            "ratio/mean": _masked_mean(detached_log_ratio.exp(), mask),
            # k3 of the current policy against the behaviour policy that sampled the data.
            "approx_kl_behaviour": _masked_mean(
                kl_penalty(detached_log_ratio, torch.zeros_like(detached_log_ratio), "k3"), mask
            ),
        }

        if ref_log_probs is not None:
            # Junk reference values may make `kl` non-finite on padding; the `where` on log_probs
            # stops any resulting NaN gradient from reaching them, and aggregation masks the value.
            kl = kl_penalty(
                torch.where(mask, log_probs, 0.0), ref_log_probs.detach(), self.kl_estimator
            )
            metrics["kl_ref"] = _masked_mean(kl, mask)
            if self.kl_coef > 0:
                per_token = per_token + self.kl_coef * kl
        if entropy is not None:
            metrics["entropy"] = _masked_mean(entropy, mask)
            if self.entropy_coef > 0:
                per_token = per_token - self.entropy_coef * entropy

        loss = aggregate(per_token, mask, self.aggregation, normalizer, self.constant_normalizer)
        return LossOutput(loss=loss, metrics=metrics)

    def _check_inputs(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        ref_log_probs: torch.Tensor | None,
        entropy: torch.Tensor | None,
    ) -> torch.Tensor:
        """Validate shapes and required inputs; return advantages broadcast to ``[B, T]``."""
        _check_mask(mask)
        if self.needs_reference and ref_log_probs is None:
            raise ValueError(
                f"kl_coef={self.kl_coef} > 0 requires ref_log_probs; compute reference log-probs "
                "or set kl_coef=0"
            )
        if self.needs_entropy and entropy is None:
            raise ValueError(
                f"entropy_coef={self.entropy_coef} > 0 requires entropy; pass per-token entropy "
                "or set entropy_coef=0"
            )
        per_token_inputs = {
            "log_probs": log_probs,
            "old_log_probs": old_log_probs,
            "ref_log_probs": ref_log_probs,
            "entropy": entropy,
        }
        for name, tensor in per_token_inputs.items():
            if tensor is not None and tensor.shape != mask.shape:
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}, "
                    f"expected mask shape {tuple(mask.shape)}"
                )
        if advantages.shape == mask.shape[:1]:
            advantages = advantages.unsqueeze(-1)
        elif advantages.shape != mask.shape:
            raise ValueError(
                f"advantages has shape {tuple(advantages.shape)}, "
                f"expected [B]={tuple(mask.shape[:1])} or [B, T]={tuple(mask.shape)}"
            )
        return advantages.detach().expand_as(log_probs)


def build_loss(cfg: Mapping[str, Any]) -> torch.nn.Module:
    """Build a loss from a plain mapping or OmegaConf config.

    With ``_target_`` the config is handed to Hydra (for variant classes); otherwise its keys are
    :class:`ClippedSurrogateLoss` arguments, and unknown keys fail loudly instead of being ignored.
    """
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    if "_target_" in cfg:
        from hydra.utils import instantiate

        return instantiate(cfg)
    allowed = set(inspect.signature(ClippedSurrogateLoss.__init__).parameters) - {"self"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"unknown loss config keys {unknown}; allowed: {sorted(allowed)}")
    return ClippedSurrogateLoss(**cfg)
