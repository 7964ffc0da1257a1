"""The transformers backend's generator on the module the trainer trains (grpo_utils/inference/transformers.py)."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from grpo_utils.inference.transformers import TransformersGenerator, generation_kwargs


def test_generates_in_eval_mode_with_the_kv_cache_and_restores_the_mode(tok, model):
    """The trainer leaves the shared module in train mode with gradient checkpointing on; sampling
    must still run in eval mode (no dropout, the KV cache kept: one new token per forward after the
    prompt) and hand the module back in train mode."""
    model.gradient_checkpointing_enable()
    model.train()
    seen = []  # (training, sequence length) of every forward during generation
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((module.training, kwargs["input_ids"].shape[1])), with_kwargs=True)
    gen = TransformersGenerator(model, tok, generation_kwargs(OmegaConf.create(
        {"max_new_tokens": 5, "min_new_tokens": 5, "temperature": 1.0, "top_k": 0, "top_p": 1.0})))
    prompt = torch.tensor([[10, 20, 30], [40, 50, 60]])
    try:
        response, _ = gen.generate(prompt, torch.ones_like(prompt))
    finally:
        hook.remove()
        model.gradient_checkpointing_disable()
        model.eval()
    assert response.shape == (2, 5)
    assert [t for t, _ in seen] == [False] * 5
    assert [n for _, n in seen] == [3, 1, 1, 1, 1]  # the prompt, then one token at a time from the cache
    assert gen.model.training is False  # restored by the finally above; below: restored by generate
    model.train()
    gen.generate(prompt, torch.ones_like(prompt))
    assert model.training
    model.eval()
