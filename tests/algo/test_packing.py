"""Sequence packing (grpo_utils/algo/packing.py, train.packing): the layout by value, the
transformers behaviour it relies on, and packed log-probs, entropies, losses and optimizer steps
equal to the padded path's for sequences of very different lengths."""

from __future__ import annotations

import random

import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict

from grpo_utils.algo.advantages import group_advantages
from grpo_utils.algo.logprobs import batch_log_probs, response_log_probs
from grpo_utils.algo.packing import first_fit_rows, pack, padding_fraction, token_budget_groups, trim_padding, unpack
from grpo_utils.models.lora import apply_lora
from grpo_utils.models.tiny import build_model
from grpo_utils.rollout.group import response_mask
from grpo_utils.train.trainer import PolicyTrainer
from tests import helpers
from tests.algo.test_losses import PRESETS, build
from tests.helpers import EOS, train_cfg


def padded_batch(prompt_lengths, response_lengths, seed=0):
    return helpers.padded_batch(prompt_lengths, response_lengths, torch.Generator().manual_seed(seed))


def test_first_fit_rows_places_each_sequence_once_within_capacity():
    assert first_fit_rows([5, 2, 3, 1], 5) == [[0], [2, 1], [3]]
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 200) for _ in range(rng.randint(1, 40))]
        rows = first_fit_rows(lengths, max(lengths))
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= max(lengths) for row in rows)
        # first fit never leaves two rows that would fit in one
        totals = sorted(sum(lengths[i] for i in row) for row in rows)
        assert len(rows) == 1 or totals[0] + totals[1] > max(lengths) or len(rows) <= len(lengths)


def test_pack_layout_by_value():
    # prompts [a b] [c] [d e f], responses [1 2 3] [4] [5 6]; widths: prompt 3, response 3
    ids = torch.tensor([[0, 11, 12, 1, 2, 3],
                        [0, 0, 13, 4, 0, 0],
                        [14, 15, 16, 5, 6, 0]])
    attn = torch.tensor([[0, 1, 1, 1, 1, 1],
                         [0, 0, 1, 1, 0, 0],
                         [1, 1, 1, 1, 1, 0]])
    p = pack(ids, attn, response_start=3)
    # lengths 5, 2, 5 -> capacity 5: rows [seq 0], [seq 2], [seq 1 + filler]
    assert p.input_ids.tolist() == [[11, 12, 1, 2, 3], [14, 15, 16, 5, 6], [13, 4, 0, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 0, 1, 2]]
    assert p.target.tolist() == [1, 2, 3, 5, 6, 4]
    assert list(zip(p.logit_row.tolist(), p.logit_col.tolist())) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 0)]
    assert list(zip(p.out_row.tolist(), p.out_col.tolist())) == [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1), (1, 0)]
    assert unpack(p.target.float(), p).tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert padding_fraction(attn) == pytest.approx(1 - 12 / 18)


def test_transformers_masks_packed_sequences_only_without_a_cache(tok):
    """What packing relies on (transformers 5): restarting position ids and no attention mask give
    each sequence its own causal block, but only with use_cache=False; with a cache the mask is
    causal over the whole row and the second sequence sees the first."""
    model = build_model(tok, hidden_size=32, num_layers=2).eval()
    a, b = torch.randint(1, 200, (1, 7)), torch.randint(1, 200, (1, 5))
    ids = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    with torch.no_grad():
        alone = model(input_ids=b, use_cache=False).logits[0]
        packed = model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).logits[0, 7:]
        cached = model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=True).logits[0, 7:]
    assert (packed - alone).abs().max() < 1e-5
    assert (cached - alone).abs().max() > 1e-3


# prompt lengths 1..40, response lengths 1..200: one-token sequences next to 200-token ones
PROMPTS = [1, 40, 7, 3, 25, 12, 2, 30]
RESPONSES = [200, 1, 57, 3, 120, 9, 2, 180]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_packed_log_probs_and_entropies_equal_the_padded_ones(tok, lora):
    model = build_model(tok, hidden_size=64, num_layers=2, max_positions=512).eval()
    if lora:
        model = apply_lora(model, OmegaConf.create({"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0,
                                                    "target_modules": ["q_proj", "v_proj"]}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    ids, attn, start = padded_batch(PROMPTS, RESPONSES)
    mask = response_mask(ids[:, start:], EOS)
    assert mask.sum(-1).tolist() == RESPONSES
    with torch.no_grad():
        ref_lp, ref_ent = response_log_probs(model, ids, attn, start, 0.7, with_entropy=True)
        lp, ent = response_log_probs(model, ids, attn, start, 0.7, with_entropy=True, packed=True)
    assert (lp - ref_lp)[mask].abs().max() < 1e-5
    assert (ent - ref_ent)[mask].abs().max() < 1e-5
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all()
    # the no-grad batch path (behaviour and reference log-probs), in micro-batches of 3
    batch = TensorDict({"input_ids": ids, "attention_mask": attn, "response_mask": mask}, batch_size=[len(PROMPTS)])
    packed = batch_log_probs(model, batch, 0.7, micro_batch_size=3, packed=True)
    assert (packed - ref_lp)[mask].abs().max() < 1e-5


def training_batch(model, temperature):
    ids, attn, start = padded_batch(PROMPTS, RESPONSES, seed=1)
    mask = response_mask(ids[:, start:], EOS)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        current, _ = response_log_probs(model, ids, attn, start, temperature)
    noise = (torch.rand(current.shape, generator=g) - 0.5) * 0.6
    old = torch.where(mask, current + noise, torch.zeros_like(current))
    ref = torch.where(mask, current - noise / 2, torch.zeros_like(current))
    return TensorDict({"input_ids": ids, "attention_mask": attn, "response_mask": mask,
                       "advantage": group_advantages(rewards, 4, "group_std", 1e-6).float(),
                       "old_log_probs": old, "ref_log_probs": ref, "rollout_log_probs": old.clone()},
                      batch_size=[len(PROMPTS)])


def step_with_gradients(trainer: PolicyTrainer, batch: TensorDict) -> tuple[dict, dict]:
    """One optimizer step's metrics and the accumulated gradients it stepped with."""
    grads = {}
    step = trainer.optimizer.step

    def record_then_step(*args, **kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()})
        return step(*args, **kwargs)

    trainer.optimizer.step = record_then_step
    return trainer.optimizer_step(batch), grads


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("preset", PRESETS)
def test_packed_optimizer_step_equals_the_padded_one(tok, preset):
    """Every loss preset (with a KL term and the mismatch correction's inputs present), with gradient
    accumulation: the same loss, metrics and gradients, and after the AdamW step the same weights."""
    results = []
    for packing in (False, True):
        model = build_model(tok, hidden_size=64, num_layers=2, max_positions=512)
        trainer = PolicyTrainer(model, build(preset, kl_coef=0.05, entropy_coef=0.01),
                                train_cfg(grad_accum_steps=2, packing=packing), temperature=0.9)
        metrics, grads = step_with_gradients(trainer, training_batch(model, 0.9))
        results.append((metrics, grads, {k: v.detach().clone() for k, v in model.named_parameters()}))
    (m_pad, g_pad, w_pad), (m_pack, g_pack, w_pack) = results
    scale = max(g.abs().max().item() for g in g_pad.values())
    assert scale > 0
    assert max((g_pad[k] - g_pack[k]).abs().max().item() for k in g_pad) < 1e-5 * scale
    # AdamW's first step moves every weight by about lr: agreement to a few percent of that
    assert max((w_pad[k] - w_pack[k]).abs().max().item() for k in w_pad) < 1e-5
    for key in m_pad:
        if not key.startswith("time/"):
            assert m_pack[key] == pytest.approx(m_pad[key], rel=1e-4, abs=1e-6), key


# ----------------------------------------------------------------------------- token budgets


def test_token_budget_groups_stay_within_the_budget():
    lengths = [10, 200, 3, 50, 50, 7, 120, 1]
    for packed in (True, False):
        for budget in (1, 60, 200, 450):
            for parts in (1, 2, 4):
                groups = token_budget_groups(lengths, budget, packed, parts)
                assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
                assert len(groups) % parts == 0
                for g in groups:
                    cost = sum(lengths[i] for i in g) if packed else len(g) * max(lengths[i] for i in g)
                    assert cost <= budget or len(g) == 1
    # by value: longest first, each group filled greedily
    assert token_budget_groups(lengths, 200, packed=True) == [[1], [6, 3], [4, 0, 5, 2, 7]]
    assert token_budget_groups([5, 5, 5, 5], 10, packed=False) == [[0, 1], [2, 3]]
    assert token_budget_groups([5, 5, 5, 5], 10, packed=True) == [[0, 1], [2, 3]]
    assert token_budget_groups([8, 2, 2], 10, packed=True) == [[0, 1], [2]]
    assert token_budget_groups([8, 2, 2], 10, packed=False) == [[0], [1, 2]]
    assert token_budget_groups([8, 2, 2, 2], 100, packed=True, parts=2) == [[0, 1], [2, 3]]


def test_trim_padding_drops_all_padding_columns_only():
    ids, attn, start = padded_batch([2, 5, 3], [4, 1, 2])
    mask = response_mask(ids[:, start:], EOS)
    batch = TensorDict({"input_ids": ids, "attention_mask": attn, "response_mask": mask,
                        "old_log_probs": torch.randn(mask.shape), "advantage": torch.ones(3)}, batch_size=[3])
    short = trim_padding(batch[torch.tensor([0, 2])])  # prompts 2 and 3 tokens, responses 4 and 2
    assert short["input_ids"].shape == (2, 3 + 4) and short["response_mask"].shape == (2, 4)
    assert short["old_log_probs"].shape == (2, 4) and short["advantage"].shape == (2,)
    assert (short["input_ids"] == ids[[0, 2]][:, start - 3:start + 4]).all()
    assert (short["old_log_probs"] == batch["old_log_probs"][[0, 2], :4]).all()
    assert trim_padding(batch[torch.tensor([1])])["input_ids"].shape == (1, 5 + 1)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_token_budget_micro_batches_take_the_one_batch_step(tok, packing):
    """Micro-batches of at most 300 tokens (several of them, of different sizes) accumulate the
    gradient one micro-batch of the whole mini-batch gives, and log the same metrics."""
    results = []
    for budget in (None, 300):
        model = build_model(tok, hidden_size=64, num_layers=2, max_positions=512)
        trainer = PolicyTrainer(model, build("grpo", kl_coef=0.05),
                                train_cfg(packing=packing, max_tokens_per_micro_batch=budget), temperature=0.9)
        batch = training_batch(model, 0.9)
        if budget:
            groups = trainer.micro_batches(batch)
            assert len(groups) >= 3 and sum(len(g) for g in groups) == len(batch)
        results.append(step_with_gradients(trainer, batch))
    (m_one, g_one), (m_budget, g_budget) = results
    scale = max(g.abs().max().item() for g in g_one.values())
    assert max((g_one[k] - g_budget[k]).abs().max().item() for k in g_one) < 1e-5 * scale
    # every logged metric is the mini-batch's, however it was split
    assert m_budget.keys() == m_one.keys()
    for key in m_one:
        if not key.startswith("time/"):
            assert m_budget[key] == pytest.approx(m_one[key], rel=1e-5, abs=1e-7), key
