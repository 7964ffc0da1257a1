"""Process set-up before any model loads: validate the config, plan resources, seed, set threads,
turn SIGTERM into an exception, quiet the libraries' per-step logging."""

from __future__ import annotations

import logging
import os
import warnings

import tensordict
import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from grpo_utils.config.validate import (
    check_models,
    check_placement,
    check_sizes,
    resolve_device,
    seed_everything,
    validate,
)
from grpo_utils.distributed.resources import check_devices, mode_opt, plan_resources, unreachable, uses_ray
from grpo_utils.errors import ConfigError, raise_on_sigterm


def prepare_process(cfg: DictConfig, mode: str) -> torch.device:
    """Check the run (:func:`check_run`), then seed, set threads, quiet the libraries' per-step
    logging and turn SIGTERM into an exception; returns the trainer's device."""
    device = check_run(cfg, mode)
    quiet_libraries()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    raise_on_sigterm()
    return device


def quiet_libraries() -> None:
    """What every trainer process sets up in the libraries, rank 0 and the others alike: TorchRL's
    list stacking, no weight-loading progress bars, the quiet console (:func:`quiet_console`)."""
    tensordict.set_list_to_stack(True).set()  # TorchRL's LLM modules require it
    transformers.utils.logging.disable_progress_bar()
    quiet_console()


def quiet_console() -> None:
    """The console shows the progress bar, warnings and the summary; details go to the run
    directory's log file (Hydra's ``<job>.log``). TorchRL logs every replay-buffer storage it
    builds at INFO through its own stdout handler (set up when torchrl is imported, which resets
    any level set before), so its handler keeps only warnings and the log file gets the rest.
    vLLM (imported by torchrl when installed) warns about its CPU build on import and about every
    in-place weight reload: only its errors are shown (``VLLM_LOGGING_LEVEL`` overrides)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"])
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op", category=FutureWarning)
    import torchrl  # noqa: F401  (configures the "torchrl" logger)

    torchrl_logger = logging.getLogger("torchrl")
    for handler in torchrl_logger.handlers:
        handler.setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler not in torchrl_logger.handlers:
            torchrl_logger.addHandler(handler)
    torchrl_logger.propagate = False


def check_run(cfg: DictConfig, mode: str, available_gpus: int | None = None) -> torch.device:
    """Everything that can be checked before a model loads: values and how they fit together,
    whether the machine (or the joined Ray cluster) has the devices asked for, and the device
    layouts this version can run. Raises :class:`ConfigError` (one line naming the key)."""
    try:
        validate(cfg, mode)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is required (it is ??? in the config); set it with {e.full_key}=...") from None
    device = resolve_device(cfg.device)
    try:
        check_devices(cfg, device, available_gpus)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    needs_reference = (OmegaConf.select(cfg, "loss.kl_coef", default=0) or 0) > 0
    check_placement(cfg, mode, needs_reference=needs_reference)
    check_sizes(cfg)
    if uses_ray(cfg):  # does the machine (or cluster) fit the collectors?
        address = mode_opt(cfg, "ray_address")
        try:
            plan_resources(cfg, device, available_gpus)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        problem = unreachable(address) if address else None  # ray.init would retry for minutes
        if problem:
            raise ConfigError(f"cannot join the Ray cluster at mode.ray_address={address}: {problem}")
    check_models(cfg, needs_reference)  # read, not loaded: config.json, weight headers, tokenizer files
    return device
