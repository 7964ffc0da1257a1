"""Group-relative advantages, computed as tensor operations over [num_groups, group_size].

Samples arrive grouped: the G completions of a prompt are contiguous. Keeping this a reshape
(not TorchRL's ``MCAdvantage`` transform over lazy stacks) is what keeps it off the profile.

Two independent choices make an advantage:

* the estimator, i.e. the baseline subtracted from each reward:

  - ``grpo``: the group mean, ``r_i - mean_j r_j`` (GRPO, Dr. GRPO, DAPO, GSPO, CISPO, and
    REINFORCE with a group-mean baseline);
  - ``rloo``: the leave-one-out mean, ``r_i - mean_{j != i} r_j`` (Ahmadian et al., 2024), which
    equals ``G / (G - 1)`` times the group-mean-centred reward;
  - ``none``: no baseline, the raw reward (plain REINFORCE);

* the scale: divide by the group's reward std (GRPO), the batch's reward std, or nothing
  (Dr. GRPO, RLOO, REINFORCE). ``eps`` is added to the std before dividing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ESTIMATORS = ("grpo", "rloo", "none")
SCALES = ("group_std", "batch_std", "none")


def check_advantage_config(estimator: str, scale: str, eps: float,
                           prefix: str = "advantage.") -> None:
    """Raise a one-line ``ValueError`` naming the key (``{prefix}estimator`` ...) if invalid."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"{prefix}estimator={estimator!r} is unknown; "
                         f"expected one of {', '.join(ESTIMATORS)}")
    if scale not in SCALES:
        raise ValueError(f"{prefix}scale={scale!r} is unknown; expected one of {', '.join(SCALES)}")
    if estimator == "none" and scale != "none":
        raise ValueError(f"{prefix}scale={scale!r} needs a baseline; with {prefix}estimator='none' "
                         f"(raw rewards) use {prefix}scale=none")
    # Written as `not >=` so that NaN is rejected too.
    if not eps >= 0:
        raise ValueError(f"{prefix}eps={eps} must be >= 0")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group_std",
                     eps: float = 1e-6, estimator: str = "grpo") -> torch.Tensor:
    """Per-sample advantages ``[N]`` from rewards ``[N]`` laid out as contiguous groups.

    ``estimator`` picks the baseline (``grpo``: group mean, ``rloo``: leave-one-out mean,
    ``none``: raw reward), ``scale`` the divisor (group std, batch std, or none). Stds are the
    unbiased (``N - 1``) stds of the *rewards*. A group whose rewards are all equal gets advantage
    exactly 0 for every sample under any baseline: it carries no signal.
    """
    check_advantage_config(estimator, scale, eps)
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"expected {group_size}-sized groups, got rewards of shape {tuple(rewards.shape)}")
    if estimator == "none":
        return rewards.clone()
    if estimator == "rloo" and group_size < 2:
        raise ValueError(f"advantage.estimator='rloo' needs group_size >= 2, got {group_size}")
    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if estimator == "rloo":
        # r_i - (sum_j r_j - r_i) / (G - 1) = G / (G - 1) * (r_i - mean).
        centered = centered * (group_size / (group_size - 1))
    # Constant groups are exactly 0 (no rounding residue from the mean).
    constant = grouped.max(dim=1, keepdim=True).values == grouped.min(dim=1, keepdim=True).values
    centered = torch.where(constant, torch.zeros_like(centered), centered)
    if scale != "none":
        std = (grouped.std(dim=1, keepdim=True, correction=int(group_size > 1)) if scale == "group_std"
               else rewards.std(correction=int(rewards.numel() > 1)).expand(len(grouped), 1))
        # std == 0 means every centered value is 0: keep it 0 even with eps=0 (no 0/0 NaN).
        centered = torch.where(std > 0, centered / (std + eps), torch.zeros_like(centered))
    return centered.reshape(-1)


def zero_advantage_group_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (no learning signal)."""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(dim=1).values == grouped.min(dim=1).values).float().mean().item()


class AdvantageStage:
    """Rewards to advantages for one scored batch, in the order the papers use: a KL-in-reward
    penalty (``kl_penalty``: the loss's ``reward_penalty``, needs ``old_log_probs`` and
    ``ref_log_probs`` in the batch) is subtracted from the rewards first, then group advantages
    are computed, then DAPO's overlong filtering (``overlong_mask``) removes truncated samples
    from the loss mask (not from the attention mask, and not from the group statistics)."""

    def __init__(self, estimator: str, scale: str, eps: float, group_size: int,
                 kl_penalty: Callable[..., torch.Tensor] | None = None, overlong_mask: bool = False):
        check_advantage_config(estimator, scale, eps)
        self.estimator, self.scale, self.eps, self.group_size = estimator, scale, eps, group_size
        self.kl_penalty, self.overlong_mask = kl_penalty, overlong_mask

    def __call__(self, batch) -> dict[str, float]:
        """Sets ``batch["advantage"]`` (and updates ``reward``/``response_mask``); returns stats."""
        stats: dict[str, float] = {}
        if self.kl_penalty is not None:
            penalty = self.kl_penalty(batch["old_log_probs"], batch["ref_log_probs"], batch["response_mask"])
            batch["reward"] = batch["reward"] - penalty.to(batch["reward"].dtype)
            stats["kl_reward_penalty/mean"] = penalty.mean().item()
        advantages = group_advantages(batch["reward"], self.group_size, self.scale, self.eps, self.estimator)
        batch["advantage"] = advantages
        if self.overlong_mask:
            from grpo_utils.algo.shaping import truncation_mask

            batch["response_mask"] = batch["response_mask"] & truncation_mask(batch["truncated"])[:, None]
        stats.update({"advantage/mean": advantages.mean().item(),
                      "advantage/std": advantages.std().item() if advantages.numel() > 1 else 0.0})
        return stats
