"""Starting the collector actors: a Ray cluster sized to the plan (or a joined one), the weight
sync, and the pool the batch sources (``train/sources.py``) draw from."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from grpo_utils.errors import ConfigError


def start_collectors(cfg: DictConfig, device: torch.device, streaming: bool, model: torch.nn.Module | None = None,
                     model_path: str | None = None, start_states: dict[int, dict] | None = None):
    """Start a local Ray cluster sized to the plan (or join ``mode.ray_address``) and the collector
    actors, built from ``model_path`` (default ``model.name``). Raises a one-line error if the
    cluster is short or an actor cannot start, with nothing left running; the returned pool's
    ``close()`` stops everything it started. ``model`` (the trainer's) is what a restarted actor
    gets its weights from."""
    from grpo_utils.distributed.collectors import CollectorPool
    from grpo_utils.distributed.resources import mode_opt, plan_resources, shutdown_ray, start_ray
    from grpo_utils.distributed.weight_sync import make_weight_sync
    from grpo_utils.models.loading import resolve_model_path

    try:
        plan = plan_resources(cfg, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not cfg.num_threads:
        torch.set_num_threads(plan.trainer_threads)  # leave the collectors' cores to them
    actor_cfg = OmegaConf.to_container(cfg, resolve=True)
    # builtin:quickstart is built once, here, not in every actor.
    actor_cfg["model"]["name"] = model_path or resolve_model_path(cfg.model.name)
    try:
        start_ray(plan, mode_opt(cfg, "ray_address"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        timeout_s = float(mode_opt(cfg, "actor_timeout_s"))
        sync = make_weight_sync(mode_opt(cfg, "weight_sync"), num_receivers=plan.num_collectors, device=device,
                                timeout_s=timeout_s)
        return CollectorPool(actor_cfg, plan, sync, timeout_s, streaming=streaming,
                             buffer_size=mode_opt(cfg, "buffer_size"), start_states=start_states, model=model,
                             max_restarts=mode_opt(cfg, "max_restarts"))
    except BaseException:
        shutdown_ray([])
        raise

