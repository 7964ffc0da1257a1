"""``grpo-eval.py``'s body: evaluate a model on a dataset split and write the JSON report.
Raises :class:`~grpo_utils.errors.GRPOError` subclasses; the recipe turns them into one line."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import tensordict
import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from grpo_utils.config.schema import EvalRunConfig
from grpo_utils.config.validate import check_schema_values, resolve_all, resolve_device, reward_config, seed_everything
from grpo_utils.data.datasets import check_prompt_fields, load_split
from grpo_utils.data.prompts import renderer_from_config
from grpo_utils.errors import ConfigError, DataError, ModelError
from grpo_utils.eval.evaluate import build_report, check_reward, evaluate, resolve_model_dir, validate_eval_config
from grpo_utils.models.check import check_model_name
from grpo_utils.models.loading import DTYPES, load_tokenizer
from grpo_utils.rewards import RewardFunction


def run_evaluation(cfg: DictConfig, run_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """Everything that can be checked without a model is checked first; returns the report and
    where it was written (``eval.report_path``, default ``<run_dir>/eval_report.json``)."""
    tensordict.set_list_to_stack(True).set()  # TorchRL's LLM modules require it
    logging.getLogger("torchrl").setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    try:
        resolve_all(cfg)
        check_schema_values(cfg, root=EvalRunConfig)
        validate_eval_config(cfg)
        device = resolve_device(cfg.device)
        model_path = resolve_model_dir(cfg.model.name)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is required (it is ??? in the config); set it with {e.full_key}=...") from None
    info = check_model_name(model_path)  # read, not loaded: config.json, weight headers, tokenizer files
    if info is not None and info.context and cfg.generation.max_new_tokens >= info.context:
        raise ConfigError(f"generation.max_new_tokens={cfg.generation.max_new_tokens} leaves no room for a prompt in "
                          f"the model's context of {info.context} positions")
    rows = load_split(cfg.env, cfg.eval.split)
    check_prompt_fields(cfg.env.get("prompt_format") or "{question}", rows, cfg.eval.split)
    skipped = rows.skipped
    if cfg.eval.max_prompts:
        rows = rows[: cfg.eval.max_prompts]
    try:
        reward_fn = RewardFunction(**reward_config(cfg))
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    check_reward(reward_fn, rows[0], cfg.env.dataset)

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    try:
        tokenizer = load_tokenizer(model_path)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[cfg.model.dtype])
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name={cfg.model.name}: cannot load {model_path} ({str(e).splitlines()[0]})") from None
    model = model.to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    try:
        renderer = renderer_from_config(cfg.env, tokenizer)
        renderer(rows[0])  # a template that does not fit the rows fails here, not mid-run
    except DataError as e:
        raise ConfigError(str(e)) from None

    records: list[dict] | None = [] if cfg.eval.samples_path else None
    gen = cfg.generation
    metrics = evaluate(model, tokenizer, renderer, reward_fn, rows, k=cfg.eval.k, greedy=cfg.eval.greedy,
                       temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k,
                       max_new_tokens=gen.max_new_tokens, batch_size=cfg.eval.batch_size,
                       seed=cfg.eval.sample_seed, records=records)
    report = build_report(metrics, model=model_path, dataset=cfg.env.dataset, split=cfg.eval.split, k=cfg.eval.k,
                          skipped_rows=skipped,
                          extra={"generation": OmegaConf.to_container(gen, resolve=True),
                                 "template": renderer.template, "reward": OmegaConf.to_container(cfg.reward),
                                 "wall_time_s": time.perf_counter() - t0})
    report_path = Path(cfg.eval.report_path) if cfg.eval.report_path else Path(run_dir) / "eval_report.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    if records is not None:
        samples_path = Path(cfg.eval.samples_path)
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        with samples_path.open("w") as f:
            for rec in records:
                f.write(json.dumps(rec, default=str) + "\n")
    return report, report_path
