"""LoRA on the policy, through PEFT (``train_model.lora.*``).

Only the low-rank adapters train; the base weights stay frozen. Everything outside the trainer
sees a plain Hugging Face model: generators (vLLM, Ray collectors) and saved checkpoints get the
*merged* weights ``W + B @ A * scaling`` under the plain model's names (:func:`merged_state_dict`),
computed on the side so the live module is never merged and unmerged (which mutates it and adds
float error at every sync). Checkpoints also keep the adapter itself in ``adapter/``, which is
what a resume loads (onto ``model.name``'s base), so a resumed run continues exactly.

The KL reference of a LoRA policy is the same module with its adapters switched off
(:class:`AdaptersDisabled`): the frozen base *is* the initial policy, so no second copy is kept.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from grpo_utils.errors import CheckpointError, ConfigError

#: Where a checkpoint keeps the adapter (PEFT's ``save_pretrained`` files).
ADAPTER_DIRNAME = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_BASE_LAYER = "base_layer."


def is_lora(model: Any) -> bool:
    """Whether ``model`` is a PEFT model (the policy with LoRA adapters). Without PEFT imported
    nothing can be one, so plain runs never pay for importing it (weight syncs ask every push)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model under a PEFT wrapper (its targeted layers hold the adapters); a
    plain model is returned as it is."""
    return model.get_base_model() if is_lora(model) else model


def target_modules(lora_cfg: DictConfig | dict) -> list[str] | str:
    """``target_modules`` as PEFT takes it: a list of names, or the string ``all-linear``."""
    targets = lora_cfg["target_modules"]
    if isinstance(targets, ListConfig):
        return list(OmegaConf.to_container(targets))
    return list(targets) if isinstance(targets, (list, tuple)) else targets


def apply_lora(model: torch.nn.Module, lora_cfg: DictConfig | dict) -> torch.nn.Module:
    """``model`` (modified in place: PEFT injects the adapters into its layers) wrapped as a
    ``PeftModel`` whose only trainable parameters are the adapters. A target name that matches no
    module is a one-line :class:`ConfigError` naming ``train_model.lora.target_modules``."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules(lora_cfg)
    if isinstance(targets, list):
        names = [name for name, _ in model.named_modules()]
        for target in targets:
            if not any(name == target or name.endswith("." + target) for name in names):
                raise ConfigError(f"train_model.lora.target_modules: {target!r} matches no module of the model "
                                  f"(its linear layers: {', '.join(linear_layer_names(model))})")
    config = LoraConfig(task_type="CAUSAL_LM", r=int(lora_cfg["r"]), lora_alpha=float(lora_cfg["alpha"]),
                        lora_dropout=float(lora_cfg["dropout"]), target_modules=targets)
    if getattr(model, "is_gradient_checkpointing", False):
        # With the embeddings frozen, no checkpointed segment's input requires grad and (reentrant)
        # checkpointing would drop the adapters' gradients.
        model.enable_input_require_grads()
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # PEFT's own check (e.g. all-linear on a model with no linear layer)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"train_model.lora.target_modules={targets}: {first}") from None


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The distinct leaf names of ``model``'s linear layers (``q_proj``, ``up_proj``, ...)."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name:
            seen.setdefault(name.rpartition(".")[2], None)
    return list(seen)


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a plain copy of the policy would hold: for a ``PeftModel``, exactly the keys
    (in the same order) of the Hugging Face model it wraps, each adapted weight replaced by
    ``W + B @ A * scaling`` (in float32, cast back to W's dtype), computed without touching the
    module; for any other model, its ``state_dict()``."""
    if not is_lora(model):
        return model.state_dict()
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    inner = model.get_base_model()
    layers = {name: module for name, module in inner.named_modules() if isinstance(module, LoraLayer)}
    merged: dict[str, torch.Tensor] = {}
    for key, value in inner.state_dict().items():
        owner = _lora_owner(key, layers)
        if owner is None:
            merged[key] = value
            continue
        rest = key[len(owner) + 1:]
        if not rest.startswith(_BASE_LAYER):
            continue  # the adapter's own tensors (lora_A, lora_B, ...)
        plain = f"{owner}.{rest[len(_BASE_LAYER):]}"
        layer = layers[owner]
        if rest == _BASE_LAYER + "weight" and adapter in getattr(layer, "r", {}):
            value = (value.float() + _delta(layer, adapter)).to(value.dtype)
        merged[plain] = value
    return merged


def _lora_owner(key: str, layers: dict[str, torch.nn.Module]) -> str | None:
    """The LoRA layer whose tensor ``key`` is (the longest module-name prefix), or None."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:n])
        if name in layers:
            return name
    return None


def _delta(layer: torch.nn.Module, adapter: str) -> torch.Tensor:
    """``B @ A * scaling`` in float32, shaped like the layer's weight."""
    from peft.tuners.lora import Linear

    if isinstance(layer, Linear):
        delta = layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()
        delta = delta * layer.scaling[adapter]
        return delta.T if layer.fan_in_fan_out else delta
    return layer.get_delta_weight(adapter).float()  # embeddings, convolutions: PEFT's own formula


class AdaptersDisabled(torch.nn.Module):
    """The KL reference of a LoRA policy: the policy's own module run with its adapters switched
    off (in eval mode, without gradients), i.e. the frozen base = the initial policy. The policy
    is held outside the module registry, so this wrapper owns no parameters (nothing is counted,
    moved or saved twice) and ``.to()``/``.eval()`` on it leave the policy alone."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        if not is_lora(policy):
            raise TypeError(f"AdaptersDisabled needs a PeftModel, got {type(policy).__name__}")
        self._policy = (policy,)  # a tuple: not registered as a submodule

    @property
    def policy(self) -> torch.nn.Module:
        return self._policy[0]

    @property
    def config(self):
        return self.policy.config

    def forward(self, *args: Any, **kwargs: Any):
        policy = self.policy
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad(), policy.disable_adapter():
                return policy(*args, **kwargs)
        finally:
            policy.train(was_training)


# ----------------------------------------------------------------------------- checkpoints


def save_model(model: torch.nn.Module, directory: str | Path) -> None:
    """``directory`` as a Hugging Face model directory (``config.json``, ``model.safetensors``).
    A LoRA policy is saved merged (so ``AutoModelForCausalLM.from_pretrained`` loads the trained
    policy), plus its adapter in ``adapter/`` (``PeftModel.from_pretrained(base, directory /
    "adapter")``), which a resume loads."""
    directory = Path(directory)
    if not is_lora(model):
        model.save_pretrained(str(directory))
        return
    model.get_base_model().save_pretrained(str(directory), state_dict=merged_state_dict(model))
    model.save_pretrained(str(directory / ADAPTER_DIRNAME))
    (directory / ADAPTER_DIRNAME / "README.md").unlink(missing_ok=True)  # PEFT's blank model-card template


def has_adapter(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / ADAPTER_DIRNAME / ADAPTER_CONFIG).is_file()


def check_checkpoint(ckpt_dir: str | Path, lora_cfg: DictConfig | dict, shown: str | None = None) -> None:
    """Before any model loads: a LoRA checkpoint resumes only with ``train_model.lora.enabled=true``
    and the same rank, alpha and target modules, and a full-model checkpoint only without LoRA.
    One-line :class:`CheckpointError` (the kind of checkpoint) or :class:`ConfigError` (a setting)."""
    name = shown or str(ckpt_dir)
    enabled = bool(lora_cfg["enabled"])
    if has_adapter(ckpt_dir) != enabled:
        if enabled:
            raise CheckpointError(f"checkpoint {name} holds full-model weights (no {ADAPTER_DIRNAME}/); it resumes "
                                  "only with train_model.lora.enabled=false")
        raise CheckpointError(f"checkpoint {name} holds a LoRA adapter ({ADAPTER_DIRNAME}/); it resumes only with "
                              "train_model.lora.enabled=true (its merged weights load with from_pretrained)")
    if not enabled:
        return
    try:
        saved = json.loads((Path(ckpt_dir) / ADAPTER_DIRNAME / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {name}: {ADAPTER_DIRNAME}/{ADAPTER_CONFIG} is unreadable ({e})") from None
    targets = target_modules(lora_cfg)
    ours = {"r": int(lora_cfg["r"]), "alpha": float(lora_cfg["alpha"]),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets}
    theirs_targets = saved.get("target_modules")
    theirs = {"r": saved.get("r"), "alpha": float(saved.get("lora_alpha", 0)),
              "target_modules": sorted(theirs_targets) if isinstance(theirs_targets, list) else theirs_targets}
    for key, value in ours.items():
        # all-linear is saved expanded into the names it matched: only explicit lists compare.
        if key == "target_modules" and "all-linear" in (value, saved.get("target_modules")):
            continue
        if theirs[key] != value:
            raise ConfigError(f"train_model.lora.{key}={value} differs from checkpoint {name}'s adapter "
                              f"({key}={theirs[key]}); resume with the same LoRA settings")


def load_adapter(ckpt_dir: str | Path, model: torch.nn.Module) -> None:
    """Load ``ckpt_dir/adapter/`` into the LoRA policy ``model`` (whose base is ``model.name``'s),
    strictly: every adapter tensor present, none unexpected."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / ADAPTER_DIRNAME / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {ADAPTER_DIRNAME}/{ADAPTER_WEIGHTS} to resume LoRA from")
    state = load_file(str(path), device="cpu")
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {ckpt_dir}: its adapter does not fit the policy (missing "
                              f"{missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})")
