"""Run set-up shared by the recipes: validate, seed, pick the device, build the parts."""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import tensordict
import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from grpo_utils.algo.losses import build_loss
from grpo_utils.config import ConfigError, resolve_device, seed_everything, validate
from grpo_utils.data.datasets import DataError, Rows, load_split
from grpo_utils.data.prompts import PromptRenderer, PromptStream, renderer_from_config
from grpo_utils.distributed.resources import mode_opt, plan_resources, unreachable, uses_ray
from grpo_utils.rewards import RewardFunction, build_reward
from grpo_utils.rollout.group import GroupRollout


@dataclass
class Run:
    cfg: DictConfig
    run_dir: Path
    device: torch.device


def start_run(cfg: DictConfig, mode: str) -> Run:
    """Validate the config (exits with a one-line message on error), then seed and set threads."""
    tensordict.set_list_to_stack(True).set()  # TorchRL's LLM modules require it
    logging.getLogger("torchrl").setLevel(logging.WARNING)  # per-step storage INFO lines drown the bar
    transformers.utils.logging.disable_progress_bar()
    try:
        validate(cfg, mode)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except MissingMandatoryValue as e:
        sys.exit(f"config error: {e.full_key} is required (it is ??? in the config); set it with {e.full_key}=...")
    device = resolve_device(cfg.device)
    if uses_ray(cfg):  # before any model is loaded: does the machine (or cluster) fit the plan?
        address = mode_opt(cfg, "ray_address")
        try:
            plan_resources(cfg, device)
            problem = unreachable(address) if address else None  # ray.init would retry for minutes
        except ValueError as e:
            sys.exit(f"config error: {e}")
        if problem:
            sys.exit(f"config error: cannot join the Ray cluster at mode.ray_address={address}: {problem}")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    exit_on_sigterm()
    return Run(cfg=cfg, run_dir=Path(HydraConfig.get().runtime.output_dir), device=device)


def make_loss(loss_cfg: DictConfig) -> torch.nn.Module:
    """Builds ``loss._target_`` with the other keys; a bad key or value is a one-line error."""
    kwargs = OmegaConf.to_container(loss_cfg, resolve=True)
    target = kwargs.pop("_target_", None)
    try:
        cls = hydra.utils.get_class(target) if target else None
    except Exception:
        sys.exit(f"config error: loss._target_={target!r} cannot be imported")
    try:
        return cls(**kwargs) if cls else build_loss(kwargs)
    except (ValueError, TypeError) as e:
        sys.exit(f"config error: loss: {e}")


def make_reward(reward_cfg: DictConfig) -> RewardFunction:
    try:
        return build_reward(reward_cfg)
    except ValueError as e:
        sys.exit(f"config error: {e}")


def load_rows(env_cfg: DictConfig, heldout_size: int) -> tuple[Rows, Rows]:
    """Training and held-out rows (``.skipped`` counts malformed rows skipped with skip_bad_rows)."""
    try:
        train, test = load_split(env_cfg, "train"), load_split(env_cfg, "test")
    except DataError as e:
        sys.exit(f"data error: {e}")
    if heldout_size:
        test = Rows(test[:heldout_size], skipped=test.skipped, source=test.source)
    if train.skipped or test.skipped:
        print(f"skipped {train.skipped + test.skipped} malformed rows (env.skip_bad_rows=true)")
    return train, test


def make_renderer(env_cfg: DictConfig, tokenizer, sample_row: dict) -> PromptRenderer:
    try:
        renderer = renderer_from_config(env_cfg, tokenizer)
        renderer(sample_row)  # fail now, not mid-run, on a template that does not fit the rows
    except DataError as e:
        sys.exit(f"config error: {e}")
    return renderer


def make_rollout(cfg: DictConfig, model, tokenizer, renderer: PromptRenderer, reward_fn: RewardFunction,
                 stream: PromptStream, keep_rollout_log_probs: bool = False, device: torch.device | None = None):
    """``rollout.engine=direct`` (one batched TransformersWrapper call) or ``collector``
    (TorchRL's LLMCollector over a DatasetChatEnv); both yield the same batches. With
    ``mode.ray=true`` either engine runs in a Ray collector actor instead (:class:`RayRollout`)."""
    from grpo_utils.rollout.group import generation_kwargs

    if mode_opt(cfg, "ray"):
        from grpo_utils.distributed.collectors import RayRollout

        return RayRollout(start_collectors(cfg, device or torch.device("cpu"), streaming=False, model=model),
                          sync_iter=mode_opt(cfg, "sync_iter"))
    if cfg.rollout.engine == "collector":
        from grpo_utils.rollout.collector import CollectorRollout

        return CollectorRollout(model, tokenizer, renderer, reward_fn, generation_kwargs(cfg.generation),
                                cfg.env.group_size, stream)
    return GroupRollout(model, tokenizer, renderer, reward_fn, generation_kwargs(cfg.generation), cfg.env.group_size,
                        stream, keep_rollout_log_probs=keep_rollout_log_probs)


def start_collectors(cfg: DictConfig, device: torch.device, streaming: bool, model: torch.nn.Module | None = None,
                     model_path: str | None = None, start_states: dict[int, dict] | None = None):
    """Start a local Ray cluster sized to the plan (or join ``mode.ray_address``) and the collector
    actors, built from ``model_path`` (default ``model.name``). Exits with one line if the cluster is
    short or an actor cannot start; the returned pool's ``close()`` stops everything it started.
    ``model`` (the trainer's) is what a restarted actor gets its weights from."""
    from grpo_utils.distributed.collectors import CollectorFailed, CollectorPool
    from grpo_utils.distributed.resources import shutdown_ray, start_ray
    from grpo_utils.distributed.weight_sync import make_weight_sync
    from grpo_utils.models.loading import resolve_model_path

    try:
        plan = plan_resources(cfg, device)
    except ValueError as e:
        sys.exit(f"config error: {e}")
    if not cfg.num_threads:
        torch.set_num_threads(plan.trainer_threads)  # leave the collectors' cores to them
    actor_cfg = OmegaConf.to_container(cfg, resolve=True)
    # builtin:quickstart is built once, here, not in every actor.
    actor_cfg["model"]["name"] = model_path or resolve_model_path(cfg.model.name)
    try:
        start_ray(plan, mode_opt(cfg, "ray_address"))
    except ValueError as e:
        sys.exit(f"config error: {e}")
    try:
        sync = make_weight_sync(mode_opt(cfg, "weight_sync"), num_receivers=plan.num_collectors, device=device,
                                timeout_s=float(mode_opt(cfg, "actor_timeout_s")))
        return CollectorPool(actor_cfg, plan, sync, float(mode_opt(cfg, "actor_timeout_s")), streaming=streaming,
                             buffer_size=mode_opt(cfg, "buffer_size"), start_states=start_states, model=model,
                             max_restarts=mode_opt(cfg, "max_restarts"))
    except CollectorFailed as e:
        shutdown_ray([])
        sys.exit(f"error: {e}")
    except BaseException:
        shutdown_ray([])
        raise


def stop_run(error: BaseException, save_now, logger) -> None:
    """Called from an ``except`` block: checkpoint the current step (``save_now`` returns the last
    saved step), close the metrics, then stop with one line naming that checkpoint for a dead
    collector, Ctrl-C (exit code 130) or SIGTERM; anything else is re-raised."""
    from grpo_utils.distributed.collectors import CollectorFailed

    saved = save_now()
    logger.close()
    where = f"; last checkpoint: step {saved}" if saved > 0 else ""
    if isinstance(error, CollectorFailed):
        sys.exit(f"error: {error}{where}")
    if isinstance(error, KeyboardInterrupt):
        print(f"interrupted{where}", file=sys.stderr)
        sys.exit(130)
    if isinstance(error, SystemExit) and error.code == TERMINATED:
        sys.exit(f"{TERMINATED}{where}")
    raise error


TERMINATED = "error: terminated (SIGTERM)"


def exit_on_sigterm() -> None:
    """A scheduler's SIGTERM unwinds like Ctrl-C (checkpoint, shut Ray down) instead of killing
    the process outright. Ray's ``init`` installs its own handler, so this runs after it too."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(TERMINATED))


def resume_training(resume_from: Path, model: torch.nn.Module, trainer) -> dict:
    """Load a checkpoint's weights, optimizer/scheduler and RNGs; returns its trainer state (the
    recipe restores its own parts: step, policy version, prompt streams)."""
    from grpo_utils.train import checkpoint as ckpt

    ckpt.load_model_weights(resume_from, model)
    state = ckpt.load_trainer_state(resume_from)
    trainer.load_state_dict(state["trainer"])
    ckpt.restore_rng_state(state["rng"])
    print(f"Resumed from {resume_from} at step {state['step']}")
    return state


def held_out_evaluator(cfg: DictConfig, model, tokenizer, renderer: PromptRenderer, reward_fn: RewardFunction,
                       rows: Rows):
    """A no-argument callable: greedy accuracy on the held-out rows, plus pass@k / maj@k / mean@k
    when ``eval.k`` > 0."""
    from grpo_utils.eval.evaluate import evaluate

    def held_out_eval() -> dict[str, float]:
        return evaluate(model, tokenizer, renderer, reward_fn, rows, k=cfg.eval.k,
                        temperature=cfg.eval.temperature, top_p=cfg.generation.top_p, top_k=cfg.generation.top_k,
                        max_new_tokens=cfg.generation.max_new_tokens, batch_size=cfg.eval.batch_size, seed=cfg.seed)

    return held_out_eval


def find_resume_checkpoint(resume, run_dir: Path) -> Path | None:
    """The checkpoint to resume from (``resume=true``: the run dir's latest, if any), checked
    before any model is loaded."""
    from grpo_utils.train.checkpoint import resolve_resume

    try:
        return resolve_resume(resume, run_dir)
    except FileNotFoundError as e:
        sys.exit(f"error: resume={resume}: {e}")


def finish_run(run_dir: Path, logger, steps_done: int, t_start: float, extra: dict) -> None:
    """Close the metrics, write summary.json and the reward curve, print the summary."""
    import time

    from grpo_utils.train.metrics import format_summary, plot_reward_curve, write_summary

    logger.close()
    summary = write_summary(run_dir, steps_done=steps_done, wall_time_s=time.perf_counter() - t_start, extra=extra)
    plot = plot_reward_curve(run_dir)
    print(format_summary(summary))
    print(f"Run directory: {run_dir}" + (f"  (reward curve: {plot.name})" if plot else ""))
