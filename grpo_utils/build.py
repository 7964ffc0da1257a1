"""The one place that builds the run's parts from the config: the trainer process and the Ray
collector actors both call these, so a part is configured one way wherever it runs.

Swappable parts name their class with ``_target_`` in YAML and are built with
``hydra.utils.instantiate``; a bad key or value is a one-line :class:`~grpo_utils.errors.ConfigError`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from grpo_utils.errors import ConfigError, DataError


def loss(loss_cfg: DictConfig) -> torch.nn.Module:
    # Constructor arguments are checked by the class itself (a loss is also used from Python).
    """``loss._target_`` built with the other keys of ``loss``."""
    import hydra

    from grpo_utils.algo.losses import build_loss

    kwargs = OmegaConf.to_container(loss_cfg, resolve=True)
    target = kwargs.pop("_target_", None)
    try:
        cls = hydra.utils.get_class(target) if target else None
    except Exception:
        raise ConfigError(f"loss._target_={target!r} cannot be imported") from None
    try:
        return cls(**kwargs) if cls else build_loss(kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"loss: {e}") from None


def reward(cfg: DictConfig):
    """The reward of ``reward.*`` (``name: null``: the dataset's own reward)."""
    from grpo_utils.config.validate import reward_config
    from grpo_utils.rewards import build_reward

    try:
        return build_reward(reward_config(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def rows(env_cfg: DictConfig, heldout_size: int):
    """Training and held-out rows (``.skipped`` counts malformed rows skipped with skip_bad_rows)."""
    from grpo_utils.data.datasets import Rows, check_prompt_fields, load_split

    train, test = load_split(env_cfg, "train"), load_split(env_cfg, "test")
    for split, split_rows in (("train", train), ("test", test)):
        check_prompt_fields(env_cfg.get("prompt_format") or "{question}", split_rows, split)
    if heldout_size:
        lines = None if test.lines is None else test.lines[:heldout_size]
        test = Rows(test[:heldout_size], skipped=test.skipped, source=test.source, lines=lines)
    if train.skipped or test.skipped:
        print(f"skipped {train.skipped + test.skipped} malformed rows (env.skip_bad_rows=true)")
    return train, test


def renderer(env_cfg: DictConfig, tokenizer, sample_row: dict):
    """The prompt renderer, tried on one row now so a template that does not fit fails before training."""
    from grpo_utils.data.prompts import renderer_from_config

    try:
        render = renderer_from_config(env_cfg, tokenizer)
        render(sample_row)
    except DataError as e:
        raise ConfigError(str(e)) from None
    return render


def prompts_that_fit(cfg: DictConfig, model, tokenizer, render, report: bool = True, **splits) -> tuple:
    """Each split's rows (``train=rows, test=rows``; returned in that order) whose rendered prompt
    leaves ``generation.max_new_tokens`` of the model's context (``max_position_embeddings``, or
    the tokenizer's ``model_max_length``; vLLM's ``inference_model.max_model_len`` when smaller).
    A longer prompt is a :class:`DataError` naming ``file:line``, or with ``env.skip_bad_rows=true``
    is skipped and counted in the split's ``.skipped``."""
    from grpo_utils.data.prompts import context_length, fit_to_context

    context = context_length(getattr(model, "config", None), tokenizer)
    engine_len = cfg.inference_model.max_model_len if cfg.inference_model.backend == "vllm" else None
    if engine_len is not None and (context is None or engine_len < context):
        context, whose = engine_len, f"inference_model.max_model_len={engine_len}"
    else:
        whose = f"the model's context of {context} tokens"
    if context is None:
        return tuple(splits.values())
    new_tokens = cfg.generation.max_new_tokens
    budget = context - new_tokens
    if budget < 1:
        raise ConfigError(f"generation.max_new_tokens={new_tokens} leaves no room for a prompt in {whose}")
    why = f"{whose} leaves {budget} for a prompt after generation.max_new_tokens={new_tokens}"
    fitted = []
    for split, rows in splits.items():
        fit = fit_to_context(rows, render, tokenizer, budget, bool(cfg.env.skip_bad_rows),
                             f"env.dataset={cfg.env.dataset} ({split} split)", why)
        if report and fit.skipped > rows.skipped:
            print(f"skipped {fit.skipped - rows.skipped} {split} rows whose prompt is too long: {why} "
                  "(env.skip_bad_rows=true)")
        fitted.append(fit)
    return tuple(fitted)


def policy(cfg: DictConfig, device: torch.device, for_training: bool = True):
    """The policy and its tokenizer (``model.*``; ``train_model.*`` when it is the trained copy:
    then with LoRA adapters when ``train_model.lora.enabled``; a copy that only generates, such as
    a Ray collector's, stays a plain model that receives merged weights)."""
    from grpo_utils.models.loading import load_policy

    checkpointing = for_training and cfg.train_model.gradient_checkpointing
    model, tokenizer, _ = load_policy(cfg.model, device, gradient_checkpointing=checkpointing)
    return (_with_lora(cfg, model) if for_training else model), tokenizer


def given_policy(cfg: DictConfig, model: torch.nn.Module, tokenizer, device: torch.device):
    """A policy handed over in memory, prepared as :func:`policy` prepares a loaded one."""
    from grpo_utils.models.loading import prepare_policy

    return _with_lora(cfg, prepare_policy(model, tokenizer, device, cfg.train_model.gradient_checkpointing)), tokenizer


def _with_lora(cfg: DictConfig, model: torch.nn.Module) -> torch.nn.Module:
    if not cfg.train_model.lora.enabled:
        return model
    from grpo_utils.models.lora import apply_lora

    return apply_lora(model, cfg.train_model.lora)


def check_given_reference(cfg: DictConfig, given: torch.nn.Module | None) -> None:
    """A reference handed over in memory (the Python API) and ``ref_model.path`` exclude each other;
    called before any model loads."""
    if given is not None and OmegaConf.select(cfg, "ref_model.path") is not None:
        raise ConfigError(f"ref_model.path={cfg.ref_model.path} and an in-memory ref_model= are both given; "
                          "pass one")


def reference(cfg: DictConfig, policy: torch.nn.Module, trainer_device: torch.device,
              given: torch.nn.Module | None = None) -> torch.nn.Module:
    """The frozen reference, on the device of ``ref_model.device``/``num_devices``
    (:func:`~grpo_utils.distributed.resources.reference_device`): a copy of ``given`` (an in-memory
    reference) or of the initial ``policy`` (a LoRA policy with its adapters off: no copy), or
    ``ref_model.path`` loaded in ``model.dtype``, which must share the policy's vocabulary (else a
    one-line :class:`ConfigError`)."""
    from grpo_utils.distributed.resources import reference_device
    from grpo_utils.models.loading import DTYPES, load_reference, make_reference, resolve_model_path
    from grpo_utils.models.lora import AdaptersDisabled, is_lora

    check_given_reference(cfg, given)
    try:
        device = reference_device(cfg, trainer_device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    path = cfg.ref_model.path
    if path is None and given is None and is_lora(policy):
        # The base under the adapters is the initial policy: switch them off, no second copy.
        if device != trainer_device:
            raise ConfigError("ref_model.device/num_devices place a reference of its own, but with "
                              "train_model.lora.enabled=true the reference is the policy with its adapters off; "
                              "set ref_model.path to load a separate reference there")
        return AdaptersDisabled(policy)
    if path is None:
        # Copied where the policy is, then moved: the copy is briefly doubled there, before any
        # optimizer state exists (so below the training peak).
        return make_reference(policy if given is None else given).to(device)
    ref = load_reference(resolve_model_path(path), DTYPES[cfg.model.dtype])
    ours, theirs = getattr(policy.config, "vocab_size", None), getattr(ref.config, "vocab_size", None)
    if ours != theirs:
        raise ConfigError(f"ref_model.path={path} has vocab_size={theirs} but the policy (model.name="
                          f"{cfg.model.name}) has vocab_size={ours}; the reference must share the policy's vocabulary")
    return ref.to(device)


def trainer(cfg: DictConfig, model: torch.nn.Module, loss_fn: torch.nn.Module, ref_model=None, group=None):
    """AdamW with warmup + cosine (``optimizer.*``) over ``train.*``'s mini-batches; sharded over
    the trainer ranks of ``group`` (a :class:`~grpo_utils.distributed.ranks.RankGroup`) if given.
    Collective then: every rank calls it."""
    from grpo_utils.train.trainer import PolicyTrainer

    o, t = cfg.optimizer, cfg.train
    settings = OmegaConf.create({
        "lr": o.lr, "weight_decay": o.weight_decay, "betas": list(o.betas), "adam_eps": o.eps,
        "max_grad_norm": o.clip_grad_norm, "warmup_steps": o.warmup_steps, "min_lr_ratio": o.min_lr_ratio,
        "max_steps": t.max_steps, "epochs": t.epochs, "optim_batch_size": t.optim_batch_size,
        "grad_accum_steps": t.grad_accum_steps, "mixed_precision": t.mixed_precision,
        "fsdp_param_dtype": cfg.train_model.fsdp_param_dtype})
    if group is not None:
        from grpo_utils.train.sharded import ShardedTrainer

        return ShardedTrainer(model, loss_fn, settings, cfg.generation.temperature, group, ref_model)
    return PolicyTrainer(model, loss_fn, settings, cfg.generation.temperature, ref_model)


def shaping(cfg: DictConfig):
    """DAPO's rollout shaping (``shaping.*``), applied by the rollout before advantages."""
    from grpo_utils.algo.shaping import RolloutShaping

    try:
        return RolloutShaping(**OmegaConf.to_container(cfg.shaping, resolve=True))
    except ValueError as e:
        raise ConfigError(f"shaping.{e}") from None


def advantage_stage(cfg: DictConfig, loss_fn):
    """``advantage.*`` plus the loss's KL-in-reward penalty and ``shaping.overlong_mask``."""
    from grpo_utils.algo.advantages import AdvantageStage

    adv = cfg.advantage
    try:
        return AdvantageStage(adv.estimator, adv.scale, adv.eps, cfg.env.group_size,
                              kl_penalty=loss_fn.reward_penalty if loss_fn.kl_in_reward else None,
                              overlong_mask=cfg.shaping.overlong_mask)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def generator(cfg: DictConfig, model, tokenizer, return_log_probs: bool, seed: int, colocated: bool):
    """The inference engine of ``inference_model.backend``: ``transformers`` generates with ``model``
    itself; ``vllm`` starts an in-process engine from ``model.name``'s directory on ``model``'s
    device (``colocated``: sharing the trainer's), seeded with ``seed``."""
    from grpo_utils.inference.transformers import TransformersGenerator, generation_kwargs
    from grpo_utils.rollout.group import stop_token_ids

    if cfg.inference_model.backend != "vllm":
        return TransformersGenerator(model, tokenizer, generation_kwargs(cfg.generation), return_log_probs)
    from grpo_utils.inference.vllm_engine import VLLMGenerator, VLLMSettings
    from grpo_utils.models.loading import resolve_model_path

    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    return VLLMGenerator(resolve_model_path(cfg.model.name), VLLMSettings.from_config(cfg, device, colocated),
                         cfg.generation, stops, pad_id, seed, device)


def rollout(cfg: DictConfig, model, tokenizer, render, reward_fn, stream, loss_fn, seed: int | None = None,
            colocated: bool = True):
    """The engine ``rollout._target_`` names (``rollout=direct``: one batched call of the
    ``inference_model.backend`` generator; ``collector``: TorchRL's LLMCollector over a
    ChatEnv + DataLoadingPrimer; both yield the same batches). The Ray actors build theirs here too
    (``colocated=False``, their own ``seed``)."""
    from grpo_utils.config.validate import rollout_class
    from grpo_utils.inference.transformers import generation_kwargs

    engine = rollout_class(cfg)
    # vLLM's log-probs are always kept: the loss logs the sampler/trainer mismatch (mismatch_kl).
    keep = engine.samples_log_probs and (loss_fn.needs_rollout_log_probs or cfg.inference_model.backend == "vllm")
    extra = {"keep_rollout_log_probs": True} if keep else {}
    if engine.supports_vllm:
        extra["generator"] = generator(cfg, model, tokenizer, keep, cfg.seed if seed is None else seed, colocated)
    return engine(model, tokenizer, render, reward_fn, generation_kwargs(cfg.generation), cfg.env.group_size, stream,
                  shaping=shaping(cfg), **extra)


def held_out_evaluator(cfg: DictConfig, model, tokenizer, render, reward_fn, heldout_rows, engine=None):
    """A no-argument callable: greedy accuracy on the held-out rows, plus pass@k / maj@k / mean@k
    when ``eval.k`` > 0. ``engine``, called at each evaluation, gives the run's own inference engine
    holding ``model``'s weights (vLLM in local sync), or None to generate with ``model``."""
    from grpo_utils.eval.evaluate import evaluate

    gen = cfg.generation

    def held_out_eval() -> dict[str, float]:
        return evaluate(model, tokenizer, render, reward_fn, heldout_rows, k=cfg.eval.k,
                        temperature=cfg.eval.temperature, top_p=gen.top_p, top_k=gen.top_k,
                        max_new_tokens=gen.max_new_tokens, batch_size=cfg.eval.batch_size, seed=cfg.seed,
                        engine=engine() if engine is not None else None)

    return held_out_eval


def logger(cfg: DictConfig, run_dir: Path, start_step: int):
    """``logger._target_`` (default :class:`~grpo_utils.train.metrics.MetricsLogger`) for this run."""
    from hydra.utils import get_class

    kwargs = OmegaConf.to_container(cfg.logger, resolve=True)
    target = kwargs.pop("_target_")
    # Not hydra.utils.instantiate: the logger's own ``config`` argument (the run's config, sent to
    # wandb) clashes with instantiate's first parameter.
    return get_class(target)(run_dir, config=OmegaConf.to_container(cfg, resolve=True),
                             total_steps=cfg.train.max_steps, start_step=start_step, **kwargs)

