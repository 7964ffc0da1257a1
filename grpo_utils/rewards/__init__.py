"""Rewards: score a completion against its dataset row.

Every reward returns a dict of named scores; ``reward`` is what training optimizes, the
other keys (``correct``, ``format``, ...) are logged. A reward that raises (an unreadable
reference included), returns an absurd score or runs past its deadline gives 0 for that sample
and is counted; a step where most samples fail prints a warning, and only a reward failing on
every sample for ``reward.stop_after_failed_steps`` steps in a row stops a run (RewardError).

Named rewards (options in :mod:`grpo_utils.rewards.registry`): ``gsm8k`` / ``numeric_answer``,
``math``, ``countdown``, ``text_similarity``, ``reward_model``, ``callable``, ``ifeval``.
:func:`build_reward` builds one, or a weighted sum of several, from the ``reward:`` config;
``python -m grpo_utils.rewards`` scores a JSONL file offline.
"""

from __future__ import annotations

from grpo_utils.rewards.deadline import RewardTimeout, call_with_deadline
from grpo_utils.rewards.function import (
    DEFAULT_MAX_ABS_SCORE,
    DEFAULT_STOP_AFTER_FAILED_STEPS,
    DEFAULT_TIMEOUT_S,
    DEFAULT_WARN_FAILURE_FRACTION,
    RewardFunction,
    build_reward,
    plan_reward,
)
from grpo_utils.rewards.numeric import (
    extract_final_number,
    gsm8k_final_answer,
    normalize_number,
    numeric_answer_reward,
    reference_number,
)
from grpo_utils.rewards.registry import REWARDS, RewardSpec

__all__ = ["DEFAULT_MAX_ABS_SCORE", "DEFAULT_STOP_AFTER_FAILED_STEPS", "DEFAULT_TIMEOUT_S",
           "DEFAULT_WARN_FAILURE_FRACTION", "REWARDS", "RewardFunction", "RewardSpec", "RewardTimeout", "build_reward",
           "call_with_deadline", "extract_final_number", "gsm8k_final_answer", "normalize_number",
           "numeric_answer_reward", "plan_reward", "reference_number"]
