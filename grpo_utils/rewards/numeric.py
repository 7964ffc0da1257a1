"""Numeric final-answer reward (GSM8K style): the last number the model commits to must equal
``row["answer"]``; whether it was given in an explicit format is scored separately.

The reference may be a bare number or an official GSM8K solution ending in ``#### N``; one that
cannot be read as a number raises (a counted failure), never a silent 0."""

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


def gsm8k_final_answer(solution: str) -> str:
    """The text after the last ``####`` of an official GSM8K solution (its final answer), commas
    removed; the dataset loader stores it as a row's ``answer``."""
    return solution.rsplit("####", 1)[-1].strip().replace(",", "")


def reference_number(answer: Any, field: str = "answer") -> str:
    """``row[field]`` as a canonical number (:func:`normalize_number`): a bare number or an official
    GSM8K solution (the number after its last ``####``). Raises ValueError naming the field when it
    is None, empty or not a number: a broken reference must be a counted failure, not a 0."""
    if answer is None or isinstance(answer, bool):
        raise ValueError(f"reference row[{field!r}]={answer!r} is not a number")
    text = str(answer)
    if not text.strip():
        raise ValueError(f"reference row[{field!r}] is empty")
    value = normalize_number(gsm8k_final_answer(text) if "####" in text else text)
    if value is None:
        shown = text.strip().splitlines()[-1][:80]
        raise ValueError(f"reference row[{field!r}]={shown!r} is not a number"
                         + (" (after its last '####')" if "####" in text else ""))
    return value


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
    """1 when the final number equals ``row["answer"]`` (a number, or an official GSM8K solution
    ending in ``#### N``); optional bonus for an explicit format. A missing or unreadable
    reference raises ValueError.

    Scores: ``correct`` (0/1), ``format`` (1 when the answer was given in an explicit format),
    ``reward = correct + format_weight * format``. With ``require_format`` an answer found only
    by the last-number fallback does not count as correct.
    """
    if "answer" not in row:
        raise ValueError("row has no 'answer' (the reference number)")
    reference = reference_number(row["answer"])
    predicted, formatted = extract_final_number(completion)
    correct = predicted is not None and predicted == reference
    if require_format and not formatted:
        correct = False
    fmt = float(formatted)
    return {"reward": float(correct) + format_weight * fmt, "correct": float(correct), "format": fmt}
