"""Held-out evaluation: greedy decoding, accuracy against the task's reward."""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict

from grpo_utils.rollout import GroupRollout, response_mask


@torch.no_grad()
def greedy_accuracy(rollout: GroupRollout, greedy_generator, rows: list[dict[str, Any]],
                    batch_size: int = 64) -> dict[str, float]:
    """``eval/accuracy`` (mean ``correct``) and ``eval/reward`` of greedy completions."""
    model = greedy_generator.model
    was_training = model.training
    model.eval()
    correct, reward, length = 0.0, 0.0, 0.0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompt, mask = rollout.encode_prompts(chunk)

        out = greedy_generator(TensorDict({"tokens": {"prompt": prompt}, "attention_mask": mask},
                                          batch_size=[len(chunk)]))
        response = out["tokens", "response"]
        resp_mask = response_mask(response, rollout.stop_ids)
        texts = rollout.tokenizer.batch_decode([r[m] for r, m in zip(response, resp_mask)],
                                               skip_special_tokens=True)
        scores, _ = rollout.reward_fn(texts, chunk)
        correct += sum(s.get("correct", s["reward"]) for s in scores)
        reward += sum(s["reward"] for s in scores)
        length += resp_mask.sum().item()
    model.train(was_training)
    n = len(rows)
    return {"eval/accuracy": correct / n, "eval/reward": reward / n, "eval/response_length": length / n}
