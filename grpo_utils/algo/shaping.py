"""Rollout-level parts of DAPO (Yu et al., 2025): dynamic sampling and overlong handling.

These act on rewards and masks *before* advantages are computed, so they live outside the loss.
They are pure tensor functions; the rollout applies them. The settings travel in the loss
preset (``loss.dynamic_sampling`` ...) and reach the rollout as ``loss_fn.rollout_shaping``, a
:class:`RolloutShaping`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _check_int(field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")


def _check_bool(field: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be true or false, got {value!r}")


@dataclass(frozen=True)
class RolloutShaping:
    """What the rollout does to a batch before advantages; validated on construction.

    * ``dynamic_sampling``: keep only groups whose rewards are not all equal
      (:func:`dynamic_sampling_keep`), generating more groups to refill the batch;
    * ``max_resample_rounds``: at most this many extra generation rounds per step for that refill;
    * ``overlong_mask``: "overlong filtering", truncated samples are dropped from the loss
      (:func:`truncation_mask`);
    * ``overlong_penalty``: factor of the soft overlong punishment added to the reward
      (:func:`soft_overlong_penalty`); 0 disables it;
    * ``overlong_cache_len``: its punishment interval ``L_cache`` in tokens; ``None`` means a fifth
      of the generation budget (DAPO: 4096 of 20480).
    """

    dynamic_sampling: bool = False
    max_resample_rounds: int = 0
    overlong_mask: bool = False
    overlong_penalty: float = 0.0
    overlong_cache_len: int | None = None

    def __post_init__(self) -> None:
        _check_bool("dynamic_sampling", self.dynamic_sampling)
        _check_int("max_resample_rounds", self.max_resample_rounds, 0)
        _check_bool("overlong_mask", self.overlong_mask)
        if not self.overlong_penalty >= 0:
            raise ValueError(f"overlong_penalty must be >= 0, got {self.overlong_penalty!r}")
        if self.overlong_cache_len is not None:
            _check_int("overlong_cache_len", self.overlong_cache_len, 1)


def dynamic_sampling_keep(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool ``[num_groups]``: True for groups whose rewards are not all identical.

    DAPO's constraint ``0 < |{o_i correct}| < G`` (accuracy neither 0 nor 1), generalized to
    graded rewards: a group with identical rewards has zero advantage for every sample under any
    group baseline, so it only dilutes the batch. Expand to samples with
    ``keep.repeat_interleave(group_size)``.
    """
    if rewards.ndim != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"expected {group_size}-sized groups, got rewards of shape {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, group_size)
    return grouped.max(dim=1).values != grouped.min(dim=1).values


def soft_overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int | None = None,
                          penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (eq. 13) times ``penalty``, to add to the rewards.

    With ``L_max = max_len`` and ``L_cache = cache_len``::

        R(L) = 0                                  if L <= L_max - L_cache
             = ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
             = -1                                 if L > L_max

    so the punishment grows linearly from 0 to -1 over the last ``L_cache`` tokens of the budget
    (a completion cut at exactly ``L_max`` tokens gets -1). ``cache_len=None`` uses
    ``max(1, max_len // 5)``. Returns a float tensor shaped like ``lengths`` (values in
    ``[-penalty, 0]``).
    """
    _check_int("max_len", max_len, 1)
    if cache_len is None:
        cache_len = max(1, max_len // 5)
    _check_int("overlong_cache_len", cache_len, 1)
    if cache_len > max_len:
        raise ValueError(
            f"overlong_cache_len={cache_len} must be <= the completion budget {max_len}"
        )
    if not penalty >= 0:
        raise ValueError(f"overlong_penalty must be >= 0, got {penalty!r}")
    dtype = lengths.dtype if lengths.is_floating_point() else torch.get_default_dtype()
    lengths = lengths.to(dtype)
    start = max_len - cache_len
    linear = (start - lengths) / cache_len
    value = torch.where(lengths <= start, torch.zeros_like(lengths),
                        torch.where(lengths <= max_len, linear, torch.full_like(lengths, -1.0)))
    return penalty * value


def truncation_mask(truncated: torch.Tensor) -> torch.Tensor:
    """DAPO's overlong filtering: bool ``[B]``, True for samples that stay in the loss.

    ``truncated`` is True where a completion hit the budget without a stop token. Apply as
    ``response_mask & truncation_mask(truncated)[:, None]``; the whole-batch normalizer must be
    built from the filtered mask so the dropped tokens leave the denominators too.
    """
    if truncated.dtype != torch.bool:
        raise ValueError(f"truncated must be a bool tensor, got {truncated.dtype}")
    return ~truncated
