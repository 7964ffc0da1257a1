"""Strict and loose IFEval scoring of one response, and the reward built on it.

Strict: the response as written must follow the instruction. Loose (the official upper
bound): the instruction is followed if any of eight variants follows it: the response;
without its first line; without its last line; without both; and each of those four with
every ``*`` removed. This forgives a preamble ("Sure, here it is:"), a closing remark, and
markdown emphasis. Under both, a blank response (or blank variant) follows nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from grpo_utils.rewards.ifeval.checkers import Checker, build_checker

MODES = ("fraction", "all")
STRICTNESS = ("strict", "loose")


def loose_variants(response: str) -> list[str]:
    """The eight responses the official loose evaluation tries, in its order."""
    lines = response.split("\n")
    without_first = "\n".join(lines[1:]).strip()
    without_last = "\n".join(lines[:-1]).strip()
    without_both = "\n".join(lines[1:-1]).strip()
    return [
        response,
        response.replace("*", ""),
        without_first,
        without_last,
        without_both,
        without_first.replace("*", ""),
        without_last.replace("*", ""),
        without_both.replace("*", ""),
    ]


def _follows(checker: Checker, response: str) -> bool:
    return bool(response.strip()) and checker(response)


def _checkers(instruction_id_list: Sequence[str], kwargs: Sequence[Any] | None, prompt: str | None) -> list[Checker]:
    if isinstance(instruction_id_list, str) or not isinstance(instruction_id_list, Sequence):
        raise ValueError(f"instruction_id_list must be a list of ids, got {type(instruction_id_list).__name__}")
    if kwargs is None:
        kwargs = [None] * len(instruction_id_list)
    if len(kwargs) != len(instruction_id_list):
        raise ValueError(f"{len(instruction_id_list)} instruction ids but {len(kwargs)} kwargs dicts")
    return [build_checker(i, k, prompt) for i, k in zip(instruction_id_list, kwargs)]


def check_instructions(response: str, instruction_id_list: Sequence[str], kwargs: Sequence[Any] | None,
                       prompt: str | None = None) -> dict[str, list[bool]]:
    """Whether ``response`` follows each instruction: ``{"strict": [...], "loose": [...]}``.

    ``kwargs[i]`` configures instruction ``i`` (None-valued keys ignored). ``prompt`` is the
    row's prompt, used by ``combination:repeat_prompt`` when its kwargs lack
    ``prompt_to_repeat``. Raises ValueError for an unknown id or unusable kwargs."""
    checkers = _checkers(instruction_id_list, kwargs, prompt)
    variants: list[str] | None = None
    strict, loose = [], []
    for checker in checkers:
        followed = _follows(checker, response)
        strict.append(followed)
        if not followed:  # the response itself is the first loose variant
            if variants is None:
                variants = list(dict.fromkeys(loose_variants(response)[1:]))  # skip repeats
            followed = any(_follows(checker, variant) for variant in variants)
        loose.append(followed)
    return {"strict": strict, "loose": loose}


def _row_results(completion: str, row: Mapping[str, Any]) -> dict[str, list[bool]]:
    if "instruction_id_list" not in row:  # a clear counted failure, not a bare KeyError
        raise ValueError("row has no 'instruction_id_list' (the instructions to check)")
    return check_instructions(completion, row["instruction_id_list"], row.get("kwargs"), row.get("prompt"))


def ifeval_reward(completion: str, row: Mapping[str, Any], mode: str = "fraction",
                  strictness: str = "strict") -> dict[str, float]:
    """IFEval reward for one completion of ``row`` (keys ``prompt``, ``instruction_id_list``,
    ``kwargs``).

    ``reward`` is the fraction of instructions followed (``mode="fraction"``) or 1/0 for
    all/not all (``mode="all"``), judged ``strictness="strict"`` or ``"loose"``. ``correct``
    is 1.0 when every instruction is followed under that strictness. Both strict and loose
    fractions and all-followed flags are returned for logging."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if strictness not in STRICTNESS:
        raise ValueError(f"strictness must be one of {STRICTNESS}, got {strictness!r}")
    results = _row_results(completion, row)
    if not results["strict"]:
        raise ValueError("row has no instructions (empty instruction_id_list)")
    n = len(results["strict"])
    scores = {
        "strict_fraction": sum(results["strict"]) / n,
        "loose_fraction": sum(results["loose"]) / n,
        "strict_all": float(all(results["strict"])),
        "loose_all": float(all(results["loose"])),
    }
    correct = scores[f"{strictness}_all"]
    reward = scores[f"{strictness}_fraction"] if mode == "fraction" else correct
    return {"reward": reward, "correct": correct, **scores}


def per_instruction_results(completion: str, row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One ``{"instruction_id", "strict", "loose"}`` per instruction of ``row``, in order."""
    results = _row_results(completion, row)
    return [
        {"instruction_id": instruction_id, "strict": strict, "loose": loose}
        for instruction_id, strict, loose in zip(row["instruction_id_list"], results["strict"], results["loose"])
    ]
