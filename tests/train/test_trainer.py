"""Exactness of gradient accumulation, gradient clipping and the optimizer.

Every check compares the library against an independent computation: gradients against a
hand-written loss, the optimizer against the AdamW update rule, the schedule against the
closed form.
"""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

from grpo_utils.algo.advantages import group_advantages
from grpo_utils.algo.logprobs import response_log_probs
from grpo_utils.algo.losses import ClippedSurrogateLoss
from grpo_utils.models.tiny import build_model
from grpo_utils.rollout.group import response_mask
from grpo_utils.train.trainer import PolicyTrainer, make_optimizer, warmup_cosine
from tests.helpers import EOS, padded_batch, train_cfg

PROMPT_LENGTHS = [3, 9, 5, 7, 4, 8, 6, 9]
RESPONSE_LENGTHS = [5, 1, 3, 5, 2, 4, 5, 3]  # ragged; < 5 means it ended with EOS


def synthetic_batch(model, temperature: float) -> TensorDict:
    """Left-padded prompts, ragged responses, advantages of both signs and behaviour log-probs
    that differ from the current policy (ratios inside and outside the clip range)."""
    g = torch.Generator().manual_seed(0)
    ids, attn, width_p = padded_batch(PROMPT_LENGTHS, RESPONSE_LENGTHS, g)
    b = len(PROMPT_LENGTHS)
    resp_mask = response_mask(ids[:, width_p:], EOS)
    assert resp_mask.sum(-1).tolist() == RESPONSE_LENGTHS
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    with torch.no_grad():
        current, _ = response_log_probs(model, ids, attn, width_p, temperature)
    noise = (torch.rand(current.shape, generator=g) - 0.5) * 0.8  # |log ratio| up to 0.4
    old = torch.where(resp_mask, current.double() + noise.double(), torch.full_like(current.double(), -3.0))
    return TensorDict({"input_ids": ids, "attention_mask": attn, "response_mask": resp_mask,
                       "advantage": group_advantages(rewards, 4, "group_std", 1e-6),
                       "old_log_probs": old}, batch_size=[b])


def reference_gradient(model, batch, temperature, aggregation, eps=0.2):
    """The GRPO clipped-surrogate gradient written out independently, sequence by sequence."""
    model.zero_grad(set_to_none=True)
    width = batch["response_mask"].shape[1]
    prompt_width = batch["input_ids"].shape[1] - width
    total_tokens = int(batch["response_mask"].sum())
    losses = []
    for i in range(batch.shape[0]):
        n = int(batch["response_mask"][i].sum())
        amask = batch["attention_mask"][i].bool()
        seq = batch["input_ids"][i][amask]
        p_len = int(batch["attention_mask"][i, :prompt_width].sum())
        logits = model(input_ids=seq[None]).logits[0, p_len - 1:p_len - 1 + n] / temperature
        logp = torch.log_softmax(logits, -1).gather(-1, seq[p_len:p_len + n, None]).squeeze(-1)
        ratio = torch.exp(logp - batch["old_log_probs"][i, :n])
        a = batch["advantage"][i]
        per_token = -torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
        if aggregation == "token_mean":
            losses.append(per_token.sum() / total_tokens)
        else:  # seq_mean_token_mean
            losses.append(per_token.mean() / batch.shape[0])
    loss = torch.stack(losses).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def trainer_gradient(model, batch, temperature, aggregation, accum, monkeypatch, **cfg):
    model.zero_grad(set_to_none=True)
    trainer = PolicyTrainer(model, ClippedSurrogateLoss(aggregation=aggregation),
                            train_cfg(grad_accum_steps=accum, **cfg), temperature=temperature)
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: None)
    monkeypatch.setattr(trainer.optimizer, "zero_grad", lambda *a, **k: None)
    metrics = trainer.optimizer_step(batch)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return metrics, grads


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_gradient_accumulation_is_exact(tok, monkeypatch, aggregation):
    temperature = 0.7
    model = build_model(tok, hidden_size=32, num_layers=1).double()
    batch = synthetic_batch(model, temperature)
    ref_loss, ref = reference_gradient(model, batch, temperature, aggregation)
    # the batch really exercises clipping: some ratios are outside [0.8, 1.2] on valid tokens
    with torch.no_grad():
        cur, _ = response_log_probs(model, batch["input_ids"], batch["attention_mask"], 9, temperature)
    ratio = (cur.double() - batch["old_log_probs"]).exp()[batch["response_mask"]]
    assert ((ratio < 0.8) | (ratio > 1.2)).any() and ((ratio > 0.8) & (ratio < 1.2)).any()

    results = {k: trainer_gradient(model, batch, temperature, aggregation, k, monkeypatch) for k in (1, 2, 4, 8)}
    norm = math.sqrt(sum(g.pow(2).sum().item() for g in ref.values()))
    assert norm > 1e-3  # a real, non-zero gradient
    for k, (metrics, grads) in results.items():
        assert max_diff(grads, ref) < 1e-6, (k, max_diff(grads, ref))
        assert max_diff(grads, results[1][1]) < 1e-6, k
        assert metrics["loss"] == pytest.approx(ref_loss, abs=1e-6)
        assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-6)
        assert metrics["lr"] == pytest.approx(1e-3 * 0.5)  # warmup step 0 of 2


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_gradient_clipping_rescales_to_max_norm(tok, monkeypatch):
    model = build_model(tok, hidden_size=32, num_layers=1).double()
    batch = synthetic_batch(model, 1.0)
    _, ref = reference_gradient(model, batch, 1.0, "token_mean")
    norm = math.sqrt(sum(g.pow(2).sum().item() for g in ref.values()))
    max_norm = norm / 4
    metrics, grads = trainer_gradient(model, batch, 1.0, "token_mean", 2, monkeypatch, max_grad_norm=max_norm)
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-6)  # reported before clipping
    clipped_norm = math.sqrt(sum(g.pow(2).sum().item() for g in grads.values()))
    assert clipped_norm == pytest.approx(max_norm, rel=1e-5)
    for k in ref:
        assert torch.allclose(grads[k], ref[k] * (max_norm / norm), atol=1e-7, rtol=1e-4)


def test_optimizer_step_updates_weights_and_schedule(tok):
    model = build_model(tok, hidden_size=32, num_layers=1).double()
    batch = synthetic_batch(model, 1.0)
    trainer = PolicyTrainer(model, ClippedSurrogateLoss(), train_cfg(lr=1e-2, warmup_steps=2, max_steps=6,
                                                                     min_lr_ratio=0.0, grad_accum_steps=2), 1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lrs = [trainer.optimizer_step(batch)["lr"] for _ in range(7)]
    assert lrs == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2 * 0.5 * (1 + math.cos(math.pi * 0.25)), 5e-3,
                                 1e-2 * 0.5 * (1 + math.cos(math.pi * 0.75)), 0.0], abs=1e-12)
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True) after the step
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "model.embed_tokens.weight" in moved and len(moved) == len(before)
    state = trainer.state_dict()
    assert state["scheduler"]["last_epoch"] == 7


def test_make_optimizer_is_adamw_with_decoupled_decay(tok):
    model = build_model(tok, hidden_size=32, num_layers=1).double()
    lr, wd = 0.1, 0.5
    opt = make_optimizer(model, lr=lr, weight_decay=wd, betas=(0.9, 0.99), eps=1e-8)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == wd and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.9, 0.99) and decay["eps"] == 1e-8 and decay["lr"] == lr
    assert no_decay["params"] and all(p.ndim == 1 for p in no_decay["params"])
    assert decay["params"] and all(p.ndim >= 2 for p in decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "model.norm.weight" in no_decay_names and "model.layers.0.self_attn.q_proj.bias" in no_decay_names
    assert "model.embed_tokens.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))

    # Decoupled: with a zero gradient the Adam term is 0, so decayed weights shrink by exactly
    # (1 - lr * wd) and the others do not move. (L2-in-the-gradient Adam would move both by ~lr.)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if n in no_decay_names:
            assert torch.equal(p, before[n]), n
        else:
            assert torch.allclose(p, before[n] * (1 - lr * wd), rtol=1e-12, atol=0), n


def test_warmup_cosine_values():
    f = warmup_cosine(warmup_steps=5, total_steps=65, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.2)  # linear warmup starts at 1 / warmup_steps, not 0
    assert f(4) == pytest.approx(1.0)  # end of warmup
    assert f(5) == pytest.approx(1.0)  # cosine starts at the peak
    assert f(20) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(35) == pytest.approx(0.55)  # halfway through the decay
    assert f(65) == pytest.approx(0.1)  # end
    assert f(1000) == pytest.approx(0.1)  # stays at the floor
    values = [f(s) for s in range(5, 66)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    g = warmup_cosine(warmup_steps=0, total_steps=10, min_lr_ratio=0.0)
    assert g(0) == pytest.approx(1.0) and g(5) == pytest.approx(0.5) and g(10) == pytest.approx(0.0)
