"""The ``transformers`` backend: TorchRL's ``TransformersWrapper`` around a Hugging Face module."""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict


def generation_kwargs(gen_cfg, greedy: bool = False) -> dict[str, Any]:
    """HF ``generate`` kwargs. Unrestricted sampling is ``top_k=None`` passed explicitly: HF
    rejects ``top_k=0``, falls back to 50 when top_k is absent, and ``top_k=vocab_size`` would
    run a useless top-k over the whole vocabulary at every token."""
    if greedy:
        return {"max_new_tokens": gen_cfg.max_new_tokens, "do_sample": False}
    kwargs = {"max_new_tokens": gen_cfg.max_new_tokens, "do_sample": True,
              "temperature": gen_cfg.temperature, "top_k": gen_cfg.top_k or None}
    if gen_cfg.top_p < 1:
        kwargs["top_p"] = gen_cfg.top_p
    if gen_cfg.min_new_tokens:
        kwargs["min_new_tokens"] = gen_cfg.min_new_tokens
    return kwargs


def make_generator(model, tokenizer, gen_kwargs: dict[str, Any], return_log_probs: bool = False):
    from torchrl.modules.llm import TransformersWrapper

    return TransformersWrapper(
        model,
        tokenizer=tokenizer,
        input_mode="tokens",
        generate=True,
        # Behaviour log-probs are recomputed exactly by grpo_utils.algo.logprobs (TorchRL zeroes token 0);
        # the sampler's own are only kept for the inference/training mismatch correction.
        return_log_probs=return_log_probs,
        pad_output=True,
        generate_kwargs=dict(gen_kwargs),
    )


def generate_tokens(generator, prompt: torch.Tensor, prompt_mask: torch.Tensor) -> TensorDict:
    """``generator`` (a token-mode ``TransformersWrapper`` from :func:`make_generator`) on a dense,
    left-padded prompt batch: a ``TensorDict`` with ``("tokens", "response")`` (and
    ``("log_probs", "response")`` when the wrapper returns log-probs), through its public call.

    The call splits the batch into one lazily stacked TensorDict per row and builds its outputs row
    by row: about 5 ms for 32 rows, a tenth of a tiny model's step (bench/RESULTS.md). The wrapper's
    private token path would skip that; it is not used (public API only): making the whole rollout
    TorchRL's collector path fast is the engine work of its own.
    """
    td = TensorDict({"tokens": {"prompt": prompt}, "attention_mask": prompt_mask}, batch_size=[len(prompt)])
    return generator(td)


class TransformersGenerator:
    """Generates with ``model`` itself (the training module locally, an actor's copy on Ray), so new
    weights are in place as soon as the module holds them."""

    shares_weights = True

    def __init__(self, model, tokenizer, gen_kwargs: dict[str, Any], return_log_probs: bool = False):
        self.model = model
        self.return_log_probs = return_log_probs
        self.wrapper = make_generator(model, tokenizer, gen_kwargs, return_log_probs=return_log_probs)

    def generate(self, prompt: torch.Tensor, prompt_mask: torch.Tensor,
                 seed_key: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Response ids ``[N, T]`` (padded after the stop token) and the sampler's log-probs (TorchRL
        reports 0 for the first token: see :func:`grpo_utils.algo.logprobs.add_behaviour_log_probs`).
        Sampling draws from torch's global RNG, which checkpoints save; ``seed_key`` is unused.

        Runs the module in eval mode (its mode is restored): the trainer leaves the shared module in
        train mode, where dropout (LoRA's included) would be sampled from, and where a module with
        gradient checkpointing makes transformers drop the KV cache, recomputing the whole
        sequence at every generated token."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = generate_tokens(self.wrapper, prompt, prompt_mask)
        finally:
            self.model.train(was_training)
        return out["tokens", "response"], out["log_probs", "response"] if self.return_log_probs else None

    def load_weights(self, model: torch.nn.Module) -> None:
        """Nothing to copy: the wrapper holds the module whose weights changed."""

    def close(self) -> None:
        """Nothing to release."""
