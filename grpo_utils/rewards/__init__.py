"""Rewards: score a completion against its dataset row.

Every reward returns a dict of named scores; ``reward`` is what training optimizes, the
other keys (``correct``, ``format``) are logged. A reward that raises gives 0 and is counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grpo_utils.rewards.numeric import extract_final_number, normalize_number, numeric_answer_reward

__all__ = ["REWARDS", "RewardFunction", "extract_final_number", "normalize_number", "numeric_answer_reward"]

REWARDS: dict[str, Callable[..., dict[str, float]]] = {
    "numeric_answer": numeric_answer_reward,
}


class RewardFunction:
    """Applies a named reward to a batch, isolating failures (0 reward, counted)."""

    def __init__(self, name: str, **kwargs: Any):
        if name not in REWARDS:
            raise ValueError(f"reward.name={name!r} is unknown; expected one of {', '.join(REWARDS)}")
        self.name = name
        self.fn = REWARDS[name]
        self.kwargs = kwargs

    def __call__(self, completions: list[str], rows: list[dict[str, Any]]) -> tuple[list[dict[str, float]], int]:
        scores, failures = [], 0
        for completion, row in zip(completions, rows):
            try:
                scores.append(self.fn(completion, row, **self.kwargs))
            except Exception:  # a broken sample must never stop a run
                failures += 1
                scores.append({"reward": 0.0, "correct": 0.0, "format": 0.0})
        return scores, failures
