"""MATH-style reward: the model's final answer must be mathematically equivalent to the
reference, as decided by math-verify (fractions, decimals, ``\\dfrac``, intervals, tuples,
``\\text{(A)}`` choices, ... are compared as sympy objects, not as strings)."""

from __future__ import annotations

import re
from typing import Any

from grpo_utils.rewards.deadline import deadline_active, on_main_thread
from grpo_utils.rewards.extract import last_tag_content

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    start, depth = starts[-1], 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def gold_answer(row: dict[str, Any]) -> str:
    """``row["answer"]`` when present and non-empty, else the last ``\\boxed{}`` of ``row["solution"]``."""
    answer = row.get("answer")
    if answer is not None and str(answer).strip():
        return str(answer)
    solution = row.get("solution")
    boxed = last_boxed(str(solution)) if solution is not None else None
    if boxed is None:
        raise ValueError("row has no 'answer' and no \\boxed{} answer in 'solution'")
    return boxed


def _timeout_arg(timeout_s: float | None) -> int | None:
    """math-verify's own timeout (it uses signal.alarm): off when a deadline of ours already bounds
    the call or when not on the main thread (where signals cannot be used)."""
    if deadline_active():
        _silence_math_verify_timeout_warning()
        return None
    if not timeout_s or timeout_s <= 0 or not on_main_thread():
        return None
    return max(1, round(timeout_s))


def _silence_math_verify_timeout_warning() -> None:
    """math-verify warns once that its timeout is off and 'you must provide the logic for timeout
    interruption yourself': we do (:mod:`.deadline`), so the warning would only mislead."""
    from math_verify import grader, parser

    parser.TIMEOUT_WARNING_SHOWN = grader.TIMEOUT_WARNING_SHOWN = True


def _parse(text: str, timeout: int | None) -> list:
    from math_verify import parse

    return parse(text, parsing_timeout=timeout)


_GOLD_CACHE: dict[str, list] = {}
_GOLD_CACHE_SIZE = 8192


def parse_gold(gold: str, timeout: int | None) -> list:
    """The reference parsed by math-verify; cached (rows repeat G times per step), failures not."""
    parsed = _GOLD_CACHE.get(gold)
    if parsed is None:
        parsed = _parse("$" + gold + "$", timeout) or _parse(gold, timeout)
        if not parsed:
            raise ValueError(f"reference answer {gold[:80]!r} cannot be parsed by math-verify")
        if len(_GOLD_CACHE) >= _GOLD_CACHE_SIZE:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[gold] = parsed
    return parsed


def extract_prediction(completion: str, timeout: int | None) -> tuple[list, bool]:
    """The model's answer parsed by math-verify and whether it was explicitly marked.

    A ``\\boxed{}`` answer wins (math-verify's own priority, last box); else the content of the
    last ``<answer>...</answer>`` tag; else math-verify's fallback: the last LaTeX/plain
    expression in the text.
    """
    if _BOXED.search(completion):
        return _parse(completion, timeout), True
    content = last_tag_content(completion, "answer")
    if content is not None:
        content = content.strip()
        parsed = _parse(content if "$" in content else "$" + content + "$", timeout) or _parse(content, timeout)
        return parsed, True
    return _parse(completion, timeout), False


def math_reward(completion: str, row: dict[str, Any], format_weight: float = 0.0, require_format: bool = False,
                math_verify_timeout_s: float = 5.0) -> dict[str, float]:
    """1 when the final answer is equivalent to the reference (math-verify ``verify``).

    Scores: ``correct`` (0/1), ``format`` (1 when the answer is in ``\\boxed{}`` or ``<answer>``
    tags), ``parsed`` (1 when an answer could be extracted at all),
    ``reward = correct + format_weight * format``.
    """
    from math_verify import verify

    timeout = _timeout_arg(math_verify_timeout_s)
    gold = parse_gold(gold_answer(row), timeout)
    predicted, formatted = extract_prediction(completion, timeout)
    correct = bool(predicted) and verify(gold, predicted, timeout_seconds=timeout)
    if require_format and not formatted:
        correct = False
    fmt = float(formatted)
    return {"reward": float(correct) + format_weight * fmt, "correct": float(correct), "format": fmt,
            "parsed": float(bool(predicted))}
