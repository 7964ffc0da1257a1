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

Failures: a sample on which any component raises, returns a non-finite or non-numeric reward,
or (per-sample rewards) exceeds ``timeout_s`` seconds gets ``reward`` 0 (and ``correct`` 0);
the failing component's scores are 0, the others keep what they computed. The sample is
counted in the returned ``failures`` (and in ``last_timeouts`` when it timed out); the run goes
on. ``timeout_s`` bounds each component's call on each sample (see :mod:`.deadline` for how);
batched rewards (``reward_model``) are not interrupted, only isolated per batch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from grpo_utils.rewards.deadline import RewardTimeout, call_with_deadline
from grpo_utils.rewards.registry import REWARDS, RewardSpec, Scorer, check_options

DEFAULT_TIMEOUT_S = 10.0
_COMPONENT_KEYS = ("name", "weight", "label")
_TOP_KEYS_SINGLE = ("name", "timeout_s")
_TOP_KEYS_SUM = ("components", "timeout_s")


@dataclass
class _Planned:
    spec: RewardSpec
    options: dict[str, Any]
    weight: float
    label: str  # "" for a single reward: its scores are not prefixed
    where: str  # the config key of this reward, for errors ("reward", "reward.components[1]")


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


def plan_reward(reward_cfg: Mapping[str, Any]) -> tuple[list[_Planned], float | None, bool]:
    """Validate a ``reward:`` config without building anything heavy: (components, timeout_s,
    single). Raises a one-line ValueError naming the offending key."""
    cfg = _to_plain(reward_cfg)
    if not isinstance(cfg, Mapping):
        raise ValueError(f"reward must be a mapping with 'name' or 'components', got {type(cfg).__name__}")
    cfg = dict(cfg)
    if "name" in cfg and "components" in cfg:
        raise ValueError("reward: give either 'name' (one reward) or 'components' (a weighted sum), not both")
    timeout_s = _check_timeout(cfg.pop("timeout_s", DEFAULT_TIMEOUT_S))
    if "components" not in cfg:
        if "name" not in cfg:
            raise ValueError("reward.name is missing (or give reward.components)")
        spec = _spec(cfg.pop("name"), "reward")
        return [_Planned(spec, check_options(spec, cfg, "reward"), 1.0, "", "reward")], timeout_s, True

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
    return planned, timeout_s, False


def _fields(specs_and_options) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for spec, options in specs_and_options:
        out += [f for f in spec.fields(options) if f not in out]
    return out


def planned_fields(planned: list[_Planned]) -> list[tuple[str, ...]]:
    """Row fields the planned rewards read (each a tuple of alternatives), known before building."""
    return _fields((p.spec, p.options) for p in planned)


def _as_scores(result: Any) -> dict[str, float]:
    """A reward's result as finite floats; non-numeric extras are dropped, a bad reward raises."""
    if not isinstance(result, Mapping):
        raise TypeError(f"returned {type(result).__name__}, not a dict of scores")
    out = {}
    for key, value in result.items():
        if isinstance(value, numbers.Real) or (hasattr(value, "item") and getattr(value, "ndim", None) == 0):
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"score {key!r} is {value}")
            out[str(key)] = value
    if "reward" not in out:
        raise ValueError("no numeric 'reward' among the returned scores")
    return out


class RewardFunction:
    """Scores a batch of completions against their dataset rows.

    ``RewardFunction("gsm8k", format_weight=0.1)`` builds one reward;
    ``RewardFunction(components=[...], timeout_s=5)`` a weighted sum (see the module doc);
    :func:`build_reward` builds either from a config mapping.

    After each call: ``last_failures`` / ``last_timeouts`` (samples that failed / timed out),
    ``last_errors`` (per sample: None or a one-line reason); ``total_failures`` /
    ``total_timeouts`` accumulate over calls.
    """

    def __init__(self, name: str | None = None, *, components: Sequence[Mapping[str, Any]] | None = None,
                 timeout_s: float | None = DEFAULT_TIMEOUT_S, **options: Any):
        cfg: dict[str, Any] = {"timeout_s": timeout_s}
        if components is not None:
            cfg["components"] = components
        if name is not None:
            cfg["name"] = name
        cfg.update(options)
        self._init_from_plan(*plan_reward(cfg))

    @classmethod
    def from_config(cls, reward_cfg: Mapping[str, Any]) -> RewardFunction:
        self = cls.__new__(cls)
        self._init_from_plan(*plan_reward(reward_cfg))
        return self

    def _init_from_plan(self, planned: list[_Planned], timeout_s: float | None, single: bool) -> None:
        self.timeout_s = timeout_s
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
                try:
                    chunk = comp.scorer.score_batch(completions[sl], rows[sl], prompts[sl])
                    if len(chunk) != len(completions[sl]):
                        raise ValueError(f"returned {len(chunk)} scores for {len(completions[sl])} samples")
                    chunk = [_as_scores(r) for r in chunk]
                except Exception as e:  # a broken batch must never stop a run
                    for i in range(start, min(start + step, len(completions))):
                        errors[i] = errors[i] or f"{where}: {type(e).__name__}: {e}"
                    continue
                results[sl] = chunk
            return results
        for i, (completion, row, prompt) in enumerate(zip(completions, rows, prompts)):
            try:
                results[i] = _as_scores(call_with_deadline(comp.scorer.score, self.timeout_s, completion, row, prompt))
            except RewardTimeout as e:
                timed_out[i] = True
                errors[i] = errors[i] or f"{where}: timeout: {e}"
            except Exception as e:  # a broken sample must never stop a run
                errors[i] = errors[i] or f"{where}: {type(e).__name__}: {e}"
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
        return scores, self.last_failures


def build_reward(reward_cfg: Mapping[str, Any]) -> RewardFunction:
    """A RewardFunction from a ``reward:`` config (``{name: ..., <options>, timeout_s}`` or
    ``{components: [...], timeout_s}``); every key is validated before anything is built."""
    return RewardFunction.from_config(reward_cfg)
