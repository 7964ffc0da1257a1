"""Per-token log-probabilities and entropies of response tokens under a causal LM.

One function serves behaviour log-probs, training log-probs and reference log-probs, so the
three are computed identically (same positions, same temperature) and the importance ratio
is exactly 1 when the weights are the same.
"""

from __future__ import annotations

import torch

from grpo_utils.algo.packing import pack, unpack


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    # Left padding: positions must count real tokens only, as ``generate`` does.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    packed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[B, T]`` (and entropies) of ``input_ids[:, response_start:]``.

    Logits are divided by the sampling temperature so the distribution matches the one the
    tokens were sampled from. ``packed``: the forward runs on the sequences packed end to end
    (:mod:`grpo_utils.algo.packing`), with no padding; the values equal the padded forward's to
    float noise, and positions after a response's last token are 0.
    """
    if packed:
        return _packed_response_log_probs(model, input_ids, attention_mask, response_start, temperature,
                                          with_entropy)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    logits = out.logits[:, response_start - 1 : -1]
    return _token_log_probs(logits, input_ids[:, response_start:], temperature, with_entropy)


def _token_log_probs(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                     with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of ``targets`` (and entropies) under ``logits`` (``[..., V]``) at ``temperature``."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # log-softmax in half precision is too coarse for ratios
    if temperature != 1.0:
        logits = logits / temperature
    log_z = torch.logsumexp(logits, dim=-1)
    token_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    log_probs = token_logits - log_z
    entropy = None
    if with_entropy:
        probs = torch.softmax(logits, dim=-1)
        entropy = log_z - (probs * logits).sum(-1)
    return log_probs, entropy


def _packed_response_log_probs(model, input_ids, attention_mask, response_start, temperature, with_entropy):
    # use_cache=False and no attention mask: transformers then masks attention per packed sequence
    # from the restarting position ids (see grpo_utils.algo.packing).
    rows = pack(input_ids, attention_mask, response_start)
    out = model(input_ids=rows.input_ids, position_ids=rows.position_ids, attention_mask=None, use_cache=False)
    # Only the logits that predict response tokens: the log-softmax never sees the prompts' positions.
    logits = out.logits[rows.logit_row, rows.logit_col]
    log_probs, entropy = _token_log_probs(logits, rows.target, temperature, with_entropy)
    return unpack(log_probs, rows), None if entropy is None else unpack(entropy, rows)


@torch.no_grad()
def batch_log_probs(model, batch, temperature: float, micro_batch_size: int, packed: bool = False) -> torch.Tensor:
    """Log-probs ``[B, T]`` of a batch's response tokens under ``model``, without gradients, in
    eval mode, ``micro_batch_size`` sequences at a time (the model's mode is restored).

    ``model`` may live on another device than the batch (a reference on a device of its own): each
    micro-batch's inputs go to the model's device and the result comes back to the batch's."""
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    batch_device = batch["input_ids"].device
    model_device = batch_device if param is None else param.device
    out = []
    for mb in batch.split(micro_batch_size):
        start = mb["input_ids"].shape[1] - mb["response_mask"].shape[1]
        ids, mask = mb["input_ids"].to(model_device), mb["attention_mask"].to(model_device)
        out.append(response_log_probs(model, ids, mask, start, temperature, packed=packed)[0].to(batch_device))
    model.train(was_training)
    return torch.cat(out)


def add_behaviour_log_probs(model, batch, temperature: float, micro_batch_size: int, packed: bool = False) -> None:
    """Set ``batch["old_log_probs"]``: the exact log-probs of the sampled response tokens under
    ``model`` (the weights that sampled). The trainer and the Ray collectors both call this.

    TorchRL's ``TransformersWrapper`` reports exactly 0 for the first sampled token's log-prob, so
    there the sampler's own ``rollout_log_probs`` (kept for the mismatch correction) get the exact
    value (vLLM reports the real one, which is left alone).
    """
    batch["old_log_probs"] = batch_log_probs(model, batch, temperature, micro_batch_size, packed)
    if "rollout_log_probs" in batch.keys():
        first = batch["rollout_log_probs"][:, 0]
        batch["rollout_log_probs"][:, 0] = torch.where(first == 0, batch["old_log_probs"][:, 0], first)
