"""Exactness of behaviour log-probs and response masks.

Every check compares the library against an independent computation: log-probs against one
unpadded sequence at a time through the Hugging Face model. (Gradient accumulation and the
optimizer are in tests/train/test_trainer.py.)
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from grpo_utils.algo.advantages import AdvantageStage, group_advantages
from grpo_utils.algo.logprobs import position_ids_from_mask, response_log_probs
from grpo_utils.algo.losses import ClippedSurrogateLoss
from grpo_utils.data.datasets import quickstart_rows
from grpo_utils.data.prompts import PromptRenderer, PromptStream
from grpo_utils.inference.transformers import generation_kwargs
from grpo_utils.models.tiny import build_model
from grpo_utils.rewards import RewardFunction
from grpo_utils.rollout.group import GroupRollout, response_mask
from grpo_utils.train.trainer import PolicyTrainer
from tests.helpers import EOS, PAD, train_cfg

GROUP = 4


def eos_prone_model(tok, eos_scale: float = 20.0):
    """A tiny random model whose EOS logit is inflated, so sampled completions end at ragged
    lengths (a plain random model almost never samples EOS in 6 tokens)."""
    model = build_model(tok, hidden_size=32, num_layers=1).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[EOS] *= eos_scale  # tied: also scales the EOS logit
    return model


def make_rollout(model, tok, temperature: float) -> GroupRollout:
    gen_cfg = OmegaConf.create({"max_new_tokens": 6, "min_new_tokens": 0, "temperature": temperature,
                                "top_p": 1.0, "top_k": 0})
    return GroupRollout(model, tok, PromptRenderer(tok, "{question}", None, True),
                        RewardFunction("numeric_answer"), generation_kwargs(gen_cfg),
                        group_size=GROUP,
                        stream=PromptStream(prompt_rows(), 1, seed=0))


def collect_rows(rollout: GroupRollout, rows, **kwargs):
    """One rollout over exactly ``rows`` (in order), each repeated GROUP times."""
    rollout.stream = PromptStream(rows, len(rows), seed=0, shuffle=False)
    return rollout.collect(**kwargs)


def prompt_rows():
    # quickstart rows of three different lengths, so prompts are left padded
    return [quickstart_rows(1, seed=0, num_digits=n)[0] for n in (1, 4, 8)]


def pad_before_eos(batch) -> bool:
    """Whether a sampled completion contains the pad token before its first EOS."""
    width = batch["response_mask"].shape[1]
    for resp in batch["input_ids"][:, -width:].tolist():
        end = resp.index(EOS) if EOS in resp else len(resp)
        if PAD in resp[:end]:
            return True
    return False


def collect_clean_ragged_batch(rollout):
    """First seed whose batch has ragged lengths and no sampled pad token before EOS."""
    for seed in range(40):
        torch.manual_seed(seed)
        batch, stats = collect_rows(rollout, prompt_rows())
        lengths = batch["response_mask"].sum(-1)
        if not pad_before_eos(batch) and lengths.min() < lengths.max():
            return batch, stats
    pytest.fail("no seed gave a ragged batch without a sampled pad token")


@torch.no_grad()
def reference_log_probs(model, prompt_ids: list[int], response_ids: list[int], temperature: float):
    """One unpadded sequence through the HF model: log_softmax(logits / T) gathered at the targets."""
    full = torch.tensor([prompt_ids + response_ids])
    logits = model(input_ids=full).logits[0].double()
    logits = logits[len(prompt_ids) - 1: -1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response_ids)[:, None]).squeeze(-1)


def check_against_reference(model, batch, log_probs, temperature, tok, rows):
    width = batch["response_mask"].shape[1]
    prompt_width = batch["input_ids"].shape[1] - width
    checked = 0
    for i in range(batch.shape[0]):
        mask = batch["response_mask"][i]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # a prefix: up to and including EOS
        pmask = batch["attention_mask"][i, :prompt_width].bool()
        prompt_ids = batch["input_ids"][i, :prompt_width][pmask].tolist()
        # the prompt is exactly the rendered row, left padded
        row = rows[i // GROUP]
        text = tok.apply_chat_template([{"role": "user", "content": row["question"]}], tokenize=False,
                                       add_generation_prompt=True)
        assert prompt_ids == tok(text, add_special_tokens=False)["input_ids"]
        assert not pmask[:prompt_width - len(prompt_ids)].any()
        response_ids = batch["input_ids"][i, prompt_width:prompt_width + n].tolist()
        ref = reference_log_probs(model, prompt_ids, response_ids, temperature)
        got = log_probs[i, :n].double()
        assert torch.allclose(got, ref, atol=1e-5, rtol=0), (i, (got - ref).abs().max().item())
        assert got[0] < 0 and abs(got[0] - ref[0]) < 1e-5  # the first response token is NOT zeroed
        checked += n
    return checked


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_log_probs_match_unpadded_forward(tok, temperature):
    model = eos_prone_model(tok)
    rollout = make_rollout(model, tok, temperature)
    batch, stats = collect_clean_ragged_batch(rollout)
    rows = prompt_rows()
    assert batch.shape[0] == 3 * GROUP
    width = batch["response_mask"].shape[1]
    prompt_width = batch["input_ids"].shape[1] - width
    prompt_lengths = batch["attention_mask"][:, :prompt_width].sum(-1)
    assert len(set(prompt_lengths.tolist())) == 3  # left padding happened
    lengths = batch["response_mask"].sum(-1)
    assert stats["response_length/mean"] == pytest.approx(lengths.float().mean().item())
    assert stats["response_length/max"] == lengths.max().item()
    # a truncated completion has no EOS and fills the width; a finished one ends with EOS
    resp = batch["input_ids"][:, prompt_width:]
    for i in range(batch.shape[0]):
        n = int(lengths[i])
        assert (resp[i, n - 1] == EOS) or (n == width and EOS not in resp[i].tolist())
    assert stats["truncated_fraction"] == pytest.approx((~(resp == EOS).any(-1)).float().mean().item())

    log_probs, entropy = response_log_probs(model, batch["input_ids"], batch["attention_mask"], prompt_width,
                                            temperature, with_entropy=True)
    assert log_probs.shape == batch["response_mask"].shape
    checked = check_against_reference(model, batch, log_probs, temperature, tok, rows)
    assert checked == int(lengths.sum())

    # entropy of the tempered distribution at the first response position, computed directly
    i = 0
    pmask = batch["attention_mask"][i, :prompt_width].bool()
    prompt_ids = batch["input_ids"][i, :prompt_width][pmask].tolist()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].double() / temperature
    p = torch.softmax(logits, -1)
    assert entropy[i, 0].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-5)

    # the trainer's annotate path (micro-batched) gives the same behaviour log-probs
    trainer = PolicyTrainer(model, ClippedSurrogateLoss(), train_cfg(), temperature=temperature)
    annotated = batch.clone()
    trainer.annotate(annotated, need_behaviour=True, micro_batch_size=5)
    check_against_reference(model, batch, annotated["old_log_probs"], temperature, tok, rows)
    assert not model.training


def test_rollout_rewards_and_groups(tok):
    model = eos_prone_model(tok)
    rollout = make_rollout(model, tok, 1.0)
    torch.manual_seed(0)
    rows = prompt_rows()
    batch, stats = collect_rows(rollout, rows, policy_version=3)
    width = batch["response_mask"].shape[1]
    resp = batch["input_ids"][:, -width:]
    texts = [tok.decode(r[m], skip_special_tokens=True) for r, m in zip(resp, batch["response_mask"])]
    expected = [RewardFunction("numeric_answer")([t], [rows[i // GROUP]])[0][0]["reward"] for i, t in enumerate(texts)]
    assert batch["reward"].tolist() == expected
    AdvantageStage("grpo", "group_std", 1e-6, GROUP)(batch)
    assert torch.allclose(batch["advantage"], group_advantages(batch["reward"], GROUP, "group_std", 1e-6))
    assert batch["policy_version"].tolist() == [3] * (3 * GROUP)
    # groups are contiguous: the G samples of a prompt share the same prompt ids
    for g in range(3):
        block = batch["input_ids"][g * GROUP:(g + 1) * GROUP, :-width]
        assert (block == block[0]).all()
    assert stats["reward/failures"] == 0.0


# ----------------------------------------------------------------------------- response_mask


def test_response_mask_up_to_and_including_first_eos():
    resp = torch.tensor([
        [5, 6, EOS, PAD, PAD],
        [EOS, PAD, PAD, PAD, PAD],
        [5, 6, 7, 8, 9],  # truncated: no EOS
        [5, EOS, 7, EOS, PAD],  # tokens after the first EOS are never part of the response
    ])
    expected = [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert response_mask(resp, EOS).long().tolist() == expected
    assert response_mask(resp, [EOS]).long().tolist() == expected
    assert response_mask(resp, EOS).dtype == torch.bool
    # several stop ids (Qwen stops on <|im_end|> and <|endoftext|>): the first one ends the response
    assert response_mask(torch.tensor([[5, 9, 6, EOS]]), [EOS, 9]).long().tolist() == [[1, 1, 0, 0]]


def test_response_mask_keeps_sampled_pad_token_before_eos():
    resp = torch.tensor([[5, PAD, 7, EOS, PAD]])
    assert response_mask(resp, EOS).long().tolist() == [[1, 1, 1, 1, 0]]


def test_log_probs_after_sampled_pad_token_match_sampler(tok, monkeypatch):
    model = eos_prone_model(tok)
    rollout = make_rollout(model, tok, 1.0)
    sampled = torch.tensor([[40, PAD, 41, 42, EOS, PAD]] * GROUP)  # what generate() returned
    real_generate = rollout.generate

    def fake_generate(rows, seed_key=()):
        prompt, prompt_mask, _ = real_generate(rows)
        return prompt, prompt_mask, sampled

    monkeypatch.setattr(rollout, "generate", fake_generate)
    row = prompt_rows()[1]
    batch, _ = collect_rows(rollout, [row])
    width = sampled.shape[1]
    prompt_width = batch["input_ids"].shape[1] - width
    log_probs, _ = response_log_probs(model, batch["input_ids"], batch["attention_mask"], prompt_width)
    prompt_ids = batch["input_ids"][0, :prompt_width][batch["attention_mask"][0, :prompt_width].bool()].tolist()
    ref = reference_log_probs(model, prompt_ids, sampled[0, :5].tolist(), 1.0)
    assert torch.allclose(log_probs[0, :5].double(), ref, atol=1e-5)


# ----------------------------------------------------------------------------- position ids


def test_position_ids_from_mask_counts_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]
