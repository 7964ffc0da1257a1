"""Tensor-level policy-gradient losses for the GRPO family.

The loss is model-agnostic: the trainer computes per-token log-probabilities (and optionally
entropies) and hands over ``[B, T]`` tensors of response tokens together with a boolean mask.
Advantages are computed before the loss (``grpo_utils.algo.advantages.group_advantages``).

Objectives, one class each, all sharing :class:`PolicyLoss` (KL to a reference in the loss or
in the reward, KL to the behaviour policy, entropy bonus, aggregation, importance-sampling
correction for the inference/training gap, metrics):

* :class:`ClippedSurrogateLoss`: PPO-style clipped surrogate: GRPO (Shao et al., 2024),
  Dr. GRPO (Liu et al., 2025; ``constant_sum``), DAPO (Yu et al., 2025; ``clip_eps_high >
  clip_eps_low``, ``token_mean``).
* :class:`PolicyGradientLoss`: plain policy gradient ``-A * log pi`` without ratio or clip:
  REINFORCE (raw reward), REINFORCE with a group-mean baseline, RLOO (Ahmadian et al., 2024).
* :class:`GSPOLoss`: sequence-level length-normalized ratio, clipped per sequence (Zheng et al.,
  2025).
* :class:`CISPOLoss`: clipped, stop-gradient importance weight on ``-A * log pi`` (MiniMax-M1,
  2025).

Every aggregation is a sum of per-sequence terms divided by whole-batch constants
(:class:`BatchNormalizer`), so summing the losses of micro-batches split along ``B`` reproduces
the full-batch loss and gradient exactly, for every objective (GSPO's ratio is per sequence, so a
split by sequences is exact too; splitting a sequence along ``T`` is not supported anywhere).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant_sum")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_PLACEMENTS = ("loss", "reward")
IS_CORRECTIONS = ("none", "truncate", "mask")
IS_LEVELS = ("token", "sequence", "geometric")


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; choose one of {allowed}")


def _check_positive(field: str, value: float) -> None:
    # Written as `not >` so that NaN is rejected too.
    if not value > 0:
        raise ValueError(f"{field} must be > 0, got {value!r}")


def _check_non_negative(field: str, value: float) -> None:
    # Written as `not >=` so that NaN is rejected too.
    if not value >= 0:
        raise ValueError(f"{field} must be >= 0, got {value!r}")


def _check_mask(mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(
            f"mask must be a bool [B, T] tensor, got {mask.dtype} of shape {tuple(mask.shape)}"
        )


@dataclass
class LossOutput:
    """Differentiable scalar loss plus detached, micro-batch-local scalar metrics.

    ``sums``: the additive statistics the metrics are computed from (:func:`metrics_from_sums`).
    Summed over the parts of a micro-batch (its shares on several ranks) they give the metrics of
    the whole micro-batch, which averaging the parts' metrics would not (a token mean weighs
    each part by its own token count). Metrics without sums are averaged over parts.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    sums: dict[str, torch.Tensor] = field(default_factory=dict)


# Keys of LossOutput.sums: the masked token count, and per metric "mean:<name>" (the sum of its
# per-token values) or "ess_w:<name>" and "ess_w2:<name>" (sums of the weights and their squares).
TOKENS = "tokens"


def _token_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detached sum over unmasked entries."""
    return torch.where(mask, values.detach(), 0.0).sum()


def metrics_from_sums(sums: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The metrics of a (micro-)batch from its ``LossOutput.sums``: token means are
    ``sum / tokens`` (0 when there is no token), a normalized effective sample size is
    ``(sum w)^2 / (tokens * sum w^2)`` in ``[0, 1]`` (0 when there is no token or weight)."""
    n = sums[TOKENS]
    metrics: dict[str, torch.Tensor] = {}
    for key, value in sums.items():
        kind, _, name = key.partition(":")
        if kind == "mean":
            metrics[name] = value / n.clamp(min=1)
        elif kind == "ess_w":
            sum_sq = sums[f"ess_w2:{name}"]
            ess = value.square() / (n * sum_sq).clamp(min=torch.finfo(sum_sq.dtype).tiny)
            metrics[name] = torch.where((n > 0) & (sum_sq > 0), ess, torch.zeros_like(ess))
    return metrics


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


def _ess_sums(name: str, weights: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sums a normalized effective sample size ``(sum w)^2 / (n * sum w^2)`` over unmasked
    entries is computed from (1 when all weights are equal)."""
    w = torch.where(mask, weights.detach(), 0.0)
    return {f"ess_w:{name}": w.sum(), f"ess_w2:{name}": w.square().sum()}


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


@torch.no_grad()
def kl_reward_penalty(
    log_probs_behaviour: torch.Tensor,
    ref_log_probs: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "k1",
    coef: float = 1.0,
) -> torch.Tensor:
    """Per-sequence KL penalty ``[B]`` for ``kl_in='reward'``, to subtract from the rewards.

    ``coef * sum_t KL_t`` over the response tokens, with ``KL_t`` the ``estimator`` of
    KL(behaviour || reference) at each sampled token (k1 gives the classic sequence log-ratio
    ``log pi_b(y) - log pi_ref(y)``, the RLHF reward penalty). The rollout subtracts it from the
    rewards *before* advantages are computed; the result is detached.
    """
    _check_mask(mask)
    _check_choice("kl_estimator", estimator, KL_ESTIMATORS)
    _check_non_negative("kl_coef", coef)
    inputs = {"log_probs_behaviour": log_probs_behaviour, "ref_log_probs": ref_log_probs}
    for name, tensor in inputs.items():
        if tensor.shape != mask.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected mask shape {tuple(mask.shape)}"
            )
    behaviour = torch.where(mask, log_probs_behaviour, 0.0)
    kl = kl_penalty(behaviour, torch.where(mask, ref_log_probs, 0.0), estimator)
    return coef * torch.where(mask, kl, 0.0).sum(dim=-1)


@dataclass
class PolicyTerm:
    """What an objective contributes per token, before the shared terms are added.

    ``per_token``: differentiable ``[B, T]`` policy loss; ``ratio``: the importance ratio the
    objective uses (for ``ratio``-based metrics such as ``ess``); ``clip_low`` / ``clip_high``: bool
    ``[B, T]`` maps of where the lower / upper clip is active (all False when nothing clips).
    """

    per_token: torch.Tensor
    ratio: torch.Tensor
    clip_low: torch.Tensor
    clip_high: torch.Tensor


class PolicyLoss(torch.nn.Module):
    """Shared machinery of the GRPO-family objectives; subclasses define :meth:`surrogate`.

    Per token ``t`` of sequence ``i`` the loss is ::

        w_IS * policy_t + kl_coef * KL(pi || ref)_t + behaviour_kl_coef * KL(pi || pi_old)_t
                        - entropy_coef * H_t

    reduced by ``aggregation`` with whole-batch denominators. Shared settings:

    * ``kl_coef``, ``kl_estimator`` (k1 | k2 | k3, also used for the behaviour KL), ``kl_in``:
      ``loss`` adds the reference KL above; ``reward`` leaves it out of the loss (``kl_ref`` is
      still logged) and the rollout subtracts :meth:`reward_penalty` from the rewards instead.
      Either way ``kl_coef > 0`` means a reference model is needed (:attr:`needs_reference`).
    * ``behaviour_kl_coef``: KL to the policy that produced ``old_log_probs`` (0 when on-policy).
    * ``entropy_coef``: entropy bonus; entropy is logged whenever it is passed.
    * ``aggregation`` and ``constant_normalizer``: see :func:`aggregate`.
    * ``is_correction`` (none | truncate | mask), ``is_cap``, ``is_mask_threshold``, ``is_level``
      (token | sequence | geometric; null: the objective's own, see :meth:`is_weights`): correction for
      the gap between the inference engine's log-probs (``rollout_log_probs``) and the training
      side's behaviour log-probs (``old_log_probs``). With ``w = exp(old - rollout)`` per token,
      ``truncate`` multiplies the policy term by the detached ``min(w, is_cap)`` (truncated IS)
      and ``mask`` by the detached ``w * [w <= is_mask_threshold]`` (masked IS: tokens beyond the
      threshold drop out of the policy term but stay in the denominators, which keeps micro-batch
      invariance). Only the policy term is weighted, not the KL or entropy terms. When
      ``rollout_log_probs`` is None (the default: sampling and training share weights and code)
      these settings do nothing and no mismatch metrics are logged.

    The advantage an objective is defined on (``advantage.*``) and DAPO's rollout shaping
    (``shaping.*``) are stages of their own; a loss preset (``config/loss/``) sets them together.

    Metrics (detached scalars, token means over the micro-batch): ``loss/policy``,
    ``clip_fraction`` (``/low``, ``/high``), ``ratio/mean``, ``ess`` (normalized effective sample
    size of the objective's ratio), ``approx_kl_behaviour`` (k3), ``kl_ref`` (with a reference),
    ``entropy`` (with entropies), and with ``rollout_log_probs``: ``mismatch_kl`` (k3 estimate of
    KL(rollout || old) from the sampled tokens), ``mismatch_ess``, and when a correction is on,
    ``is_weight/mean``, ``is_weight/corrected_fraction`` (tokens truncated or masked) and
    ``is_weight/ess`` (normalized effective sample size of the applied weights).
    """

    #: True for objectives defined on one ratio per sequence (GSPO): advantages must be ``[B]`` and
    #: the IS correction is applied per sequence.
    sequence_level = False

    def __init__(
        self,
        *,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        kl_in: str = "loss",
        behaviour_kl_coef: float = 0.0,
        entropy_coef: float = 0.0,
        aggregation: str = "token_mean",
        constant_normalizer: float | None = None,
        is_correction: str = "none",
        is_cap: float = 2.0,
        is_mask_threshold: float = 2.0,
        is_level: str | None = None,
    ) -> None:
        super().__init__()
        _check_non_negative("kl_coef", kl_coef)
        _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
        _check_choice("kl_in", kl_in, KL_PLACEMENTS)
        _check_non_negative("behaviour_kl_coef", behaviour_kl_coef)
        _check_non_negative("entropy_coef", entropy_coef)
        _check_choice("aggregation", aggregation, AGGREGATIONS)
        if aggregation == "constant_sum" and (
            constant_normalizer is None or not constant_normalizer > 0
        ):
            raise ValueError(
                "constant_normalizer must be > 0 when aggregation='constant_sum' "
                f"(e.g. the maximum completion length), got {constant_normalizer!r}"
            )
        _check_choice("is_correction", is_correction, IS_CORRECTIONS)
        _check_positive("is_cap", is_cap)
        _check_positive("is_mask_threshold", is_mask_threshold)
        if is_level is not None:
            _check_choice("is_level", is_level, IS_LEVELS)
        self.kl_coef = kl_coef
        self.kl_estimator = kl_estimator
        self.kl_in = kl_in
        self.behaviour_kl_coef = behaviour_kl_coef
        self.entropy_coef = entropy_coef
        self.aggregation = aggregation
        self.constant_normalizer = constant_normalizer
        self.is_correction = is_correction
        self.is_cap = is_cap
        self.is_mask_threshold = is_mask_threshold
        # null: the objective's own level (one geometric-mean weight per sequence for GSPO's
        # sequence ratio, per token otherwise)
        self.is_level = is_level or ("geometric" if self.sequence_level else "token")

    @classmethod
    def config_keys(cls) -> list[str]:
        """Every constructor argument of this class, i.e. the keys its config may set."""
        keys: list[str] = []
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is torch.nn.Module or not issubclass(klass, PolicyLoss):
                continue
            for name, param in inspect.signature(init).parameters.items():
                if name != "self" and param.kind is not param.VAR_KEYWORD and name not in keys:
                    keys.append(name)
        return keys

    @property
    def needs_reference(self) -> bool:
        """Whether reference-model log-probs are needed (in the loss or, with kl_in=reward, at
        rollout time)."""
        return self.kl_coef > 0

    @property
    def kl_in_reward(self) -> bool:
        """Whether the rollout must subtract :meth:`reward_penalty` from the rewards."""
        return self.kl_coef > 0 and self.kl_in == "reward"

    @property
    def needs_entropy(self) -> bool:
        """Whether the trainer must compute per-token entropies."""
        return self.entropy_coef > 0

    @property
    def needs_rollout_log_probs(self) -> bool:
        """Whether an IS correction is configured (it acts only given rollout log-probs)."""
        return self.is_correction != "none"

    def reward_penalty(
        self, log_probs_behaviour: torch.Tensor, ref_log_probs: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Per-sequence ``[B]`` penalty to subtract from rewards; 0 unless :attr:`kl_in_reward`."""
        if not self.kl_in_reward:
            _check_mask(mask)
            return torch.zeros(mask.shape[0], dtype=log_probs_behaviour.dtype,
                               device=log_probs_behaviour.device)
        return kl_reward_penalty(log_probs_behaviour, ref_log_probs, mask, self.kl_estimator,
                                 self.kl_coef)

    def surrogate(
        self,
        log_probs: torch.Tensor,
        log_ratio: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
    ) -> PolicyTerm:
        """The objective's per-token policy loss.

        ``log_probs`` and ``log_ratio = log_probs - old_log_probs`` are zero on padding;
        ``advantages`` is ``[B, 1]`` (per sequence) or ``[B, T]`` and broadcasts against them.
        """
        raise NotImplementedError

    def is_weights(
        self, mismatch_log_ratio: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached IS-correction weights ``[B, T]`` and the bool map of corrected tokens.

        ``mismatch_log_ratio = old_log_probs - rollout_log_probs`` (zero on padding). By
        ``is_level``: ``token`` weighs each token by its own ratio; ``sequence`` weighs every token
        of a sequence by the product of its ratios (the sequence's likelihood ratio) and
        ``geometric`` by their geometric mean (the product normalized by length), so truncation
        or masking acts on whole sequences. Computed in log space and bounded before ``exp``: a
        product of hundreds of ratios overflows otherwise.
        """
        if self.is_level == "token":
            log_w = mismatch_log_ratio
        else:
            log_w = mismatch_log_ratio.sum(dim=-1, keepdim=True)
            if self.is_level == "geometric":
                log_w = log_w / mask.sum(dim=-1, keepdim=True).clamp(min=1)
            log_w = log_w.expand_as(mismatch_log_ratio)
        if self.is_correction == "truncate":
            bound = math.log(self.is_cap)
            corrected = log_w > bound
            weights = log_w.clamp(max=bound).exp()
        else:  # mask
            bound = math.log(self.is_mask_threshold)
            corrected = log_w > bound
            weights = torch.where(corrected, torch.zeros_like(log_w), log_w.clamp(max=bound).exp())
        return weights, corrected & mask

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
        rollout_log_probs: torch.Tensor | None = None,
    ) -> LossOutput:
        """Loss for one (micro-)batch; ``normalizer`` must describe the whole optimizer batch.

        ``old_log_probs`` are the behaviour log-probs recomputed by the trainer;
        ``rollout_log_probs`` (optional) those reported by the inference engine that sampled.
        ``old_log_probs``, ``ref_log_probs``, ``rollout_log_probs`` and ``advantages`` are treated
        as constants.
        """
        advantages = self._check_inputs(
            log_probs, old_log_probs, advantages, mask, ref_log_probs, entropy, rollout_log_probs
        )
        # Zero log-probs and log-ratios on padding *before* any exp or product so that junk or
        # infinite padding values cannot produce inf * 0 = NaN in the forward or backward pass.
        safe_log_probs = torch.where(mask, log_probs, 0.0)
        safe_old = torch.where(mask, old_log_probs.detach(), 0.0)
        log_ratio = torch.where(mask, log_probs - old_log_probs.detach(), 0.0)
        term = self.surrogate(safe_log_probs, log_ratio, advantages, mask)
        per_token = term.per_token

        sums: dict[str, torch.Tensor] = {TOKENS: mask.sum().to(log_ratio.dtype)}
        if rollout_log_probs is not None:
            safe_rollout = torch.where(mask, rollout_log_probs.detach(), 0.0)
            mismatch = safe_old - safe_rollout  # log(pi_old / pi_rollout) at the sampled tokens
            # k3 with samples from the rollout policy: an estimate of KL(rollout || old).
            sums["mean:mismatch_kl"] = _token_sum(kl_penalty(safe_rollout, safe_old, "k3"), mask)
            sums.update(_ess_sums("mismatch_ess", mismatch.exp(), mask))
            if self.is_correction != "none":
                weights, corrected = self.is_weights(mismatch, mask)
                per_token = per_token * weights
                sums["mean:is_weight/mean"] = _token_sum(weights, mask)
                sums["mean:is_weight/corrected_fraction"] = _token_sum(
                    corrected.to(log_ratio.dtype), mask
                )
                sums.update(_ess_sums("is_weight/ess", weights, mask))

        detached_log_ratio = log_ratio.detach()
        clip_low = _token_sum(term.clip_low.to(log_ratio.dtype), mask)
        clip_high = _token_sum(term.clip_high.to(log_ratio.dtype), mask)
        sums.update({
            "mean:loss/policy": _token_sum(per_token, mask),
            "mean:clip_fraction": clip_low + clip_high,
            "mean:clip_fraction/low": clip_low,
            "mean:clip_fraction/high": clip_high,
            "mean:ratio/mean": _token_sum(detached_log_ratio.exp(), mask),
            **_ess_sums("ess", term.ratio, mask),
            # k3 of the current policy against the behaviour policy that sampled the data.
            "mean:approx_kl_behaviour": _token_sum(
                kl_penalty(detached_log_ratio, torch.zeros_like(detached_log_ratio), "k3"), mask
            ),
        })

        if ref_log_probs is not None:
            # Junk reference values may make `kl` non-finite on padding; the `where` on log_probs
            # stops any resulting NaN gradient from reaching them, and aggregation masks the value.
            kl = kl_penalty(safe_log_probs, ref_log_probs.detach(), self.kl_estimator)
            sums["mean:kl_ref"] = _token_sum(kl, mask)
            if self.kl_coef > 0 and self.kl_in == "loss":
                per_token = per_token + self.kl_coef * kl
        if self.behaviour_kl_coef > 0:
            behaviour_kl = kl_penalty(safe_log_probs, safe_old, self.kl_estimator)
            per_token = per_token + self.behaviour_kl_coef * behaviour_kl
        if entropy is not None:
            sums["mean:entropy"] = _token_sum(entropy, mask)
            if self.entropy_coef > 0:
                per_token = per_token - self.entropy_coef * entropy

        loss = aggregate(per_token, mask, self.aggregation, normalizer, self.constant_normalizer)
        return LossOutput(loss=loss, metrics=metrics_from_sums(sums), sums=sums)

    def _check_inputs(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        ref_log_probs: torch.Tensor | None,
        entropy: torch.Tensor | None,
        rollout_log_probs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Validate shapes and required inputs; return detached advantages as ``[B, 1]`` (per
        sequence) or ``[B, T]`` (per token)."""
        _check_mask(mask)
        if self.kl_coef > 0 and self.kl_in == "loss" and ref_log_probs is None:
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
            "rollout_log_probs": rollout_log_probs,
        }
        for name, tensor in per_token_inputs.items():
            if tensor is not None and tensor.shape != mask.shape:
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}, "
                    f"expected mask shape {tuple(mask.shape)}"
                )
        if advantages.shape == mask.shape[:1]:
            return advantages.detach().unsqueeze(-1)
        if self.sequence_level:
            raise ValueError(
                f"advantages has shape {tuple(advantages.shape)}; {type(self).__name__} is "
                f"sequence-level and needs one advantage per sequence, [B]={tuple(mask.shape[:1])}"
            )
        if advantages.shape != mask.shape:
            raise ValueError(
                f"advantages has shape {tuple(advantages.shape)}, "
                f"expected [B]={tuple(mask.shape[:1])} or [B, T]={tuple(mask.shape)}"
            )
        return advantages.detach()


def _check_clip(clip_eps_low: float, clip_eps_high: float) -> None:
    _check_non_negative("clip_eps_low", clip_eps_low)
    _check_non_negative("clip_eps_high", clip_eps_high)


class ClippedSurrogateLoss(PolicyLoss):
    """PPO-style clipped surrogate: GRPO, Dr. GRPO, DAPO.

    Per token: ``-min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)`` with
    ``r = exp(log_probs - old_log_probs)``, plus the shared terms of :class:`PolicyLoss`. The clip
    removes the gradient of a token only on the side that would keep pushing the ratio further in
    the advantage's direction. GRPO: symmetric clip and group mean/std advantages; DAPO: decoupled
    ``clip_eps_high > clip_eps_low`` and ``token_mean``; Dr. GRPO: ``constant_sum`` with the
    maximum completion length and mean-centred advantages without std scaling.
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
        **shared: Any,
    ) -> None:
        _check_clip(clip_eps_low, clip_eps_high)
        super().__init__(kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                         aggregation=aggregation, constant_normalizer=constant_normalizer, **shared)
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high

    def surrogate(self, log_probs, log_ratio, advantages, mask) -> PolicyTerm:
        ratio = log_ratio.exp()
        low, high = 1.0 - self.clip_eps_low, 1.0 + self.clip_eps_high
        clipped_ratio = ratio.clamp(low, high)
        per_token = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
        clip_low = (advantages < 0) & (ratio < low) & mask
        clip_high = (advantages > 0) & (ratio > high) & mask
        return PolicyTerm(per_token, ratio, clip_low, clip_high)


class PolicyGradientLoss(PolicyLoss):
    """Plain policy gradient, no ratio and no clip: REINFORCE, REINFORCE with baseline, RLOO.

    Per token: ``-A * log pi(y_t)``; with the default ``seq_mean_token_sum`` aggregation this is
    ``-A_i * log pi(y_i)`` averaged over sequences, the REINFORCE estimator with the whole
    completion as one action. The advantage decides the method: raw reward (REINFORCE), group-mean
    centred (REINFORCE with baseline), leave-one-out centred (RLOO). ``old_log_probs`` only enter
    the metrics, the behaviour KL and the IS correction: on data from an older policy this is the
    (biased) uncorrected policy gradient. On-policy its gradient equals the clipped surrogate's.
    """

    def __init__(self, *, aggregation: str = "seq_mean_token_sum", **shared: Any) -> None:
        super().__init__(aggregation=aggregation, **shared)

    def surrogate(self, log_probs, log_ratio, advantages, mask) -> PolicyTerm:
        no_clip = torch.zeros_like(mask)
        return PolicyTerm(-advantages * log_probs, log_ratio.exp(), no_clip, no_clip)


class GSPOLoss(PolicyLoss):
    """GSPO (Zheng et al., 2025): one length-normalized importance ratio per sequence.

    ``s_i = exp(mean_t(log_probs - old_log_probs))`` over the sequence's response tokens; the
    sequence's loss is ``-min(s_i * A_i, clip(s_i, 1 - eps_low, 1 + eps_high) * A_i)``, written to
    every token of the sequence so that ``seq_mean_token_mean`` (the default, the paper's
    ``1/G sum_i``) returns the mean over sequences. Its gradient is the paper's: for an unclipped
    sequence ``d loss / d log pi(y_it) = -s_i * A_i / (|y_i| * num_sequences)``, 0 when clipped.
    Other aggregations weight sequence ``i`` by ``|y_i|`` (token_mean, seq_mean_token_sum) or
    ``|y_i| / constant`` (constant_sum).

    Advantages must be per sequence ``[B]``. The IS correction uses one geometric-mean weight per
    sequence. Micro-batches: the ratio depends only on the sequence's own tokens and every
    aggregation divides by whole-batch counts, so splitting the batch by sequences (what the
    trainer does) leaves loss and gradient exactly unchanged; a sequence must not be split along
    ``T``. ``clip_fraction`` counts the tokens of clipped sequences.
    """

    sequence_level = True

    def __init__(
        self,
        clip_eps_low: float = 3e-4,
        clip_eps_high: float = 4e-4,
        *,
        aggregation: str = "seq_mean_token_mean",
        **shared: Any,
    ) -> None:
        _check_clip(clip_eps_low, clip_eps_high)
        super().__init__(aggregation=aggregation, **shared)
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high

    def surrogate(self, log_probs, log_ratio, advantages, mask) -> PolicyTerm:
        lengths = mask.sum(dim=-1, keepdim=True).clamp(min=1)
        seq_ratio = (log_ratio.sum(dim=-1, keepdim=True) / lengths).exp()  # [B, 1]
        low, high = 1.0 - self.clip_eps_low, 1.0 + self.clip_eps_high
        per_seq = -torch.minimum(seq_ratio * advantages, seq_ratio.clamp(low, high) * advantages)
        clip_low = ((advantages < 0) & (seq_ratio < low)) & mask
        clip_high = ((advantages > 0) & (seq_ratio > high)) & mask
        return PolicyTerm(per_seq.expand_as(log_ratio), seq_ratio.expand_as(log_ratio),
                          clip_low, clip_high)


class CISPOLoss(PolicyLoss):
    """CISPO (MiniMax-M1, 2025): clipped importance-sampling weight with stop-gradient.

    Per token: ``-sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * log pi(y_t)`` with
    ``r = exp(log_probs - old_log_probs)``. Unlike the clipped surrogate, every token keeps its
    gradient ``-clip(r) * A``; the clip only bounds the weight (clipped on either side whatever
    the sign of ``A``). The paper sets no lower bound (``clip_eps_low = 1`` gives bound 0) and
    tunes only ``clip_eps_high``; aggregation is ``token_mean`` over the batch.
    """

    def __init__(
        self,
        clip_eps_low: float = 1.0,
        clip_eps_high: float = 0.28,
        *,
        aggregation: str = "token_mean",
        **shared: Any,
    ) -> None:
        _check_clip(clip_eps_low, clip_eps_high)
        super().__init__(aggregation=aggregation, **shared)
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high

    def surrogate(self, log_probs, log_ratio, advantages, mask) -> PolicyTerm:
        ratio = log_ratio.exp()
        low, high = 1.0 - self.clip_eps_low, 1.0 + self.clip_eps_high
        weight = ratio.clamp(low, high).detach()
        per_token = -weight * advantages * log_probs
        return PolicyTerm(per_token, ratio, (ratio < low) & mask, (ratio > high) & mask)


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
    allowed = set(ClippedSurrogateLoss.config_keys())
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"unknown loss config keys {unknown}; allowed: {sorted(allowed)}")
    return ClippedSurrogateLoss(**cfg)
