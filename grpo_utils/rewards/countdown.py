"""Countdown reward: an arithmetic expression over the row's ``numbers`` must equal ``target``.

Model text is never executed. The expression is parsed with :func:`ast.parse` (which only
parses; it does not fold constants, so ``2**10**10`` is never computed) and accepted only if
every node is an integer literal, ``+ - * /`` (binary, or unary minus) or parentheses. The
numbers it uses must be a sub-multiset of ``numbers`` (each at most once; all of them with
``use_all_numbers``), checked before anything is evaluated. Evaluation uses exact
:class:`fractions.Fraction` arithmetic and stops on any intermediate value whose numerator or
denominator exceeds ``max_abs_value``; over-long expressions are rejected before parsing.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction
from typing import Any

from grpo_utils.rewards.extract import last_tag_content

# A run of characters that can make up an arithmetic expression (no '=', no letters).
_ARITHMETIC_RUN = re.compile(r"[\d \t+\-*/().]+")
_BINARY_OPERATION = re.compile(r"\d\)*[+\-*/]\(*-?\d")  # matched on a run with blanks removed
_SYMBOLS = {"×": "*", "÷": "/", "−": "-", "\\times": "*", "\\div": "/", "\\cdot": "*"}

_BINARY_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
               ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


class ExpressionError(ValueError):
    """The text is not an allowed arithmetic expression over the given numbers."""


def _normalize(text: str) -> str:
    for symbol, op in _SYMBOLS.items():
        text = text.replace(symbol, op)
    return text


def extract_expression(completion: str) -> tuple[str | None, bool]:
    """The candidate expression and whether it came from ``<answer>`` tags.

    With tags: the last tag's content, cut at the first ``=`` (``(1+2)*3 = 9`` gives
    ``(1+2)*3``). Without: the last run of arithmetic characters holding an operator, in the
    last line that has one (so ``... 1 + 2 * 3 = 7`` gives ``1 + 2 * 3``).
    """
    tagged = last_tag_content(completion, "answer")
    if tagged is not None:
        return _normalize(tagged).split("=", 1)[0].strip(), True
    for line in reversed(_normalize(completion).splitlines()):
        runs = [r.strip() for r in _ARITHMETIC_RUN.findall(line)
                if _BINARY_OPERATION.search(r.replace(" ", "").replace("\t", ""))]
        if runs:
            return runs[-1], False
    return None, False


def parse_expression(text: str, max_chars: int = 200) -> ast.Expression:
    """The AST of ``text`` if it is an allowed arithmetic expression (raises ExpressionError)."""
    if len(text) > max_chars:
        raise ExpressionError(f"expression longer than {max_chars} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise ExpressionError(f"not an expression: {type(e).__name__}") from None
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.USub, *_BINARY_OPS)):
            continue
        if isinstance(node, ast.Constant) and type(node.value) is int:
            continue
        raise ExpressionError(f"{type(node).__name__} is not allowed")
    return tree


def numbers_used(tree: ast.AST) -> list[int]:
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)]


def evaluate(tree: ast.Expression, max_abs_value: int = 10**12) -> Fraction:
    """Exact value of a tree accepted by :func:`parse_expression`; ExpressionError on division by
    zero or an intermediate value beyond ``max_abs_value`` (numerator or denominator)."""

    def check(value: Fraction) -> Fraction:
        if abs(value.numerator) > max_abs_value or value.denominator > max_abs_value:
            raise ExpressionError("intermediate value too large")
        return value

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant):
            return check(Fraction(node.value))
        if isinstance(node, ast.UnaryOp):
            return -ev(node.operand)
        left, right = ev(node.left), ev(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ExpressionError("division by zero")
        return check(_BINARY_OPS[type(node.op)](left, right))

    return ev(tree.body)


def _exact(value: Any) -> Fraction | None:
    """``value`` (a number, or a string as JSON may carry one) as an exact fraction; None if it is not one."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return Fraction(str(value).strip())
    except (ValueError, ZeroDivisionError):
        return None


def countdown_reference(row: dict[str, Any]) -> tuple[list[int], Fraction]:
    """The row's ``numbers`` (a non-empty list of integers: ``3``, ``"3"`` and ``3.0`` are 3, ``2.5``
    is refused rather than truncated) and ``target`` (a number). ValueError naming the field
    otherwise, so a broken row is a counted failure rather than a silent 0."""
    numbers = row.get("numbers")
    exact = [_exact(n) for n in numbers] if isinstance(numbers, (list, tuple)) else []
    if not exact or any(v is None or v.denominator != 1 for v in exact):
        raise ValueError(f"reference row['numbers']={numbers!r} must be a non-empty list of integers")
    target = _exact(row.get("target"))
    if target is None:
        raise ValueError(f"reference row['target']={row.get('target')!r} is not a number")
    return [int(v) for v in exact], target


def countdown_reward(completion: str, row: dict[str, Any], format_weight: float = 0.0,
                     use_all_numbers: bool = False, max_expression_chars: int = 200,
                     max_abs_value: int = 10**12) -> dict[str, float]:
    """1 when the expression uses only the row's ``numbers`` (each at most once, or exactly
    once each with ``use_all_numbers``) and equals ``row["target"]``.

    Scores: ``correct`` (0/1), ``format`` (1 when ``<answer>`` tags hold a well-formed
    expression), ``valid`` (1 when the expression is allowed and uses allowed numbers, whatever
    its value), ``reward = correct + format_weight * format``.
    """
    numbers, target = countdown_reference(row)
    text, tagged = extract_expression(completion)
    fmt = valid = correct = 0.0
    if text is not None:
        try:
            tree = parse_expression(text, max_expression_chars)
            fmt = float(tagged)
            used = Counter(numbers_used(tree))
            available = Counter(numbers)
            if used - available:
                raise ExpressionError("uses a number not given, or one more often than given")
            if use_all_numbers and used != available:
                raise ExpressionError("does not use every number")
            valid = 1.0
            correct = float(evaluate(tree, max_abs_value) == target)
        except ExpressionError:
            pass
    return {"reward": correct + format_weight * fmt, "correct": correct, "format": fmt, "valid": valid}
