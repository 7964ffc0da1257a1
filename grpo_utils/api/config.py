"""``GRPOConfig``: the Python API's flat settings, each mapped onto one key of the recipes' config.

Every field is checked here for its type and range (one line naming the field); what the fields
mean together (e.g. ``gradient_accumulation_steps`` dividing the batch) is then checked by the
recipes' own validation, on the composed config. Anything the recipes offer that has no field
here is reachable through ``overrides`` (Hydra syntax, as on the command line).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from grpo_utils.errors import ConfigError


def _doc(default: Any, doc: str, recipe_key: str | None = None) -> Any:
    meta = {"doc": doc, "key": recipe_key}
    if isinstance(default, list):
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class GRPOConfig:
    """Settings of :class:`grpo_utils.api.GRPOTrainer` (``describe()`` lists them with their docs)."""

    num_generations_per_prompt: int = _doc(8, "completions sampled per prompt (the group)", "env.group_size")
    max_new_tokens: int = _doc(128, "completion budget in tokens", "generation.max_new_tokens")
    temperature: float = _doc(1.0, "sampling temperature (the loss uses the same one)", "generation.temperature")
    top_k: int = _doc(0, "top-k sampling; 0 = unrestricted", "generation.top_k")
    top_p: float = _doc(1.0, "nucleus sampling threshold", "generation.top_p")
    learning_rate: float = _doc(1e-6, "peak learning rate (AdamW, warmup then cosine decay)", "optimizer.lr")
    batch_size: int = _doc(4, "prompts per training step", "env.num_prompts")
    num_epochs: float = _doc(1.0, "passes over train_dataset (sets the number of steps; max_steps wins)")
    gradient_accumulation_steps: int = _doc(1, "micro-batches per optimizer step (exact accumulation)",
                                            "train.grad_accum_steps")
    max_grad_norm: float = _doc(1.0, "gradient clipping by global norm", "optimizer.clip_grad_norm")
    warmup_steps: int = _doc(0, "linear warmup steps", "optimizer.warmup_steps")
    kl_coef: float | None = _doc(None, "KL-to-reference coefficient; None: 0.04 (DeepSeekMath's) when a ref_model "
                                 "is given, else the loss preset's (0)", "loss.kl_coef")
    clip_range: float | None = _doc(None, "PPO clip epsilon (both sides); None: the loss preset's",
                                    "loss.clip_eps_low/high")
    gamma: float = _doc(1.0, "discount: a completion is one step with one reward, so only 1.0 is meaningful")
    logging_steps: int = _doc(1, "write a metrics line every N steps (and the last)", "logger.log_every")
    save_steps: int = _doc(0, "save checkpoint-<N>/ every N steps; 0: only the final one",
                           "checkpoint.every_n_steps")
    output_dir: str = _doc("./grpo_output", "run directory: metrics.jsonl, checkpoint-<N>/, final_model/")
    use_wandb: bool = _doc(False, "also log to Weights & Biases (pip install wandb)", "logger=wandb")
    wandb_project: str = _doc("grpo", "wandb project", "logger.project")
    wandb_run_name: str | None = _doc(None, "wandb run name; None lets wandb choose", "logger.run_name")
    device: str = _doc("auto", "auto (cuda when available) | cpu | cuda | cuda:N", "device")
    seed: int = _doc(0, "seeds sampling, data order and mini-batches", "seed")
    loss: str = _doc("grpo", "loss preset: grpo | dr_grpo | dapo | gspo | cispo | reinforce | rloo | ...", "loss")
    mode: str = _doc("sync", "sync | async (collectors on Ray generate while the trainer trains)", "mode")
    max_steps: int | None = _doc(None, "optimizer steps; None: from num_epochs", "train.max_steps")
    keep_last: int | None = _doc(None, "keep only the newest N checkpoints; None keeps all", "checkpoint.keep_last")
    overrides: list[str] = _doc([], "any other recipe key, Hydra style, e.g. ['inference_model.backend=vllm']")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """One :class:`ConfigError` line naming the first field of the wrong type or range."""
        for f in fields(self):
            value = getattr(self, f.name)
            expected = _TYPES[f.name]
            if not _is(value, expected):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in expected)
                raise ConfigError(f"GRPOConfig.{f.name}={value!r}: expected {names}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"GRPOConfig.{f.name}={value!r} must be a finite number")
        for name, ok, what in [
            ("num_generations_per_prompt", self.num_generations_per_prompt >= 2, ">= 2 (a group needs two samples)"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("temperature", self.temperature > 0, "> 0"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("learning_rate", 0 < self.learning_rate <= 1, "in (0, 1]"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("num_epochs", self.num_epochs > 0 and math.isfinite(self.num_epochs), "> 0"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, ">= 1"),
            ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("kl_coef", self.kl_coef is None or self.kl_coef >= 0, ">= 0"),
            ("clip_range", self.clip_range is None or 0 < self.clip_range < 1, "in (0, 1)"),
            ("gamma", self.gamma == 1.0, "1.0 (a completion is one step with one reward: there is nothing to "
                                         "discount)"),
            ("logging_steps", self.logging_steps >= 1, ">= 1"),
            ("save_steps", self.save_steps >= 0, ">= 0"),
            ("mode", self.mode in ("sync", "async"), "sync or async"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, ">= 1"),
            ("keep_last", self.keep_last is None or self.keep_last >= 1, ">= 1"),
            ("output_dir", bool(self.output_dir.strip()), "a directory path"),
        ]:
            if not ok:
                raise ConfigError(f"GRPOConfig.{name}={getattr(self, name)!r} must be {what}")
        for item in self.overrides:
            if "=" not in item:
                raise ConfigError(f"GRPOConfig.overrides: {item!r} is not key=value")

    @classmethod
    def describe(cls) -> str:
        """Every field: type, default, the recipe key it sets, and its doc."""
        lines = []
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()
            key = f" -> {f.metadata['key']}" if f.metadata.get("key") else ""
            lines.append(f"{f.name} = {default!r}{key}  # {f.metadata['doc']}")
        return "\n".join(lines)


def _checked_init(init):
    """``GRPOConfig(...)`` with a name that is not a field is a :class:`ConfigError` naming it (and
    the closest field), not the dataclass's bare ``TypeError``."""
    import difflib
    import functools

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for name in kwargs:
            if name not in _TYPES:
                close = difflib.get_close_matches(name, list(_TYPES), n=1)
                hint = f" (did you mean {close[0]}?)" if close else "; GRPOConfig.describe() lists the fields"
                raise ConfigError(f"GRPOConfig got an unknown field {name!r}{hint}; other recipe keys go in "
                                  "overrides=['key=value']")
        if len(args) > len(_TYPES):
            raise ConfigError(f"GRPOConfig takes at most {len(_TYPES)} positional values; name them")
        init(self, *args, **kwargs)

    return __init__


GRPOConfig.__init__ = _checked_init(GRPOConfig.__init__)

# The types each field accepts (bool is not an int here; an int is a float).
_TYPES: dict[str, tuple[type, ...]] = {
    "num_generations_per_prompt": (int,), "max_new_tokens": (int,), "temperature": (float,), "top_k": (int,),
    "top_p": (float,), "learning_rate": (float,), "batch_size": (int,), "num_epochs": (float,),
    "gradient_accumulation_steps": (int,), "max_grad_norm": (float,), "warmup_steps": (int,),
    "kl_coef": (float, type(None)), "clip_range": (float, type(None)), "gamma": (float,), "logging_steps": (int,),
    "save_steps": (int,), "output_dir": (str,), "use_wandb": (bool,), "wandb_project": (str,),
    "wandb_run_name": (str, type(None)), "device": (str,), "seed": (int,), "loss": (str,), "mode": (str,),
    "max_steps": (int, type(None)), "keep_last": (int, type(None)), "overrides": (list,),
}


def _is(value: Any, expected: tuple[type, ...]) -> bool:
    for kind in expected:
        if kind is type(None) and value is None:
            return True
        if kind is bool and isinstance(value, bool):
            return True
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if kind in (str, list) and isinstance(value, kind):
            return True
    return False
