"""The per-step shortcuts give exactly what the straightforward code gave: the generation fast
path, the prompt gather, the prefix decode and the reused replay buffer (same mini-batches, same
random draws as a fresh buffer per batch); and the host-memory thresholds are set once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tensordict
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict

from grpo_utils.algo.losses import ClippedSurrogateLoss
from grpo_utils.data.datasets import quickstart_rows
from grpo_utils.data.prompts import PromptRenderer, PromptStream
from grpo_utils.inference.transformers import generate_tokens, generation_kwargs, make_generator
from grpo_utils.models.tiny import build_model, build_tokenizer
from grpo_utils.rewards import RewardFunction
from grpo_utils.rollout.group import GroupRollout, left_pad
from grpo_utils.train.trainer import PolicyTrainer

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


def make_batch(n: int, prompt_width: int, g: torch.Generator, extra: bool = False) -> TensorDict:
    ids = torch.randint(1, 250, (n, prompt_width + 4), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": torch.ones(n, 4, dtype=torch.bool),
            "advantage": torch.randn(n, generator=g)}
    if extra:
        data["old_log_probs"] = -torch.rand(n, 4, generator=g)
    return TensorDict(data, batch_size=[n])


def fresh_buffer_minibatches(batch: TensorDict, size: int, epochs: int) -> list[TensorDict]:
    """What train_on_batch sampled before the buffer was reused: a new buffer per batch."""
    from torchrl.data import LazyTensorStorage, ReplayBuffer, SamplerWithoutReplacement

    buffer = ReplayBuffer(storage=LazyTensorStorage(len(batch)), sampler=SamplerWithoutReplacement(), batch_size=size)
    buffer.extend(batch)
    return [buffer.sample() for _ in range(epochs * len(batch) // size)]


def test_reused_replay_buffer_draws_what_a_fresh_one_draws(tok, monkeypatch):
    g = torch.Generator().manual_seed(0)
    # same layout twice (reused), a wider prompt (rebuilt), an extra key (rebuilt), then reused again
    batches = [make_batch(8, 5, g), make_batch(8, 5, g), make_batch(8, 7, g), make_batch(8, 7, g, extra=True),
               make_batch(8, 7, g, extra=True)]
    cfg = OmegaConf.create({"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.99], "adam_eps": 1e-8,
                            "max_grad_norm": 1.0, "warmup_steps": 0, "max_steps": 10, "min_lr_ratio": 0.0,
                            "grad_accum_steps": 1, "optim_batch_size": 2, "epochs": 2})
    trainer = PolicyTrainer(build_model(tok, hidden_size=16, num_layers=1), ClippedSurrogateLoss(), cfg, 1.0)
    seen: list[TensorDict] = []

    def record(minibatch):
        seen.append(minibatch.clone())
        return {"time/train_s": 0.0}

    monkeypatch.setattr(trainer, "optimizer_step", record)
    torch.manual_seed(0)
    buffers = []
    for batch in batches:
        assert len(list(trainer.train_on_batch(batch, 1.0))) == 8
        buffers.append(trainer._buffer)
    after = torch.rand(1)
    assert buffers[0] is buffers[1] and buffers[1] is not buffers[2] and buffers[3] is buffers[4]

    torch.manual_seed(0)
    expected = [mb for batch in batches for mb in fresh_buffer_minibatches(batch, 2, 2)]
    assert torch.equal(torch.rand(1), after)  # the same global random draws, in the same order
    assert len(seen) == len(expected)
    for got, ref in zip(seen, expected):
        assert set(got.keys()) == set(ref.keys())
        assert all(torch.equal(got[k], ref[k]) for k in ref.keys())


def test_a_new_batch_ends_the_previous_iteration(tok, monkeypatch):
    cfg = OmegaConf.create({"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.99], "adam_eps": 1e-8,
                            "max_grad_norm": 1.0, "warmup_steps": 0, "max_steps": 10, "min_lr_ratio": 0.0,
                            "grad_accum_steps": 1, "optim_batch_size": 2, "epochs": 1})
    trainer = PolicyTrainer(build_model(tok, hidden_size=16, num_layers=1), ClippedSurrogateLoss(), cfg, 1.0)
    monkeypatch.setattr(trainer, "optimizer_step", lambda mb: {"time/train_s": 0.0})
    g = torch.Generator().manual_seed(0)
    first = trainer.train_on_batch(make_batch(4, 3, g), 1.0)
    next(first)
    assert len(list(trainer.train_on_batch(make_batch(4, 3, g), 1.0))) == 2
    with pytest.raises(RuntimeError, match="called again"):
        next(first)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc thresholds")
@pytest.mark.parametrize("user_env, expected", [({}, "True True"), ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "False False")])
def test_host_memory_thresholds_set_once_unless_the_user_set_them(user_env, expected):
    """In a fresh process (mallopt settings are process-wide); a user's MALLOC_* variables win."""
    code = "from grpo_utils.train.trainer import keep_freed_host_memory as k; print(k(), k())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | user_env
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    libc = subprocess.run(["ldd", "--version"], capture_output=True, text=True).stdout.lower()
    if "glibc" not in libc and "gnu libc" not in libc:
        pytest.skip("not glibc")
    assert out.strip().splitlines()[-1] == expected
