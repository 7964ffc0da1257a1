"""Rewards: score a completion against its dataset row.

Every reward returns a dict of named scores; ``reward`` is what training optimizes, the
other keys (``correct``, ``format``, ...) are logged. A reward that raises or runs past its
deadline gives 0 for that sample and is counted; it never stops a run.

Named rewards (options in :mod:`grpo_utils.rewards.registry`): ``gsm8k`` / ``numeric_answer``,
``math``, ``countdown``, ``text_similarity``, ``reward_model``, ``callable``, ``ifeval``.
:func:`build_reward` builds one, or a weighted sum of several, from the ``reward:`` config;
``python -m grpo_utils.rewards`` scores a JSONL file offline.
"""

from __future__ import annotations

from grpo_utils.rewards.deadline import RewardTimeout, call_with_deadline
from grpo_utils.rewards.function import DEFAULT_TIMEOUT_S, RewardFunction, build_reward, plan_reward
from grpo_utils.rewards.numeric import extract_final_number, normalize_number, numeric_answer_reward
from grpo_utils.rewards.registry import REWARDS, RewardSpec

__all__ = ["DEFAULT_TIMEOUT_S", "REWARDS", "RewardFunction", "RewardSpec", "RewardTimeout", "build_reward",
           "call_with_deadline", "extract_final_number", "normalize_number", "numeric_answer_reward",
           "plan_reward"]
