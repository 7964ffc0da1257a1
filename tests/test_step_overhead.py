"""The per-step shortcuts give exactly what the straightforward code gave: the generation fast
path (same tokens, same random draws), the prompt gather and the prefix decode."""

from __future__ import annotations

import pytest
import tensordict
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict

from grpo_utils.data.datasets import quickstart_rows
from grpo_utils.data.prompts import PromptRenderer, PromptStream
from grpo_utils.models.tiny import build_model, build_tokenizer
from grpo_utils.rewards import RewardFunction
from grpo_utils.rollout.group import GroupRollout, generate_tokens, generation_kwargs, left_pad, make_generator

tensordict.set_list_to_stack(True).set()
GEN = OmegaConf.create(dict(max_new_tokens=6, min_new_tokens=0, temperature=0.8, top_p=1.0, top_k=0))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    model = build_model(tok, hidden_size=32, num_layers=1).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[tok.eos_token_id] *= 20.0  # ragged completions
    return model


@pytest.mark.parametrize("log_probs", [False, True])
def test_generate_tokens_equals_the_wrappers_forward(model, tok, log_probs):
    gen = make_generator(model, tok, generation_kwargs(GEN), return_log_probs=log_probs)
    prompt, mask = left_pad([torch.tensor([5, 6, 7]), torch.tensor([8, 9]), torch.tensor([10, 11, 12, 13])] * 3,
                            tok.pad_token_id)
    torch.manual_seed(0)
    ref = gen(TensorDict({"tokens": {"prompt": prompt}, "attention_mask": mask}, batch_size=[len(prompt)]))
    after_ref = torch.rand(1)
    torch.manual_seed(0)
    got = generate_tokens(gen, prompt, mask)
    assert torch.equal(torch.rand(1), after_ref)  # the same random draws
    assert torch.equal(got["tokens", "response"], ref["tokens", "response"])
    if log_probs:
        assert torch.equal(got["log_probs", "response"], ref["log_probs", "response"])


def test_rollout_prompts_and_completions_as_padding_and_decoding_every_row(model, tok):
    rows = [quickstart_rows(1, seed=0, num_digits=n)[0] for n in (1, 4, 8)]
    renderer = PromptRenderer(tok, "{question}", None, True)
    rollout = GroupRollout(model, tok, renderer, RewardFunction("numeric_answer"), generation_kwargs(GEN), 4,
                           PromptStream(rows, 3, seed=0))
    grouped = [row for row in rows for _ in range(4)]
    ids, mask = rollout.encode_prompts(grouped)
    ref_ids, ref_mask = left_pad([torch.tensor(tok(renderer(r), add_special_tokens=False)["input_ids"])
                                  for r in grouped], tok.pad_token_id)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    torch.manual_seed(1)
    part = rollout._sample_scored()
    lengths = part["response_mask"].sum(-1)
    assert lengths.min() < lengths.max()  # ragged: the prefix decode is exercised
    texts = tok.batch_decode([r[m] for r, m in zip(part["response"], part["response_mask"])],
                             skip_special_tokens=True)
    expected = [rollout.reward_fn([t], [row])[0][0]["reward"] for t, row in zip(texts, grouped)]
    assert part["reward"].tolist() == expected
