"""Rewards: score a completion against its dataset row.

Every reward returns a dict of named scores; ``reward`` is what training optimizes, the
other keys (``correct``, ``format``) are logged. A reward that raises gives 0 and is counted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_PATTERNS = [
    re.compile(r"####\s*\$?\s*(" + _NUMBER + ")"),
    re.compile(r"\\boxed\{\s*\$?\s*(" + _NUMBER + r")\s*\}"),
    re.compile(r"<answer>\s*\$?\s*(" + _NUMBER + r")\s*</answer>"),
    re.compile(r"answer is\s*:?\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE),
]
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(text: str) -> str | None:
    """Canonical form of a number: no commas, no trailing ``.0``; None if not a number."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(text)
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(value):
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_final_number(text: str) -> tuple[str | None, bool]:
    """The final numeric answer in free text and whether it was given in an explicit format
    (``#### N``, ``\\boxed{N}``, ``<answer>N</answer>``, "the answer is N"); else the last number."""
    for pattern in _PATTERNS:
        matches = pattern.findall(text)
        if matches:
            return normalize_number(matches[-1]), True
    numbers = _ANY_NUMBER.findall(text)
    return (normalize_number(numbers[-1]), False) if numbers else (None, False)


def numeric_answer_reward(completion: str, row: dict[str, Any], format_weight: float = 0.0,
                          require_format: bool = False) -> dict[str, float]:
    """1 when the final number equals ``row["answer"]``; optional bonus for an explicit format."""
    predicted, formatted = extract_final_number(completion)
    correct = predicted is not None and predicted == normalize_number(str(row["answer"]))
    if require_format and not formatted:
        correct = False
    fmt = float(formatted)
    return {"reward": float(correct) + format_weight * fmt, "correct": float(correct), "format": fmt}


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
