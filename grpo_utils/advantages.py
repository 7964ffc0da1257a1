"""Group-relative advantages, computed as tensor operations over [num_groups, group_size].

Samples arrive grouped: the G completions of a prompt are contiguous. Keeping this a reshape
(not TorchRL's ``MCAdvantage`` transform over lazy stacks) is what keeps it off the profile.
"""

from __future__ import annotations

import torch

SCALES = ("group_std", "batch_std", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group_std",
                     eps: float = 1e-6) -> torch.Tensor:
    """``(r - mean_group(r)) / (std + eps)``; std is the group's, the batch's, or none (Dr. GRPO).

    A group whose rewards are all equal gets advantage 0 for every sample: it carries no signal.
    """
    if scale not in SCALES:
        raise ValueError(f"advantage.scale={scale!r} is unknown; expected one of {', '.join(SCALES)}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"expected {group_size}-sized groups, got rewards of shape {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
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
