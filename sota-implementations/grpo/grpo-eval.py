"""Evaluate a model (a directory, a training checkpoint, a run's latest checkpoint, or a hub name) on a
dataset split: greedy accuracy, pass@1..pass@k, maj@k and mean@k. Prints a table and writes a JSON
report (default ``<hydra run dir>/eval_report.json``).

    python sota-implementations/grpo/grpo-eval.py                                    # quick-start base model
    python sota-implementations/grpo/grpo-eval.py model.name=outputs/DATE/TIME/checkpoints/step_60
    python sota-implementations/grpo/grpo-eval.py model.name=outputs/DATE/TIME env.dataset=countdown eval.k=16
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import tensordict
import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from grpo_utils.config import ConfigError, resolve_device, seed_everything
from grpo_utils.data.datasets import DataError, load_split
from grpo_utils.data.prompts import renderer_from_config
from grpo_utils.eval.evaluate import (
    EvalConfigError,
    build_report,
    check_reward,
    evaluate,
    fail,
    format_table,
    resolve_model_dir,
    validate_eval_config,
)
from grpo_utils.models.loading import DTYPES, load_tokenizer
from grpo_utils.rewards import RewardFunction


@hydra.main(config_path="../../config", config_name="grpo_eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    tensordict.set_list_to_stack(True).set()  # TorchRL's LLM modules require it
    logging.getLogger("torchrl").setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()

    # Everything that can be checked without a model is checked first, one line per error.
    try:
        validate_eval_config(cfg)
        device = resolve_device(cfg.device)
        model_path = resolve_model_dir(cfg.model.name)
    except (EvalConfigError, ConfigError) as e:
        fail("config", str(e))
    except MissingMandatoryValue as e:
        fail("config", f"{e.full_key} is required (it is ??? in the config); set it with {e.full_key}=...")
    try:
        rows = load_split(cfg.env, cfg.eval.split)
    except DataError as e:
        fail("data", str(e))
    skipped = rows.skipped
    if cfg.eval.max_prompts:
        rows = rows[: cfg.eval.max_prompts]
    try:
        reward_fn = RewardFunction(**OmegaConf.to_container(cfg.reward, resolve=True))
        check_reward(reward_fn, rows[0], cfg.env.dataset)
    except (ValueError, TypeError, EvalConfigError) as e:
        fail("config", str(e))

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    try:
        tokenizer = load_tokenizer(model_path)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[cfg.model.dtype])
    except (OSError, ValueError) as e:
        fail("model", f"model.name={cfg.model.name}: cannot load {model_path} ({str(e).splitlines()[0]})")
    model = model.to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    try:
        renderer = renderer_from_config(cfg.env, tokenizer)
        renderer(rows[0])  # a template that does not fit the rows fails here, not mid-run
    except DataError as e:
        fail("config", str(e))

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
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    report_path = Path(cfg.eval.report_path) if cfg.eval.report_path else run_dir / "eval_report.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    if records is not None:
        samples_path = Path(cfg.eval.samples_path)
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        with samples_path.open("w") as f:
            for rec in records:
                f.write(json.dumps(rec, default=str) + "\n")
    print(format_table(report))
    print(f"Report: {report_path}")


if __name__ == "__main__":
    main()
