"""IFEval: verifiable instruction following (Zhou et al. 2023), as a reward.

A row carries ``prompt``, ``instruction_id_list`` (e.g. ``["punctuation:no_comma",
"length_constraints:number_words"]``) and ``kwargs`` (one dict per instruction; keys set
to None are ignored). Each instruction has a checker that reproduces the official
evaluation, scored strictly (the response as written) and loosely (the official upper
bound that forgives a first/last line and ``*`` markup). Works offline: sentences are
counted with Punkt's English model bundled by the ``punkt`` package, languages are
identified by langdetect with a fixed seed.

    >>> row = {"prompt": "...", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    >>> ifeval_reward("No commas here.", row)["reward"]
    1.0
"""

from __future__ import annotations

from grpo_utils.rewards.ifeval.checkers import INSTRUCTION_IDS, Checker, build_checker, clean_kwargs
from grpo_utils.rewards.ifeval.scoring import (
    MODES,
    STRICTNESS,
    check_instructions,
    ifeval_reward,
    loose_variants,
    per_instruction_results,
)

__all__ = [
    "INSTRUCTION_IDS",
    "MODES",
    "STRICTNESS",
    "Checker",
    "build_checker",
    "check_instructions",
    "clean_kwargs",
    "ifeval_reward",
    "loose_variants",
    "per_instruction_results",
]
