"""Loading the policy, the reference model and the tokenizer from a Hugging Face path or name."""

from __future__ import annotations

import copy
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BUILTIN_PREFIX = "builtin:"


def resolve_model_path(name: str) -> str:
    """``builtin:quickstart`` builds (once) the tiny warm-started model; anything else is passed
    to ``from_pretrained`` (a local directory, ``~`` expanded, or a hub name)."""
    if name == "builtin:quickstart":
        from grpo_utils.models.quickstart import ensure_quickstart_model

        return str(ensure_quickstart_model())
    if name.startswith(BUILTIN_PREFIX):
        raise ValueError(f"model.name={name!r} is unknown; the only builtin is 'builtin:quickstart'")
    return os.path.expanduser(name) if name.startswith("~") else name


def load_tokenizer(path: str):
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(model_cfg, device: torch.device,
                gradient_checkpointing: bool = False) -> tuple[torch.nn.Module, object, str]:
    path = resolve_model_path(model_cfg.name)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[model_cfg.dtype])
    return prepare_policy(model, tokenizer, device, gradient_checkpointing), tokenizer, path


def prepare_policy(model: torch.nn.Module, tokenizer, device: torch.device,
                   gradient_checkpointing: bool = False) -> torch.nn.Module:
    """On ``device``, padding with the tokenizer's pad id (set to EOS if it has none)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_reference(policy: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the initial policy (only built when a KL-to-reference term is on)."""
    return freeze(copy.deepcopy(policy))


def load_reference(path: str, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen reference loaded from ``path`` (a resolved model directory or hub name), on the CPU."""
    return freeze(AutoModelForCausalLM.from_pretrained(path, dtype=dtype))


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode without gradients (the reference only runs forward passes)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
