"""Numeric final-answer reward (GSM8K style)."""

from __future__ import annotations

import math
import re
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
