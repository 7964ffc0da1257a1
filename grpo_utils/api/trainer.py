"""``GRPOTrainer``: the recipes' training loop, driven from a script or a notebook.

The trainer turns its arguments into the recipes' config (the same composition and validation
as ``grpo-sync.py`` / ``grpo-async.py``, see :meth:`GRPOTrainer.command_line`) and runs
:class:`grpo_utils.train.loop.GRPOLoop`. What cannot travel as config travels as files in
``output_dir`` (the datasets; for Ray collectors and vLLM, the in-memory model and reward model)
or, in this process only, by reference (an in-memory model, a notebook's reward function).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from grpo_utils.api.config import GRPOConfig
from grpo_utils.api.data import as_rows, write_jsonl
from grpo_utils.errors import ConfigError

#: The recipes' config directory (the API composes the same files the recipes read).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
#: DeepSeekMath's KL coefficient, used when a reference model is given without ``kl_coef``.
DEFAULT_KL_COEF = 0.04
_PLAIN = re.compile(r"^[A-Za-z0-9_./\-]+$")


def _value(v: Any) -> str:
    """``v`` as a Hydra override value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    text = str(v)
    return text if _PLAIN.match(text) else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _is_classifier(obj: Any) -> bool:
    return type(obj).__name__.endswith("ForSequenceClassification") and hasattr(obj, "config")


def _is_causal_lm(obj: Any) -> bool:
    return hasattr(obj, "generate") and hasattr(obj, "config") and not _is_classifier(obj)


class GRPOTrainer:
    """Train ``model`` with GRPO-family RL on ``train_dataset``, scored by ``reward_model`` and/or
    ``reward``.

    * ``model``: a causal LM (in memory) or a path / hub name; ``tokenizer`` is required with an
      in-memory model unless its ``name_or_path`` holds one.
    * ``reward_model``: a Hugging Face sequence classifier (its logit 0 on prompt + completion).
    * ``reward``: a reward name from the registry (``"gsm8k"``), a function
      ``(prompts, completions, **columns) -> list[float]`` (each row field becomes a list), a
      ``reward:`` config mapping, or a list of those, each optionally ``(reward, weight)``.
      With both ``reward_model`` and ``reward`` the rewards add up (weight 1 each).
    * ``ref_model``: the KL reference (default: a frozen copy of the initial policy when
      ``kl_coef`` > 0).
    * ``train_dataset`` / ``eval_dataset``: prompt strings, dict rows (``prompt`` or ``question``,
      plus whatever the reward reads, e.g. ``answer``), a ``SimplePromptDataset`` or a
      ``datasets.Dataset``. With ``eval_dataset`` held-out greedy accuracy is measured before and
      after training.

    Everything is checked here, before anything is generated; :meth:`train` runs the loop.
    """

    def __init__(self, model: Any, tokenizer: Any = None, config: GRPOConfig | None = None,
                 train_dataset: Any = None, reward_model: Any = None, reward: Any = None, ref_model: Any = None,
                 eval_dataset: Any = None, reward_tokenizer: Any = None):
        if config is None:
            config = GRPOConfig()
        if not isinstance(config, GRPOConfig):
            raise ConfigError(f"config: expected a GRPOConfig, got a {type(config).__name__}")
        config.validate()
        self.config = config
        self.output_dir = Path(config.output_dir).expanduser().resolve()
        self.mode = config.mode
        self._uses_ray = config.mode == "async" or any(o.replace(" ", "") == "mode.ray=true" for o in config.overrides)
        self._vllm = any(o.replace(" ", "") == "inference_model.backend=vllm" for o in config.overrides)
        # Trainer ranks after rank 0 build the model from model.name (the weights then come from rank 0).
        self._ranks = any(o.replace(" ", "").startswith("train_model.num_devices=")
                          and o.split("=", 1)[1].strip() != "1" for o in config.overrides)
        self.model, self.tokenizer, model_name = self._policy(model, tokenizer)
        self._model_name = model_name
        if ref_model is not None and not _is_causal_lm(ref_model):
            raise ConfigError(f"ref_model: expected a causal LM (AutoModelForCausalLM), got {type(ref_model).__name__}")
        self.ref_model = ref_model
        kl_coef = config.kl_coef
        if ref_model is not None:
            if kl_coef == 0:
                raise ConfigError("ref_model= is only used with kl_coef > 0 (GRPOConfig.kl_coef=0)")
            kl_coef = DEFAULT_KL_COEF if kl_coef is None else kl_coef

        rows = as_rows(train_dataset, "train_dataset")
        data_dir = self.output_dir / "data"
        train_path = write_jsonl(rows, data_dir / "train.jsonl", "train_dataset")
        if eval_dataset is not None:
            eval_rows = as_rows(eval_dataset, "eval_dataset")
            test_path = write_jsonl(eval_rows, data_dir / "eval.jsonl", "eval_dataset")
        else:
            # The recipes' data sections need a held-out file: one row, loaded and never evaluated
            # (eval is off below), so nothing is read or counted twice.
            eval_rows, test_path = [], write_jsonl(rows[:1], data_dir / "eval.jsonl", "train_dataset")
        has_answer = all("answer" in r for r in rows + eval_rows)
        reward_cfg = self._reward_config(reward_model, reward, reward_tokenizer)

        steps = config.max_steps or math.ceil(config.num_epochs * math.ceil(len(rows) / config.batch_size))
        group = config.num_generations_per_prompt
        # The chat template when the policy's tokenizer has one (prompts as the model was tuned to see them).
        template = "chat" if getattr(self._tokenizer_of(model_name), "chat_template", None) else "plain"
        o: dict[str, Any] = {
            "model.name": model_name, "seed": config.seed, "device": config.device,
            "env.dataset": "jsonl", "env.train_path": str(train_path), "env.test_path": str(test_path),
            "env.prompt_field": "prompt", "env.answer_field": "answer" if has_answer else None,
            "env.template": template, "env.num_prompts": config.batch_size, "env.group_size": group,
            "generation.max_new_tokens": config.max_new_tokens, "generation.temperature": config.temperature,
            "generation.top_k": config.top_k, "generation.top_p": config.top_p,
            "optimizer.lr": config.learning_rate, "optimizer.clip_grad_norm": config.max_grad_norm,
            "optimizer.warmup_steps": config.warmup_steps, "train.max_steps": steps,
            "train.optim_batch_size": config.batch_size * group,
            "train.grad_accum_steps": config.gradient_accumulation_steps,
            "checkpoint.every_n_steps": config.save_steps, "checkpoint.keep_last": config.keep_last,
            "checkpoint.layout": "hf", "logger.log_every": config.logging_steps,
            "logger.project": config.wandb_project, "logger.run_name": config.wandb_run_name,
            "eval.before_after": eval_dataset is not None, "eval.every_n_steps": 0, "eval.heldout_size": 0,
        }
        if self.model is not None:
            from grpo_utils.models.loading import DTYPES

            dtype = next(self.model.parameters()).dtype
            o["model.dtype"] = next((name for name, d in DTYPES.items() if d == dtype), "float32")
        if kl_coef is not None:
            o["loss.kl_coef"] = kl_coef
        if config.clip_range is not None:
            o["loss.clip_eps_low"] = o["loss.clip_eps_high"] = config.clip_range
        if isinstance(reward_cfg, str):
            o["reward.name"] = reward_cfg
        groups = [f"loss={config.loss}", f"mode={config.mode}", f"logger={'wandb' if config.use_wandb else 'none'}"]
        #: The recipe's command-line overrides this trainer runs (see :meth:`command_line`).
        self.overrides = groups + [f"{k}={_value(v)}" for k, v in o.items()] + list(config.overrides)
        self._reward_cfg = None if isinstance(reward_cfg, str) else reward_cfg
        self.cfg = self._compose()
        self.state = None
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------- arguments
    def _policy(self, model: Any, tokenizer: Any) -> tuple[Any, Any, str]:
        """(in-memory model or None, tokenizer or None, ``model.name``)."""
        if isinstance(model, (str, Path)):
            if tokenizer is not None:
                raise ConfigError("tokenizer= is only taken with an in-memory model; a model path brings its own")
            return None, None, str(model)
        if not _is_causal_lm(model):
            raise ConfigError(f"model: expected a causal LM (AutoModelForCausalLM) or a path, "
                              f"got {type(model).__name__}")
        source = getattr(model, "name_or_path", "") or ""
        if tokenizer is None:
            if not Path(source).is_dir():
                raise ConfigError("tokenizer= is required with an in-memory model whose name_or_path holds none")
            from grpo_utils.models.loading import load_tokenizer

            tokenizer = load_tokenizer(source)
        if not callable(getattr(tokenizer, "apply_chat_template", None)) or not callable(tokenizer):
            raise ConfigError(f"tokenizer: expected a Hugging Face tokenizer, got {type(tokenizer).__name__}")
        if source and not Path(source).expanduser().is_dir():
            from grpo_utils.config.validate import check_model_name

            try:
                check_model_name(source)
            except ConfigError:  # a local path that is gone: the weights are the in-memory ones
                source = ""
        if self._uses_ray or self._vllm or self._ranks:  # another process or engine loads it: give it a directory
            source = str(self.output_dir / "initial_model")
            model.save_pretrained(source)
            tokenizer.save_pretrained(source)
        return model, tokenizer, source if source else "<in-memory>"

    def _tokenizer_of(self, model_name: str):
        if self.tokenizer is not None:
            return self.tokenizer
        from grpo_utils.models.loading import load_tokenizer, resolve_model_path

        try:
            return load_tokenizer(resolve_model_path(model_name))
        except Exception as e:  # a bad path or hub name: one line, before anything else loads
            raise ConfigError(f"model={model_name!r}: no tokenizer loads from it ({str(e).strip().splitlines()[0]})") \
                from None

    def _reward_config(self, reward_model: Any, reward: Any, reward_tokenizer: Any) -> str | dict:
        """A reward name, or the ``reward:`` mapping of every reward given."""
        items: list[tuple[Any, float]] = []
        if reward_model is not None:
            if not _is_classifier(reward_model):
                raise ConfigError(f"reward_model: expected a Hugging Face sequence-classification model "
                                  f"(AutoModelForSequenceClassification), got {type(reward_model).__name__}")
            items.append((reward_model, 1.0))
        if reward is not None:
            given = reward if isinstance(reward, list) else [reward]
            if not given:
                raise ConfigError("reward=[] is empty")
            for r in given:
                if isinstance(r, tuple):
                    if len(r) != 2 or not isinstance(r[1], (int, float)) or isinstance(r[1], bool):
                        raise ConfigError(f"reward: {r!r} is not a (reward, weight) pair")
                    items.append((r[0], float(r[1])))
                else:
                    items.append((r, 1.0))
        if not items:
            raise ConfigError("a reward is required: reward_model= (a sequence classifier) and/or reward= (a name, "
                              "a function (prompts, completions, **columns) -> list[float], or a list of them)")
        parts = [self._one_reward(r, i, reward_tokenizer) for i, (r, _) in enumerate(items)]
        labels = [p.pop("label") for p in parts]
        if len(parts) == 1 and items[0][1] == 1.0:
            return parts[0]["name"] if set(parts[0]) == {"name"} else parts[0]
        return {"components": [{**p, "weight": w, "label": label}
                               for p, (_, w), label in zip(parts, items, labels)]}

    def _one_reward(self, r: Any, index: int, reward_tokenizer: Any) -> dict[str, Any]:
        from grpo_utils.rewards.python_callable import importable_path, register_in_process

        key = f"trainer{id(self)}_{index}"
        if isinstance(r, str):
            return {"name": r, "label": r}
        if isinstance(r, Mapping):
            return {**dict(r), "label": r.get("label", r.get("name", f"reward{index}"))}
        if _is_classifier(r):
            # Without reward_tokenizer= the reward model reads text as the policy's tokenizer splits it.
            tok = reward_tokenizer if reward_tokenizer is not None else self._tokenizer_of(self._model_name)
            device = str(next(r.parameters()).device)
            if self._uses_ray:  # Ray collectors load it: save it once
                path = str(self.output_dir / f"reward_model_{index}")
                r.save_pretrained(path)
                tok.save_pretrained(path)
            else:
                path = register_in_process((r, tok), key)
            return {"name": "reward_model", "path": path, "device": device, "label": f"reward_model{index or ''}"}
        if callable(r):
            path = importable_path(r)
            if path is None:
                if self._uses_ray:
                    raise ConfigError(f"reward: {getattr(r, '__name__', r)!r} is defined in __main__ or is a lambda; "
                                      "Ray collectors import their reward, so define it in a module")
                path = register_in_process(r, key)
            return {"name": "callable", "_target_": path, "batched": True,
                    "label": getattr(r, "__name__", f"fn{index}").strip("<>") or f"fn{index}"}
        raise ConfigError(f"reward: expected a name, a function, a reward config mapping or a sequence classifier, "
                          f"got {type(r).__name__}")

    def _compose(self):
        """The recipe's config for :attr:`overrides` (and the reward mapping), checked as the
        recipe checks it; one :class:`ConfigError` line before any model is loaded or generates."""
        from omegaconf import OmegaConf, open_dict

        from grpo_utils.config.cli import compose_jobs
        from grpo_utils.train.run import check_run

        try:
            (cfg,) = compose_jobs(self.overrides, CONFIG_DIR, "grpo_quickstart", self.mode)
        except ConfigError as e:
            if self.config.clip_range is not None and "clip_eps" in str(e):
                raise ConfigError(f"GRPOConfig.clip_range: loss={self.config.loss} has no clipping") from None
            raise
        if self._reward_cfg is not None:  # the whole-reward settings (timeout_s, ...) stay as composed
            settings = {k: v for k, v in OmegaConf.to_container(cfg.reward).items() if k != "name"}
            with open_dict(cfg):
                cfg.reward = OmegaConf.create({**settings, **self._reward_cfg})
        check_run(cfg, self.mode)
        return cfg

    # ---------------------------------------------------------------------------------- running
    def command_line(self) -> str:
        """The recipe command that runs this training (rewards given in memory are not on it)."""
        recipe = "grpo-async.py" if self.mode == "async" else "grpo-sync.py"
        return " ".join([f"python sota-implementations/grpo/{recipe}", f"hydra.run.dir={self.output_dir}",
                         *self.overrides])

    def train(self, resume_from_checkpoint: bool | str | Path | None = None) -> dict[str, Any]:
        """Run to the configured number of steps; returns the run's summary (also written to
        ``output_dir/summary.json``) and keeps the state (``.state``) and every metrics line
        (``.history``). ``resume_from_checkpoint``: True (the newest in ``output_dir``) or a
        ``checkpoint-<N>`` directory."""
        from omegaconf import OmegaConf, open_dict

        from grpo_utils.train.loop import GRPOLoop
        from grpo_utils.train.metrics import read_metrics

        cfg = self.cfg.copy()
        with open_dict(cfg):
            resume = resume_from_checkpoint
            cfg.resume = False if resume is None else str(resume) if isinstance(resume, Path) else resume
        hydra_dir = self.output_dir / ".hydra"  # the resolved config, where the recipes' Hydra writes it
        hydra_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, hydra_dir / "config.yaml", resolve=True)
        loop = GRPOLoop(cfg, self.mode, self.output_dir, model=self.model, tokenizer=self.tokenizer,
                        ref_model=self.ref_model)
        loop.setup()
        try:
            loop.train()
        except BaseException:
            self.state = loop.state
            raise
        summary = loop.cleanup()
        self.model = loop.model  # trained in place; a path-loaded model is handed back too
        self.tokenizer = loop.tokenizer
        self.state = loop.state
        self.history = read_metrics(self.output_dir)
        return summary
