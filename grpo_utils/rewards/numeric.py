"""Numeric final-answer reward (GSM8K style): the last number the model commits to must equal
``row["answer"]``; whether it was given in an explicit format is scored separately."""

from __future__ import annotations

import math
import re
from typing import Any

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
# Optional currency sign ($, LaTeX \$, a few others) and the whitespace after it. Every optional
# part starts with a non-space character, so no two whitespace runs compete (no backtracking
# blow-up on long runs of spaces).
_CURRENCY = r"(?:(?:\\?\$|[€£¥])\s*)?"
_BOLD = r"[*_\s]*"  # markdown emphasis around a number: **42**
_PATTERNS = [
    re.compile(r"####\s*" + _CURRENCY + "(" + _NUMBER + ")"),
    re.compile(r"\\boxed\{\s*" + _CURRENCY + "(" + _NUMBER + r")\s*(?:\.\s*)?(?:\\?%\s*)?\}"),
    re.compile(r"<answer>\s*" + _CURRENCY + "(" + _NUMBER + r")\s*(?:\.\s*)?(?:%\s*)?</answer>"),
    re.compile(r"answer\s*(?:is|:)(?:\s*:)?" + _BOLD + r"(?:\$" + _BOLD + ")?" + _CURRENCY + "(" + _NUMBER + ")",
               re.IGNORECASE),
]
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(text: str) -> str | None:
    """Canonical form of a number: no commas, currency or trailing ``.0``; None if not a number."""
    text = text.strip().replace(",", "").replace("\\$", "").strip("$€£¥ ").rstrip(".")
    try:
        value = float(text)
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(value):
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_final_number(text: str) -> tuple[str | None, bool]:
    """The final numeric answer in free text and whether it was given in an explicit format
    (``#### N``, ``\\boxed{N}``, ``<answer>N</answer>``, "the answer is N" / "answer: N"), the
    formats tried in that order, the last match of the first that matches; else the last number."""
    for pattern in _PATTERNS:
        matches = pattern.findall(text)
        if matches:
            return normalize_number(matches[-1]), True
    numbers = _ANY_NUMBER.findall(text)
    return (normalize_number(numbers[-1]), False) if numbers else (None, False)


def numeric_answer_reward(completion: str, row: dict[str, Any], format_weight: float = 0.0,
                          require_format: bool = False) -> dict[str, float]:
    """1 when the final number equals ``row["answer"]``; optional bonus for an explicit format.

    Scores: ``correct`` (0/1), ``format`` (1 when the answer was given in an explicit format),
    ``reward = correct + format_weight * format``. With ``require_format`` an answer found only
    by the last-number fallback does not count as correct.
    """
    predicted, formatted = extract_final_number(completion)
    correct = predicted is not None and predicted == normalize_number(str(row["answer"]))
    if require_format and not formatted:
        correct = False
    fmt = float(formatted)
    return {"reward": float(correct) + format_weight * fmt, "correct": float(correct), "format": fmt}
