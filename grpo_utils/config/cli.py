"""The command line, checked before Hydra composes it: a key that does not exist here (a typo, a
key this project names differently, or TorchRL's name for one), a value of the wrong type or an
override Hydra's grammar cannot parse stops the run with one line naming the key to use, instead of
Hydra's ``Key '...' is not in struct`` or its multi-line parse error.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import BooleanNode

from grpo_utils.errors import ConfigError

GROUPS = ("mode", "loss", "logger", "shaping", "rollout")

# Keys a user may type that this project names differently: TorchRL's GRPO scripts' keys, and
# this project's keys from before they moved. Value: the key to use, and a note when the meaning
# differs or the feature is not here.
RENAMED: dict[str, tuple[str, str]] = {
    # TorchRL sota-implementations/grpo
    "train.kl_to_ref_coeff": ("loss.kl_coef", "> 0 loads a frozen reference model"),
    "train.use_kl_to_ref": ("loss.kl_coef", "a reference is used exactly when loss.kl_coef > 0"),
    "train.kl_coef_in_loss": ("loss.kl_in", "loss | reward"),
    "train.kl_to_inference_coeff": ("loss.behaviour_kl_coef", "KL to the policy that sampled the batch"),
    "train.entropy_coeff": ("loss.entropy_coef", ""),
    "train.sync_iter": ("mode.sync_iter", "with mode.ray=true"),
    "train.gradient_accumulation_steps": ("train.grad_accum_steps", ""),
    "train.checkpoint_frequency": ("checkpoint.every_n_steps", ""),
    "train.total_dialog_turns": ("train.max_steps", "counted in optimizer steps, each of train.optim_batch_size "
                                 "sequences"),
    "train.dialog_turns_per_batch": ("env.num_prompts", "a batch is env.num_prompts x env.group_size sequences"),
    "train.exp_name": ("logger.run_name", ""),
    "train.logging_frequency": ("eval.every_n_steps", "metrics are logged every step; this sets evaluation"),
    "train.empty_replay_buffer": ("train.epochs", "each batch is trained on train.epochs times, then dropped"),
    "env.repeats": ("env.group_size", "completions per prompt"),
    "env.num_envs": ("env.num_prompts", "prompts per batch"),
    "env.reasoning": ("env.template", "env.template=r1_zero for the <think>/<answer> format"),
    "env.max_steps": ("", "episodes are single-turn"),
    "model.compile": ("", "torch.compile is not available"),
    "train_model.quantization": ("", "quantized training is not available"),
    "train_model.torch_dtype": ("model.dtype", ""),
    "train_model.attn_implementation": ("", "the model's default attention is used"),
    "ref_model.lora": ("", "the reference is a frozen copy of the initial policy"),
    "ref_model.quantization": ("", "the reference is a frozen copy of the initial policy"),
    "ref_model.torch_dtype": ("model.dtype", ""),
    "ref_model.gradient_checkpointing": ("", "the reference never trains"),
    "ref_model.attn_implementation": ("", "the model's default attention is used"),
    "inference_model.temperature": ("generation.temperature", ""),
    "inference_model.top_p": ("generation.top_p", ""),
    "inference_model.max_tokens": ("generation.max_new_tokens", ""),
    "inference_model.torch_dtype": ("inference_model.dtype", ""),
    "inference_model.include_stop_str_in_output": ("", "completions always end at the stop token"),
    "ray": ("mode", "Ray settings are mode.* (mode.cluster_cpus, mode.collector_cpus, ...)"),
    "logging.checkpoint_frequency": ("checkpoint.every_n_steps", ""),
    "logging.experiment_name": ("logger.run_name", ""),
    "logging.checkpoint_dir": ("hydra.run.dir", "checkpoints go to <run dir>/checkpoints/"),
    # this project, before the keys moved
    "train.lr": ("optimizer.lr", ""),
    "train.weight_decay": ("optimizer.weight_decay", ""),
    "train.betas": ("optimizer.betas", ""),
    "train.adam_eps": ("optimizer.eps", ""),
    "train.max_grad_norm": ("optimizer.clip_grad_norm", ""),
    "train.warmup_steps": ("optimizer.warmup_steps", ""),
    "train.min_lr_ratio": ("optimizer.min_lr_ratio", ""),
    "model.gradient_checkpointing": ("train_model.gradient_checkpointing", ""),
    "rollout.engine": ("rollout", "rollout=direct | rollout=collector; your own engine: rollout._target_"),
    "mode.collector_gpus": ("inference_model.num_devices", "GPUs per collector actor"),
    "wandb.project": ("logger.project", "with logger=wandb"),
    "wandb.run_name": ("logger.run_name", "with logger=wandb"),
    "loss.advantage_estimator": ("advantage.estimator", ""),
    "loss.advantage_scale": ("advantage.scale", ""),
    "loss.dynamic_sampling": ("shaping.dynamic_sampling", "or shaping=dapo"),
    "loss.max_resample_rounds": ("shaping.max_resample_rounds", ""),
    "loss.overlong_mask": ("shaping.overlong_mask", ""),
    "loss.overlong_penalty": ("shaping.overlong_penalty", ""),
    "loss.overlong_cache_len": ("shaping.overlong_cache_len", ""),
}


def renamed(key: str) -> str | None:
    """The one-line refusal for a key this project names differently (or a prefix of it), or None."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in RENAMED:
            target, note = RENAMED[prefix]
            use = f"; use {target}" if target else ""
            return f"{key} is not a key of this config{use}" + (f" ({note})" if note else "")
    return None


def split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--config-name`` and the overrides of a Hydra command line (flags dropped)."""
    config_name, overrides, skip = None, [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--config-name", "-cn"):
            config_name, skip = (argv[i + 1] if i + 1 < len(argv) else None), True
        elif arg.startswith("--config-name="):
            config_name = arg.split("=", 1)[1]
        elif arg in ("--config-path", "-cp", "--config-dir", "-cd", "--cfg", "-c", "--package", "-p",
                     "--experimental-rerun"):
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return config_name, overrides


def check_command_line(argv: list[str], config_dir: str | Path, default_config: str) -> None:
    """Raise :class:`ConfigError` for the first override that names no key of the composed config
    (with the key to use instead, or the keys allowed there) or gives a value of the wrong type."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    import grpo_utils.config  # noqa: F401  (registers the schema)

    config_name, args = split_argv(argv)
    check_config_name(argv, config_dir, config_name)
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(args)
    except Exception:
        _syntax_error(parser, args)
        return
    values, groups, adds, deletes = [], [], [], []
    for override in parsed:
        key = override.key_or_group
        if key in ("hydra.run.dir", "hydra.sweep.dir") and not override.is_sweep_override():
            check_run_dir(key, str(override.value()))
        if key.startswith("hydra") or override.is_force_add():
            continue
        if override.is_delete():
            deletes.append(key)
            continue
        if override.is_add():  # +key=value: only into a free-form section (reward options), not the schema's
            adds.append(key)
            continue
        message = renamed(key)
        if message:
            raise ConfigError(message)
        choices = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        (groups if key in GROUPS else values).append((key, choices))
    config_dir = Path(config_dir)
    for group, choices in groups:
        options = sorted(p.stem for p in (config_dir / group).glob("*.yaml") if not p.stem.startswith("_"))
        for choice in choices:
            if choice not in options:
                raise ConfigError(f"{group}={choice} is unknown; expected one of {', '.join(options)}")
    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
        base = compose(config_name or default_config, overrides=[f"{g}={c[0]}" for g, c in groups])
    for key in deletes:
        _check_key(base, key)
        parent = OmegaConf.select(base, key.rpartition(".")[0]) if "." in key else base
        if key not in GROUPS and isinstance(parent, DictConfig) and OmegaConf.get_type(parent) not in (dict, None):
            raise ConfigError(f"~{key}: a key of the schema cannot be deleted (every key has a default and is read); "
                              f"set it instead ({key}=<value>, or null where allowed)")
    for key in adds:
        parent = OmegaConf.select(base, key.rpartition(".")[0]) if "." in key else base
        if isinstance(parent, DictConfig) and OmegaConf.get_type(parent) not in (dict, None) and key not in parent:
            _check_key(base, key)
    for key, choices in values:
        _check_key(base, key)
        for choice in choices:
            _check_value(base, key, choice)


def check_config_name(argv: list[str], config_dir: str | Path, config_name: str | None) -> None:
    """``--config-name`` names a file of ``config_dir`` (or of a ``--config-dir`` given too), and
    ``--config-dir`` / ``--config-path`` a directory: one line instead of Hydra's traceback."""
    dirs = [Path(config_dir)]
    for i, arg in enumerate(argv):
        flag, _, value = arg.partition("=")
        if flag in ("--config-dir", "-cd", "--config-path", "-cp"):
            value = value if _ else (argv[i + 1] if i + 1 < len(argv) else "")
            if not value:
                raise ConfigError(f"{flag} needs a directory")
            path = Path(value).expanduser()
            if not path.is_dir():
                raise ConfigError(f"{flag}={value}: no such directory; expected the directory of your config YAML "
                                  "files")
            dirs.append(path)
        # (the launcher appends mode=<mode>: a bare --config-name at the end would take it as the name)
        if arg in ("--config-name", "-cn") and (i + 1 >= len(argv) or argv[i + 1].startswith("-")
                                                 or "=" in argv[i + 1]):
            raise ConfigError(f"{arg} needs a config name, e.g. {arg} grpo_gsm8k")
    if config_name is None:
        return
    name = config_name[:-5] if config_name.endswith(".yaml") else config_name
    if not any((d / f"{name}.yaml").is_file() for d in dirs):
        known = sorted({p.stem for d in dirs for p in d.glob("*.yaml")})
        raise ConfigError(f"--config-name {config_name}: no {name}.yaml in {', '.join(map(str, dirs))}; expected one "
                          f"of {', '.join(known)}")


def check_run_dir(key: str, value: str) -> None:
    """``hydra.run.dir`` can be created: no part of it is a file, and its first existing parent
    is writable (Hydra would fail with a traceback when it makes the directory)."""
    path = Path(value).expanduser()
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{key}={value}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{key}={value}: cannot create it in {parent} (not writable)")
            return


def _syntax_error(parser, args: list[str]) -> None:
    """Raise :class:`ConfigError` naming the first override Hydra's grammar refuses (instead of
    Hydra's multi-line message)."""
    for arg in args:
        try:
            parser.parse_overrides([arg])
        except Exception as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if detail.endswith(arg):  # "LexerNoViableAltException: <the override>"
                detail = detail[: -len(arg)].rstrip(": ")
            raise ConfigError(f"cannot parse the override {arg} ({detail}); quote a value with special "
                              "characters, e.g. key='~/path'") from None


def _check_key(cfg: DictConfig, key: str) -> None:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if isinstance(node, DictConfig) and leaf in node:
        return
    if not isinstance(node, DictConfig):  # the parent itself is missing: report the first missing part
        head = key.split(".")
        for i in range(1, len(head)):
            if OmegaConf.select(cfg, ".".join(head[:i])) is None:
                return _check_key(cfg, ".".join(head[:i]))
        raise ConfigError(f"{key}: {parent} is not a section")
    allowed = sorted(str(k) for k in node.keys())
    close = difflib.get_close_matches(leaf, allowed, n=1)
    hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
    where = f"in '{parent}'" if parent else "at the top level"
    if parent == "reward":
        hint += "; a reward's options are added with +reward.<option>=..."
    if parent == "mode":
        other = "async" if cfg.mode.name == "sync" else "sync"
        from grpo_utils.distributed.resources import MODE_DEFAULTS

        if leaf in MODE_DEFAULTS[other]:
            raise ConfigError(f"mode.{leaf} is not a mode={cfg.mode.name} setting; it is a mode={other} setting")
    raise ConfigError(f"unknown config key '{key}'{hint}; allowed {where}: {', '.join(allowed)}")


def _check_value(cfg: DictConfig, key: str, value) -> None:
    """The composed config keeps the schema's types: a value that does not fit fails here."""
    trial = cfg.copy()
    parent, _, leaf = key.rpartition(".")
    container = OmegaConf.select(cfg, parent) if parent else cfg
    node = container._get_node(leaf) if isinstance(container, DictConfig) and leaf in container else None
    if (isinstance(node, BooleanNode) and isinstance(value, (int, float)) and not isinstance(value, bool)
            and value not in (0, 1)):  # OmegaConf would read any number as a bool (2 -> true)
        raise ConfigError(f"{key}={value!r}: expected true or false")
    try:
        OmegaConf.update(trial, key, value, merge=True)
    except OmegaConfBaseException as e:
        detail = str(e).strip().splitlines()[0]
        raise ConfigError(f"{key}={value!r}: {detail}") from None


def compose_jobs(argv: list[str], config_dir: str | Path, default_config: str,
                 mode: str | None) -> list[DictConfig]:
    """The configs a command line asks for (one per job of a ``-m`` sweep), composed as the
    recipe's Hydra would, after :func:`check_command_line`; ``mode=<mode>`` unless it picks one."""
    import itertools

    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    check_command_line(argv, config_dir, default_config)
    config_name, args = split_argv(argv)
    if mode and not any(a.split("=", 1)[0] == "mode" for a in args):
        args = [*args, f"mode={mode}"]
    parsed = OverridesParser.create().parse_overrides(args)
    axes = [[o.get_key_element() + "=" + str(v) for v in (o.sweep_string_iterator() if o.is_sweep_override()
                                                           else [o.get_value_element_as_str()])]
            for o in parsed if not o.key_or_group.startswith("hydra")]
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return [compose(config_name or default_config, overrides=list(job)) for job in itertools.product(*axes)]
