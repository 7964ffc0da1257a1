"""RewardFunction: one named reward or a weighted sum of several, applied to a batch with
per-sample failure and timeout isolation.

Config (the ``reward:`` section), either one reward::

    reward: {name: gsm8k, format_weight: 0.1, timeout_s: 10}

or a weighted sum::

    reward:
      timeout_s: 10
      components:
        - {name: math, weight: 1.0}
        - {name: text_similarity, weight: 0.2, rouge_type: rouge1, label: sim}

A sum's ``reward`` is ``sum_i weight_i * reward_i``; its ``correct`` is that of the first
component that has one; every component's scores are kept as ``<label>/<key>`` (label defaults
to the component's name). A single reward's scores are kept unprefixed.

Failures: a sample on which any component raises (``SystemExit`` and other ``BaseException``
escapes of user code included; only Ctrl-C and SIGTERM go through), returns a non-numeric
reward or an absurd score (any numeric score non-finite or beyond ``±max_abs_score``), or
(per-sample rewards) exceeds ``timeout_s`` seconds gets ``reward`` 0 (and ``correct`` 0); the
failing component's scores are 0, the others keep what they computed. The sample is counted in
the returned ``failures`` (and in ``last_timeouts`` when it timed out) with a one-line reason in
``last_errors``; the run goes on. ``timeout_s`` bounds each component's call on each sample (see
:mod:`.deadline` for how); batched rewards (``reward_model``) are not interrupted, only isolated
per batch (a bad value in a batch's answer fails that sample only).

Failing rewards are made visible. Each call scores one step's samples (one generation round;
``grpo-eval.py`` and held-out evaluation call it per batch). A call in which more than
``warn_failure_fraction`` of the samples fail prints one line to stderr::

    warning: reward numeric_answer failed on 64/64 samples this step (last: ValueError: ...)

and ``stop_after_failed_steps`` consecutive calls in which every sample fails raise
:class:`~grpo_utils.errors.RewardError` (0: never), since training on all-zero rewards teaches
nothing. These settings and ``max_abs_score`` sit next to ``timeout_s`` at the top of
``reward:`` (next to ``name`` or ``components``).
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from grpo_utils.errors import RewardError, Terminated
from grpo_utils.rewards.deadline import RewardTimeout, call_with_deadline
from grpo_utils.rewards.registry import REWARDS, RewardSpec, Scorer, check_options

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_WARN_FAILURE_FRACTION = 0.5
DEFAULT_STOP_AFTER_FAILED_STEPS = 3
#: Scores beyond this magnitude are failures: no task reward comes near it, and one runaway value
#: (a user function returning 1e308) would swamp ``reward/mean`` and the group's advantages.
DEFAULT_MAX_ABS_SCORE = 1e6
_SETTINGS = ("timeout_s", "warn_failure_fraction", "stop_after_failed_steps", "max_abs_score")
_COMPONENT_KEYS = ("name", "weight", "label")
_TOP_KEYS_SINGLE = ("name", *_SETTINGS)
_TOP_KEYS_SUM = ("components", *_SETTINGS)
_MAX_ERROR_CHARS = 300  # a reason is one line of at most this many characters


@dataclass
class _Planned:
    spec: RewardSpec
    options: dict[str, Any]
    weight: float
    label: str  # "" for a single reward: its scores are not prefixed
    where: str  # the config key of this reward, for errors ("reward", "reward.components[1]")


@dataclass
class Settings:
    """The ``reward:`` keys that apply to the whole reward, whatever its components."""

    timeout_s: float | None = DEFAULT_TIMEOUT_S
    warn_failure_fraction: float = DEFAULT_WARN_FAILURE_FRACTION
    stop_after_failed_steps: int = DEFAULT_STOP_AFTER_FAILED_STEPS
    max_abs_score: float = DEFAULT_MAX_ABS_SCORE


@dataclass
class _Component:
    name: str
    label: str
    weight: float
    scorer: Scorer
    keys: list[str]  # every score key seen so far ("reward" first): failures and gaps are 0-filled


def _to_plain(cfg: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # omegaconf is a dependency; only a bare install of this module lacks it
        pass
    return cfg


def _spec(name: Any, where: str) -> RewardSpec:
    if not isinstance(name, str) or name not in REWARDS:
        raise ValueError(f"{where}.name={name!r} is unknown; expected one of {', '.join(REWARDS)}")
    return REWARDS[name]


def _check_timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
        raise ValueError(f"reward.timeout_s={value!r} must be a number >= 0 (0 or null: no deadline)")
    return float(value) or None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pop_settings(cfg: dict[str, Any]) -> Settings:
    """Take the whole-reward keys out of ``cfg`` (what is left are the reward's own) and check them."""
    settings = Settings(timeout_s=_check_timeout(cfg.pop("timeout_s", DEFAULT_TIMEOUT_S)))
    fraction = cfg.pop("warn_failure_fraction", DEFAULT_WARN_FAILURE_FRACTION)
    if not _is_number(fraction) or not 0 <= fraction <= 1:
        raise ValueError(f"reward.warn_failure_fraction={fraction!r} must be a number in [0, 1] "
                         "(warn when more than this share of a step's samples fail; 1: never)")
    settings.warn_failure_fraction = float(fraction)
    steps = cfg.pop("stop_after_failed_steps", DEFAULT_STOP_AFTER_FAILED_STEPS)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"reward.stop_after_failed_steps={steps!r} must be an integer >= 0 "
                         "(stop after that many steps in a row where every sample fails; 0: never)")
    settings.stop_after_failed_steps = steps
    bound = cfg.pop("max_abs_score", DEFAULT_MAX_ABS_SCORE)
    if not _is_number(bound) or bound <= 0:
        raise ValueError(f"reward.max_abs_score={bound!r} must be a finite number > 0 "
                         "(a score beyond it is a failure)")
    settings.max_abs_score = float(bound)
    return settings


def plan_reward(reward_cfg: Mapping[str, Any]) -> tuple[list[_Planned], float | None, bool]:
    """Validate a ``reward:`` config without building anything heavy: (components, timeout_s,
    single). Raises a one-line ValueError naming the offending key."""
    planned, settings, single = plan_reward_settings(reward_cfg)
    return planned, settings.timeout_s, single


def plan_reward_settings(reward_cfg: Mapping[str, Any]) -> tuple[list[_Planned], Settings, bool]:
    """:func:`plan_reward` with every whole-reward setting: (components, settings, single)."""
    cfg = _to_plain(reward_cfg)
    if not isinstance(cfg, Mapping):
        raise ValueError(f"reward must be a mapping with 'name' or 'components', got {type(cfg).__name__}")
    cfg = dict(cfg)
    if "components" in cfg and cfg.get("name", "") is None:
        del cfg["name"]  # the schema's default 'name: null' merged under a config's components
    if "name" in cfg and "components" in cfg:
        raise ValueError("reward: give either 'name' (one reward) or 'components' (a weighted sum), not both")
    settings = _pop_settings(cfg)
    if "components" not in cfg:
        if "name" not in cfg:
            raise ValueError("reward.name is missing (or give reward.components)")
        spec = _spec(cfg.pop("name"), "reward")
        return [_Planned(spec, check_options(spec, cfg, "reward"), 1.0, "", "reward")], settings, True

    components = cfg.pop("components")
    if cfg:
        raise ValueError(f"reward.{next(iter(cfg))} is not allowed next to 'components'; "
                         f"allowed: {', '.join(_TOP_KEYS_SUM)} (options go inside each component)")
    if isinstance(components, (str, bytes)) or not isinstance(components, Sequence) or not components:
        raise ValueError("reward.components must be a non-empty list of {name: ..., weight: ...} mappings")
    planned, labels = [], set()
    for i, comp in enumerate(components):
        where = f"reward.components[{i}]"
        if not isinstance(comp, Mapping) or "name" not in comp:
            raise ValueError(f"{where} must be a mapping with a 'name'")
        comp = dict(comp)
        spec = _spec(comp.pop("name"), where)
        weight = comp.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"{where}.weight={weight!r} must be a finite number")
        label = comp.pop("label", spec.name)
        if not isinstance(label, str) or not label or "/" in label:
            raise ValueError(f"{where}.label={label!r} must be a non-empty string without '/'")
        if label in labels:
            raise ValueError(f"{where}.label={label!r} repeats an earlier component's; give each a distinct label")
        labels.add(label)
        planned.append(_Planned(spec, check_options(spec, comp, where), float(weight), label, where))
    return planned, settings, False


def _fields(specs_and_options) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for spec, options in specs_and_options:
        out += [f for f in spec.fields(options) if f not in out]
    return out


def planned_fields(planned: list[_Planned]) -> list[tuple[str, ...]]:
    """Row fields the planned rewards read (each a tuple of alternatives), known before building."""
    return _fields((p.spec, p.options) for p in planned)


def _as_scores(result: Any, max_abs: float = DEFAULT_MAX_ABS_SCORE) -> dict[str, float]:
    """A reward's result as floats within ``±max_abs``; non-numeric extras are dropped, a missing
    reward or an absurd numeric score (non-finite, or beyond the bound) raises."""
    if not isinstance(result, Mapping):
        raise TypeError(f"returned {type(result).__name__}, not a dict of scores")
    out = {}
    for key, value in result.items():
        if isinstance(value, numbers.Real) or (hasattr(value, "item") and getattr(value, "ndim", None) == 0):
            try:
                value = float(value)
            except OverflowError:  # an int beyond float range
                raise ValueError(f"score {key!r} is an integer too large for a float") from None
            if not math.isfinite(value) or abs(value) > max_abs:
                raise ValueError(f"score {key!r} is {value!r}, not a finite number within "
                                 f"±{max_abs:g} (reward.max_abs_score)")
            out[str(key)] = value
    if "reward" not in out:
        raise ValueError("no numeric 'reward' among the returned scores")
    return out


def _must_propagate(error: BaseException) -> bool:
    """Whether an exception raised by reward code must end the run: Ctrl-C and SIGTERM (also
    inside an exception group). Any other ``BaseException`` (``SystemExit`` from a user reward
    calling exit, ``GeneratorExit``, ...) only fails the samples it was raised for."""
    subgroup = getattr(error, "subgroup", None)  # a BaseExceptionGroup (Python 3.11+)
    if callable(subgroup) and hasattr(error, "exceptions"):
        return subgroup((KeyboardInterrupt, Terminated)) is not None
    return isinstance(error, (KeyboardInterrupt, Terminated))


def _reason(where: str, error: BaseException) -> str:
    """One line: ``<where>: <Type>: <first line of the message>``, or for an escape that is not an
    ``Exception`` (``SystemExit(3)``) ``<where>: SystemExit(3) raised by the reward``."""
    if isinstance(error, Exception):
        lines = str(error).strip().splitlines()
        text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    else:
        text = f"{error!r} raised by the reward"
    text = f"{where}: {text}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS - 3] + "..."


def _warn(line: str) -> None:
    """One line on stderr, written around a tqdm progress bar when one is drawn (the trainer's)."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; a bare install of this module may lack it
        print(line, file=sys.stderr, flush=True)
        return
    tqdm.write(line, file=sys.stderr)


class RewardFunction:
    """Scores a batch of completions against their dataset rows.

    ``RewardFunction("gsm8k", format_weight=0.1)`` builds one reward;
    ``RewardFunction(components=[...], timeout_s=5)`` a weighted sum (see the module doc);
    :func:`build_reward` builds either from a config mapping. The whole-reward settings
    (``warn_failure_fraction``, ``stop_after_failed_steps``, ``max_abs_score``) are keywords too.

    After each call: ``last_failures`` / ``last_timeouts`` (samples that failed / timed out),
    ``last_errors`` (per sample: None or a one-line reason), ``failed_steps`` (consecutive calls
    in which every sample failed); ``total_failures`` / ``total_timeouts`` accumulate over calls.
    """

    def __init__(self, name: str | None = None, *, components: Sequence[Mapping[str, Any]] | None = None,
                 timeout_s: float | None = DEFAULT_TIMEOUT_S, **options: Any):
        cfg: dict[str, Any] = {"timeout_s": timeout_s}
        if components is not None:
            cfg["components"] = components
        if name is not None:
            cfg["name"] = name
        cfg.update(options)
        self._init_from_plan(*plan_reward_settings(cfg))

    @classmethod
    def from_config(cls, reward_cfg: Mapping[str, Any]) -> RewardFunction:
        self = cls.__new__(cls)
        self._init_from_plan(*plan_reward_settings(reward_cfg))
        return self

    def _init_from_plan(self, planned: list[_Planned], settings: Settings, single: bool) -> None:
        self.timeout_s = settings.timeout_s
        self.warn_failure_fraction = settings.warn_failure_fraction
        self.stop_after_failed_steps = settings.stop_after_failed_steps
        self.max_abs_score = settings.max_abs_score
        self.single = single
        self.specs = [p.spec for p in planned]
        self.options = [p.options for p in planned]
        self.components = []
        for p in planned:  # validated above: only now is anything heavy (a reward model) built
            try:
                scorer = p.spec.build(dict(p.options))
            except (ValueError, OSError, ImportError) as e:  # e.g. a model that does not load
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(f"{p.where} (name={p.spec.name!r}): {first_line}") from e
            self.components.append(_Component(p.spec.name, p.label, p.weight, scorer, list(scorer.keys)))
        self.last_failures = self.last_timeouts = 0
        self.total_failures = self.total_timeouts = 0
        self.last_errors: list[str | None] = []
        self.failed_steps = 0

    # ------------------------------------------------------------------ description

    @property
    def name(self) -> str:
        return self.components[0].name if self.single else "+".join(c.label for c in self.components)

    @property
    def uses_prompt(self) -> bool:
        """Whether a component reads the prompt (pass ``prompts`` to ``__call__`` then)."""
        return any(spec.uses_prompt for spec in self.specs)

    def required_fields(self) -> list[tuple[str, ...]]:
        """Row fields the rewards read; each entry is a tuple of alternatives (any one will do)."""
        return _fields(zip(self.specs, self.options))

    def score_keys(self) -> list[str]:
        """The keys every score dict has (as known so far: a user function may add more)."""
        return list(self._empty_sample())

    # ------------------------------------------------------------------ scoring

    def _empty_sample(self) -> dict[str, float]:
        if self.single:
            return dict.fromkeys(self.components[0].keys, 0.0)
        out = {"reward": 0.0}
        if any("correct" in c.keys for c in self.components):
            out["correct"] = 0.0
        for c in self.components:
            out.update({f"{c.label}/{k}": 0.0 for k in c.keys})
        return out

    def _run_component(self, comp: _Component, completions, rows, prompts, errors, timed_out) -> list:
        """Per-sample results of one component (None where it failed)."""
        results: list[dict[str, float] | None] = [None] * len(completions)
        where = comp.label or comp.name
        if comp.scorer.score_batch is not None:
            step = comp.scorer.batch_size or len(completions)
            for start in range(0, len(completions), step):
                sl = slice(start, start + step)
                index = range(start, min(start + step, len(completions)))
                try:
                    chunk = list(comp.scorer.score_batch(completions[sl], rows[sl], prompts[sl]))
                    if len(chunk) != len(index):
                        raise ValueError(f"returned {len(chunk)} scores for {len(index)} samples")
                except BaseException as e:  # a broken batch must never stop a run (Ctrl-C must)
                    if _must_propagate(e):
                        raise
                    for i in index:
                        errors[i] = errors[i] or _reason(where, e)
                    continue
                for i, result in zip(index, chunk):  # an absurd value fails its own sample only
                    try:
                        results[i] = _as_scores(result, self.max_abs_score)
                    except BaseException as e:  # converting a user's value runs user code too
                        if _must_propagate(e):
                            raise
                        errors[i] = errors[i] or _reason(where, e)
            return results
        for i, (completion, row, prompt) in enumerate(zip(completions, rows, prompts)):
            try:
                result = call_with_deadline(comp.scorer.score, self.timeout_s, completion, row, prompt)
                results[i] = _as_scores(result, self.max_abs_score)
            except RewardTimeout as e:
                timed_out[i] = True
                errors[i] = errors[i] or f"{where}: timeout: {e}"
            except BaseException as e:  # a broken sample must never stop a run (Ctrl-C must)
                if _must_propagate(e):
                    raise
                errors[i] = errors[i] or _reason(where, e)
        return results

    def __call__(self, completions: list[str], rows: list[dict[str, Any]],
                 prompts: list[str] | None = None) -> tuple[list[dict[str, float]], int]:
        """(one score dict per completion, number of failed samples). ``prompts`` (optional) are
        the prompt texts the completions answer; without them rewards that read a prompt use
        ``row["prompt"]`` or ``row["question"]``."""
        n = len(completions)
        if len(rows) != n or (prompts is not None and len(prompts) != n):
            raise ValueError(f"got {n} completions, {len(rows)} rows and "
                             f"{'no' if prompts is None else len(prompts)} prompts")
        prompt_list: list[str | None] = list(prompts) if prompts is not None else [None] * n
        errors: list[str | None] = [None] * n
        timed_out = [False] * n
        per_component = [self._run_component(c, list(completions), list(rows), prompt_list, errors, timed_out)
                         for c in self.components]
        for comp, results in zip(self.components, per_component):  # keys a user function added
            for r in results:
                if r is not None:
                    comp.keys += [k for k in r if k not in comp.keys]

        scores = []
        for i in range(n):
            out = self._empty_sample()
            if self.single:
                if per_component[0][i] is not None:
                    out.update(per_component[0][i])
                scores.append(out)
                continue
            total, correct = 0.0, None
            for comp, results in zip(self.components, per_component):
                r = results[i]
                if r is None:
                    continue
                total += comp.weight * r["reward"]
                if correct is None and "correct" in r:
                    correct = r["correct"]
                out.update({f"{comp.label}/{k}": v for k, v in r.items()})
            if errors[i] is None and not math.isfinite(total):  # huge weights times bounded scores
                errors[i] = f"weighted sum: the total reward is {total}"
            if errors[i] is None:
                out["reward"] = total
                if correct is not None:
                    out["correct"] = correct
            scores.append(out)

        self.last_errors = errors
        self.last_failures = sum(e is not None for e in errors)
        self.last_timeouts = sum(timed_out)
        self.total_failures += self.last_failures
        self.total_timeouts += self.last_timeouts
        self._report_failures(n)
        return scores, self.last_failures

    @property
    def last_error(self) -> str | None:
        """The last sample's reason of the last call (None: no failure), without the reward's
        own name for a single reward (the warning and RewardError name it already)."""
        error = next((e for e in reversed(self.last_errors) if e is not None), None)
        prefix = f"{self.name}: "
        return error[len(prefix):] if error and self.single and error.startswith(prefix) else error

    def _report_failures(self, n: int) -> None:
        """The warning line and the stop rule (see the module doc); a call without samples is neither
        a failed nor a good step."""
        if n == 0:
            return
        failed = self.last_failures
        self.failed_steps = self.failed_steps + 1 if failed == n else 0
        if self.stop_after_failed_steps and self.failed_steps >= self.stop_after_failed_steps:
            raise RewardError(f"reward {self.name} failed on every sample for {self.failed_steps} consecutive "
                              f"steps (last: {self.last_error}); see reward.stop_after_failed_steps")
        if failed > self.warn_failure_fraction * n:
            _warn(f"warning: reward {self.name} failed on {failed}/{n} samples this step (last: {self.last_error})")


def build_reward(reward_cfg: Mapping[str, Any]) -> RewardFunction:
    """A RewardFunction from a ``reward:`` config (``{name: ..., <options>, <settings>}`` or
    ``{components: [...], <settings>}``, the settings being ``timeout_s``,
    ``warn_failure_fraction``, ``stop_after_failed_steps`` and ``max_abs_score``); every key is
    validated before anything is built."""
    return RewardFunction.from_config(reward_cfg)
