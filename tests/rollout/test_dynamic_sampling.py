"""DAPO's rollout-level parts inside GroupRollout.collect: dynamic sampling refills the batch
from extra generation rounds (re-padding across rounds), and the soft overlong penalty."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from grpo_utils.algo.shaping import RolloutShaping
from grpo_utils.data.datasets import quickstart_rows
from grpo_utils.data.prompts import PromptRenderer, PromptStream
from grpo_utils.inference.transformers import generation_kwargs
from grpo_utils.models.tiny import build_model
from grpo_utils.rewards import RewardFunction
from grpo_utils.rollout.group import GroupRollout
from tests.helpers import EOS, PAD

G, P = 2, 3


@pytest.fixture(scope="module")
def rollout(tok):
    gen = OmegaConf.create(dict(max_new_tokens=10, min_new_tokens=0, temperature=1.0, top_p=1.0, top_k=0))
    return GroupRollout(build_model(tok, hidden_size=16, num_layers=1), tok, PromptRenderer(tok, "{question}", None, True),
                        RewardFunction("numeric_answer"), generation_kwargs(gen), G,
                        PromptStream(quickstart_rows(12, seed=0), P, seed=0))


def fake_round(tag: int, rewards: list[float], prompt_w: int, resp_w: int) -> dict:
    """A generation round of P groups: prompt ids = tag, response = tag+1 up to an EOS."""
    n = len(rewards)
    prompt = torch.full((n, prompt_w), tag)
    response = torch.full((n, resp_w), tag + 1)
    response[:, -1] = EOS
    rows = [{"question": f"q{tag}-{i // G}", "answer": "0"} for i in range(n)]
    return {"rows": rows, "prompt": prompt, "prompt_mask": torch.ones_like(prompt), "response": response,
            "response_mask": torch.ones_like(response, dtype=torch.bool), "failures": 0,
            "scores": [{"reward": r, "correct": r} for r in rewards], "reward": torch.tensor(rewards, dtype=torch.float32)}


def test_dynamic_sampling_refills_from_later_rounds(rollout, monkeypatch):
    rounds = iter([
        fake_round(10, [1, 1, 0, 1, 0, 0], prompt_w=4, resp_w=3),  # only group 1 varies
        fake_round(20, [0, 1, 1, 1, 1, 0], prompt_w=6, resp_w=2),  # groups 0 and 2 vary
    ])
    monkeypatch.setattr(rollout, "_sample_scored", lambda: next(rounds))
    batch, stats = rollout.collect(shaping=RolloutShaping(dynamic_sampling=True, max_resample_rounds=3))
    assert stats["dynamic_sampling/groups_dropped"] == 3 and stats["dynamic_sampling/rounds"] == 2
    assert batch["reward"].tolist() == [0, 1, 0, 1, 1, 0]  # round-1 group 1, round-2 groups 0 and 2
    ids = batch["input_ids"]
    assert ids.shape == (6, 6 + 3)
    # round-1 group: prompt left padded by 2, response right padded by 1 and masked there
    assert ids[0].tolist() == [PAD, PAD, 10, 10, 10, 10, 11, 11, EOS]
    assert batch["attention_mask"][0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert ids[2].tolist() == [20] * 6 + [21, EOS, PAD]
    assert batch["response_mask"][2].tolist() == [True, True, False]
    assert batch["attention_mask"][2].tolist() == [1] * 8 + [0]


def test_dynamic_sampling_tops_up_with_dropped_groups_when_rounds_run_out(rollout, monkeypatch):
    monkeypatch.setattr(rollout, "_sample_scored", lambda: fake_round(10, [1, 1, 0, 1, 0, 0], 4, 3))
    batch, stats = rollout.collect(shaping=RolloutShaping(dynamic_sampling=True, max_resample_rounds=0))
    assert batch.batch_size == torch.Size([P * G])  # size never changes
    assert batch["reward"].tolist() == [0, 1, 1, 1, 0, 0]  # kept group first, then dropped ones
    assert stats["dynamic_sampling/groups_dropped"] == 2


def test_soft_overlong_penalty_is_added_to_the_reward(rollout, monkeypatch):
    part = fake_round(10, [1, 1, 0, 0, 1, 0], 4, 10)
    part["response"][0] = 11  # 10 tokens, no EOS: truncated -> -1
    part["response"][2, 8:] = torch.tensor([EOS, PAD])  # length 9, in the last 2 tokens: -(9-8)/2
    part["response_mask"][2, 9] = False
    monkeypatch.setattr(rollout, "_sample_scored", lambda: part)
    batch, _ = rollout.collect(shaping=RolloutShaping(overlong_penalty=1.0, overlong_cache_len=2))
    assert batch["truncated"].tolist() == [True, False, False, False, False, False]
    assert batch["reward"].tolist() == pytest.approx([0.0, 1.0 - 1.0, -0.5, 0.0 - 1.0, 1.0 - 1.0, -1.0])
