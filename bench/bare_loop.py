"""A minimal GRPO step in plain PyTorch + transformers: the yardstick for framework overhead.

Same work as one step of grpo-sync.py with one update per rollout: chat-template and tokenize
P prompts, sample G completions each in one ``generate`` call, decode, score, group-normalize,
recompute log-probs with grad, token-mean clipped surrogate (ratio 1), backward, clip, AdamW.
Prints one JSON line per step: {"step": i, "seconds": t}.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_utils.data.datasets import quickstart_rows
from grpo_utils.rewards import numeric_answer_reward
from grpo_utils.train.trainer import keep_freed_host_memory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_host_memory()  # as the recipe's trainer does: heap trimming is not part of the work
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows = quickstart_rows(5000, seed=1)
    rng = random.Random(args.seed)
    P, G, T = args.prompts, args.group, args.tokens
    for step in range(args.steps):
        t0 = time.perf_counter()
        batch = [r for r in rng.sample(rows, P) for _ in range(G)]
        texts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                         add_generation_prompt=True) for r in batch]
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        model.eval()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=T, min_new_tokens=T, do_sample=True, top_k=None,
                                 pad_token_id=tok.pad_token_id)
        width = enc["input_ids"].shape[1]
        resp = out[:, width:]
        resp_mask = torch.ones_like(resp, dtype=torch.bool)
        completions = tok.batch_decode(resp, skip_special_tokens=True)
        rewards = torch.tensor([numeric_answer_reward(c, r)["reward"] for c, r in zip(completions, batch)])
        grouped = rewards.view(P, G)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).view(-1)
        model.train()
        attn = torch.cat([enc["attention_mask"], resp_mask.long()], 1)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=out, attention_mask=attn, position_ids=pos, use_cache=False).logits
        logits = logits[:, width - 1 : -1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
        entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
        ratio = torch.exp(logp - logp.detach())
        per_token = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
        loss = (per_token * resp_mask).sum() / resp_mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _ = entropy.detach().mean().item(), loss.item()
        print(json.dumps({"step": step + 1, "seconds": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
    main()
