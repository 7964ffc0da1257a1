"""The named rewards, their options (with defaults and types) and their validation.

Validation (:func:`check_options`) is cheap and runs for every component before any reward is
built, so a bad config fails in one line naming the key before a reward model is loaded.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from grpo_utils.rewards.python_callable import IN_PROCESS_PREFIX  # a reward_model.path of an in-memory model

REQUIRED = object()


@dataclass
class Scorer:
    """A built reward. Per-sample (``score(completion, row, prompt) -> dict``) or batched
    (``score_batch(completions, rows, prompts) -> list[dict]``, called ``batch_size`` samples at
    a time). ``keys``: the scores it always returns (more may appear, e.g. from a user function)."""

    keys: tuple[str, ...]
    score: Callable[[str, dict, str | None], Mapping] | None = None
    score_batch: Callable[[list[str], list[dict], list[str | None]], list[Mapping]] | None = None
    batch_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardSpec:
    """``options``: name -> (default or REQUIRED, type); a None default also admits None.
    ``fields(options)``: the row fields needed, each a tuple of alternatives. ``check(options)``
    raises ValueError with a message starting with the option's name."""

    name: str
    summary: str
    options: Mapping[str, tuple[Any, type]]
    build: Callable[[dict[str, Any]], Scorer]
    fields: Callable[[dict[str, Any]], list[tuple[str, ...]]] = lambda o: []
    check: Callable[[dict[str, Any]], None] | None = None
    uses_prompt: bool = False


# ----------------------------------------------------------------------------- builders


def _numeric(o: dict[str, Any]) -> Scorer:
    from grpo_utils.rewards.numeric import numeric_answer_reward

    return Scorer(("reward", "correct", "format"), score=lambda c, row, p: numeric_answer_reward(c, row, **o))


def _math(o: dict[str, Any]) -> Scorer:
    import math_verify  # noqa: F401  (fail at build time, not per sample, when it is missing)

    from grpo_utils.rewards.math_answer import math_reward

    return Scorer(("reward", "correct", "format", "parsed"), score=lambda c, row, p: math_reward(c, row, **o))


def _countdown(o: dict[str, Any]) -> Scorer:
    from grpo_utils.rewards.countdown import countdown_reward

    return Scorer(("reward", "correct", "format", "valid"), score=lambda c, row, p: countdown_reward(c, row, **o))


def _text_similarity(o: dict[str, Any]) -> Scorer:
    from grpo_utils.rewards.text_similarity import TextSimilarity

    fn = TextSimilarity(**o)
    keys = ("reward", "f1", *fn.rouge_types, "bleu", fn.distinct_key)
    return Scorer(keys, score=lambda c, row, p: fn(c, row))


def _reward_model(o: dict[str, Any]) -> Scorer:
    from grpo_utils.rewards.reward_model import RewardModelScorer

    model = RewardModelScorer(**o)
    return Scorer(model.keys, score_batch=model, batch_size=model.batch_size, extra={"model": model})


def _callable(o: dict[str, Any]) -> Scorer:
    from grpo_utils.rewards.python_callable import CallableReward

    fn = CallableReward(o["_target_"], o["kwargs"])
    if o["batched"]:
        return Scorer(fn.keys, score_batch=fn.batch)
    return Scorer(fn.keys, score=fn)


def _ifeval(o: dict[str, Any]) -> Scorer:
    from grpo_utils.rewards.ifeval import ifeval_reward  # imported here: the package may land later

    keys = ("reward", "correct", "strict_fraction", "loose_fraction", "strict_all", "loose_all")
    return Scorer(keys, score=lambda c, row, p: ifeval_reward(c, row, **o))


# ----------------------------------------------------------------------------- checks


def _at_least(options: dict[str, Any], name: str, low: float) -> None:
    value = options.get(name)
    if value is not None and value < low:
        raise ValueError(f"{name}={value!r} must be >= {low}")


def _one_of(options: dict[str, Any], name: str, allowed: tuple[str, ...]) -> None:
    if options[name] not in allowed:
        raise ValueError(f"{name}={options[name]!r} is unknown; expected one of {', '.join(allowed)}")


def _check_math(o: dict[str, Any]) -> None:
    _at_least(o, "math_verify_timeout_s", 0)
    if importlib.util.find_spec("math_verify") is None:
        raise ValueError("name='math' needs the math-verify package (pip install math-verify)")


def _check_countdown(o: dict[str, Any]) -> None:
    _at_least(o, "max_expression_chars", 1)
    _at_least(o, "max_abs_value", 1)


def _check_text_similarity(o: dict[str, Any]) -> None:
    from grpo_utils.rewards.text_similarity import ROUGE_TYPES

    _one_of(o, "rouge_type", ROUGE_TYPES)
    weights = ("f1_weight", "rouge_weight", "bleu_weight", "distinct_weight")
    for name in weights:
        _at_least(o, name, 0)
    if sum(o[name] for name in weights) <= 0:
        raise ValueError(f"{' + '.join(weights)} must be > 0")
    _at_least(o, "distinct_n", 1)


def _check_reward_model(o: dict[str, Any]) -> None:
    from grpo_utils.rewards.reward_model import DTYPES

    path = o["path"]
    if path.startswith(IN_PROCESS_PREFIX):  # a model handed over in memory (the Python API)
        _one_of(o, "dtype", DTYPES)
        _at_least(o, "batch_size", 1)
        return
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ValueError(f"path={path!r} holds no config.json (not a saved Hugging Face model)")
    elif os.path.exists(expanded):
        raise ValueError(f"path={path!r} is not a directory")
    elif path.startswith(("/", ".", "~")) or path.count("/") != 1:  # not a hub id like 'org/name'
        raise ValueError(f"path={path!r} does not exist")
    o["path"] = expanded
    _one_of(o, "dtype", DTYPES)
    _at_least(o, "batch_size", 1)
    _at_least(o, "max_length", 1)
    _at_least(o, "label_index", 0)


def _check_callable(o: dict[str, Any]) -> None:
    from grpo_utils.errors import Terminated
    from grpo_utils.rewards.python_callable import import_object

    try:
        fn = import_object(o["_target_"])
    except BaseException as e:  # any import failure of user code (exit() at import too) is one config line
        if isinstance(e, (KeyboardInterrupt, Terminated)):
            raise
        raise ValueError(f"_target_={o['_target_']!r} cannot be imported: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ValueError(f"_target_={o['_target_']!r} is not callable")


def _check_ifeval(o: dict[str, Any]) -> None:
    _one_of(o, "mode", ("fraction", "all"))
    _one_of(o, "strictness", ("strict", "loose"))
    if importlib.util.find_spec("grpo_utils.rewards.ifeval") is None:
        raise ValueError("name='ifeval' is unavailable: grpo_utils.rewards.ifeval is not installed")


# ----------------------------------------------------------------------------- the registry

_NUMERIC_OPTIONS = {"format_weight": (0.0, float), "require_format": (False, bool)}
_GSM8K_SUMMARY = "final number (#### N, \\boxed{N}, <answer>, 'the answer is N', last number) == row['answer']"

REWARDS: dict[str, RewardSpec] = {
    spec.name: spec for spec in [
        RewardSpec("numeric_answer", _GSM8K_SUMMARY, _NUMERIC_OPTIONS, _numeric, lambda o: [("answer",)]),
        RewardSpec("gsm8k", _GSM8K_SUMMARY + " (alias of numeric_answer)", _NUMERIC_OPTIONS, _numeric,
                   lambda o: [("answer",)]),
        RewardSpec("math", "final answer equivalent to the reference (math-verify)",
                   {**_NUMERIC_OPTIONS, "math_verify_timeout_s": (5.0, float)}, _math,
                   lambda o: [("answer", "solution")], _check_math),
        RewardSpec("countdown", "safe arithmetic over row['numbers'] (each at most once) == row['target']",
                   {"format_weight": (0.0, float), "use_all_numbers": (False, bool),
                    "max_expression_chars": (200, int), "max_abs_value": (10**12, int)},
                   _countdown, lambda o: [("numbers",), ("target",)], _check_countdown),
        RewardSpec("text_similarity", "weighted token F1 / ROUGE / BLEU against a reference field, "
                   "plus the completion's distinct-n",
                   {"f1_weight": (1.0, float), "rouge_weight": (1.0, float), "bleu_weight": (1.0, float),
                    "rouge_type": ("rougeL", str), "reference_field": ("answer", str),
                    "use_stemmer": (False, bool), "lowercase_bleu": (True, bool), "use_answer_tag": (False, bool),
                    "distinct_weight": (0.0, float), "distinct_n": (2, int)},
                   _text_similarity, lambda o: [(o["reference_field"],)], _check_text_similarity),
        RewardSpec("reward_model", "a sequence-classification model scores prompt + completion (batched)",
                   {"path": (REQUIRED, str), "device": ("cpu", str), "dtype": ("float32", str),
                    "batch_size": (8, int), "max_length": (None, int), "chat_template": (False, bool),
                    "prompt_field": (None, str), "label_index": (0, int), "sigmoid": (False, bool)},
                   _reward_model, lambda o: [(o["prompt_field"],)] if o["prompt_field"] else [],
                   _check_reward_model, uses_prompt=True),
        RewardSpec("callable", "a user function (prompt, completion, **row) -> float | dict, by _target_; "
                   "batched: (prompts, completions, **columns) -> list",
                   {"_target_": (REQUIRED, str), "kwargs": (None, dict), "batched": (False, bool)}, _callable,
                   check=_check_callable,
                   uses_prompt=True),
        RewardSpec("ifeval", "IFEval instruction following (fraction or all of the instructions)",
                   {"mode": ("fraction", str), "strictness": ("strict", str)}, _ifeval,
                   lambda o: [("instruction_id_list",), ("kwargs",)], _check_ifeval),
    ]
}


def _type_ok(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is dict:
        return isinstance(value, Mapping)
    return isinstance(value, kind)


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}


def check_options(spec: RewardSpec, given: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The options of one reward with defaults filled in; ValueError naming ``where.<key>``."""
    unknown = [k for k in given if k not in spec.options]
    if unknown:
        allowed = ", ".join(spec.options) or "none"
        raise ValueError(f"{where}.{unknown[0]} is not an option of reward {spec.name!r}; its options: {allowed}")
    options: dict[str, Any] = {}
    for name, (default, kind) in spec.options.items():
        if name not in given:
            if default is REQUIRED:
                raise ValueError(f"{where}.{name} is required by reward {spec.name!r}")
            options[name] = default
            continue
        value = given[name]
        if value is None and default is None:
            options[name] = None
            continue
        if not _type_ok(value, kind):
            raise ValueError(f"{where}.{name}={value!r} must be {_KIND_NAMES.get(kind, kind.__name__)}")
        options[name] = float(value) if kind is float else (dict(value) if kind is dict else value)
    if spec.check is not None:
        try:
            spec.check(options)
        except ValueError as e:
            raise ValueError(f"{where}.{e}") from None
    return options
