"""Rollout: prompts -> G completions each -> rewards -> group advantages, as one dense batch.

Generation goes through TorchRL's ``TransformersWrapper`` (tokens in, tokens out) in ONE call
for all P x G completions of a step. Off the shelf, TorchRL's ``LLMCollector`` over a
``DatasetChatEnv`` calls ``generate`` once per repeat and clones lazily stacked histories
(about 10x a bare loop on a tiny model), so prompts are rendered and tokenized here, once per
distinct prompt, and the batch stays a dense ``TensorDict`` that TorchRL's replay buffer
stores without copies.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tensordict import TensorDict

from grpo_utils.advantages import group_advantages, zero_advantage_group_fraction
from grpo_utils.data import PromptRenderer, PromptStream
from grpo_utils.rewards import RewardFunction


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


def make_generator(model, tokenizer, gen_kwargs: dict[str, Any]):
    from torchrl.modules.llm import TransformersWrapper

    return TransformersWrapper(
        model,
        tokenizer=tokenizer,
        input_mode="tokens",
        generate=True,
        return_log_probs=False,  # recomputed exactly by grpo_utils.logprobs (TorchRL zeroes token 0)
        pad_output=True,
        generate_kwargs=dict(gen_kwargs),
    )


def stop_token_ids(tokenizer, model) -> list[int]:
    """Every id ``generate`` stops on: the tokenizer's EOS and the generation config's (Qwen lists several)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def response_mask(response: torch.Tensor, stop_ids: int | list[int]) -> torch.Tensor:
    """True up to and including the first stop token; what ``generate`` pads after it is False.

    A pad id sampled *before* the stop token is a real token and stays in.
    """
    stops = torch.as_tensor(stop_ids if isinstance(stop_ids, (list, tuple)) else [stop_ids])
    is_stop = torch.isin(response, stops)
    after_stop = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
    return ~after_stop


class GroupRollout:
    """Draws prompts from ``stream``, samples ``group_size`` completions for each, scores them."""

    def __init__(self, model, tokenizer, renderer: PromptRenderer, reward_fn: RewardFunction,
                 gen_kwargs: dict[str, Any], group_size: int, adv_scale: str, adv_eps: float,
                 stream: PromptStream):
        self.stream = stream
        self.tokenizer = tokenizer
        self.renderer = renderer
        self.reward_fn = reward_fn
        self.group_size = group_size
        self.adv_scale = adv_scale
        self.adv_eps = adv_eps
        self.generator = make_generator(model, tokenizer, gen_kwargs)
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self._prompt_cache: dict[str, torch.Tensor] = {}

    def encode_prompts(self, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask; each distinct prompt is rendered and tokenized once."""
        # Repeats of a prompt are the same row object: render and tokenize each one once.
        by_row: dict[int, torch.Tensor] = {}
        for row in rows:
            if id(row) not in by_row:
                text = self.renderer(row)
                cached = self._prompt_cache.get(text)
                if cached is None:
                    cached = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                    self._prompt_cache[text] = cached
                by_row[id(row)] = cached
        ids = [by_row[id(row)] for row in rows]
        width = max(len(seq) for seq in ids)
        prompt = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, seq in enumerate(ids):
            prompt[i, width - len(seq):] = seq
            mask[i, width - len(seq):] = 1
        return prompt, mask

    def data_state(self) -> dict[str, int]:
        """Position of the next prompts this rollout will train on (saved in checkpoints)."""
        return self.stream.state_dict()

    def load_data_state(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)

    @torch.no_grad()
    def generate(self, rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt ids, prompt mask and response ids for ``rows`` (one completion per row)."""
        prompt, prompt_mask = self.encode_prompts(rows)
        td = TensorDict({"tokens": {"prompt": prompt}, "attention_mask": prompt_mask},
                        batch_size=[len(rows)])
        out = self.generator(td)
        return prompt, prompt_mask, out["tokens", "response"]

    def sample_groups(self) -> tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next prompts, each repeated ``group_size`` times (contiguous), and their completions."""
        rows = [row for row in self.stream.next_batch() for _ in range(self.group_size)]
        return (rows, *self.generate(rows))

    def collect(self, policy_version: int = 0) -> tuple[TensorDict, dict[str, float]]:
        """One step's batch: ``num_prompts * group_size`` samples, groups contiguous."""
        t0 = time.perf_counter()
        rows, prompt, prompt_mask, response = self.sample_groups()
        t_gen = time.perf_counter() - t0
        resp_mask = response_mask(response, self.stop_ids)
        completions = self.tokenizer.batch_decode(
            [r[m] for r, m in zip(response, resp_mask)], skip_special_tokens=True)
        scores, failures = self.reward_fn(completions, rows)
        rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32)
        advantages = group_advantages(rewards, self.group_size, self.adv_scale, self.adv_eps)
        lengths = resp_mask.sum(-1)
        truncated = ~torch.isin(response, torch.tensor(self.stop_ids)).any(-1)
        batch = TensorDict(
            {
                "input_ids": torch.cat([prompt, response], dim=1),
                "attention_mask": torch.cat([prompt_mask, resp_mask.long()], dim=1),
                "response_mask": resp_mask,
                "reward": rewards,
                "advantage": advantages,
                "policy_version": torch.full((len(rows),), policy_version, dtype=torch.long),
            },
            batch_size=[len(rows)],
        )
        stats = {
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if len(rows) > 1 else 0.0,
            "advantage/mean": advantages.mean().item(),
            "advantage/std": advantages.std().item() if len(rows) > 1 else 0.0,
            "response_length/mean": lengths.float().mean().item(),
            "response_length/max": lengths.max().item(),
            "truncated_fraction": truncated.float().mean().item(),
            "zero_advantage_groups": zero_advantage_group_fraction(rewards, self.group_size),
            "reward/failures": float(failures),
            "time/generate_s": t_gen,
        }
        for key in scores[0]:
            if key != "reward":
                stats[f"reward/{key}"] = sum(s[key] for s in scores) / len(scores)
        return batch, stats
