"""Sequence packing (``train.packing``): one optimizer step padded against packed, on a batch whose
completion lengths are skewed as a reasoning run's are (4 to 256 tokens).

    python bench/packing.py                      # the 4M and ~30M models, 16 sequences, 5 rounds
    python bench/packing.py --models 4M --rounds 3 --steps 2

Both sides are ``PolicyTrainer.optimizer_step`` on the same batch (prompts of 16 to 48 tokens,
completion lengths drawn log-uniformly from 4 to 256, most of them short), a forward with
gradients and a backward over the whole mini-batch, plus the behaviour log-probs' no-grad forward
(``annotate``), as a step of the recipe runs them. Rounds alternate (padded, packed, padded, ...)
so machine noise hits both; the reported ratio is of the medians. Threads: ``--threads`` (default
the machine's cores).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {"tiny": dict(hidden_size=64, num_layers=2, num_heads=1),
          "4M": dict(hidden_size=256, num_layers=6, num_heads=4),
          "30M": dict(hidden_size=576, num_layers=10, num_heads=8)}


def skewed_batch(n: int, vocab: int, seed: int = 0):
    """``n`` sequences: prompts of 16-48 tokens, completions log-uniform in [4, 256]."""
    import torch
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(16, 49, (n,), generator=g).tolist()
    completions = [int(round(math.exp(math.log(4) + (math.log(256) - math.log(4)) * u)))
                   for u in torch.rand(n, generator=g).tolist()]
    wp, wr = max(prompts), max(completions)
    ids = torch.zeros((n, wp + wr), dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, wp - p:wp + c] = torch.randint(3, vocab, (p + c,), generator=g)
        attn[i, wp - p:wp + c] = 1
    resp = attn[:, wp:].bool()
    batch = TensorDict({"input_ids": ids, "attention_mask": attn, "response_mask": resp,
                        "advantage": torch.randn(n, generator=g)}, batch_size=[n])
    return batch, completions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="4M,30M")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps timed per round")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch
    from omegaconf import OmegaConf

    from grpo_utils.algo.losses import ClippedSurrogateLoss
    from grpo_utils.algo.packing import padding_fraction
    from grpo_utils.models.tiny import build_model, build_tokenizer
    from grpo_utils.train.trainer import PolicyTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = build_tokenizer()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print("| model | params | padding share | padded s/step | packed s/step | speed-up |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = build_model(tok, max_positions=512, **MODELS[name])
        params = sum(p.numel() for p in model.parameters())
        batch, _ = skewed_batch(args.batch, len(tok))
        trainers = {}
        for packing in (False, True):
            cfg = OmegaConf.create({"lr": 1e-6, "weight_decay": 0.0, "betas": [0.9, 0.99], "adam_eps": 1e-8,
                                    "max_grad_norm": 1.0, "warmup_steps": 1, "max_steps": 10_000,
                                    "min_lr_ratio": 0.1, "grad_accum_steps": 1, "packing": packing})
            trainers[packing] = PolicyTrainer(model, ClippedSurrogateLoss(), cfg, temperature=1.0)
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.rounds + 1):  # round 0 warms up both
            for packing in (False, True):
                trainer = trainers[packing]
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step = batch.clone()
                    trainer.annotate(step, need_behaviour=True, micro_batch_size=args.batch)
                    trainer.optimizer_step(step)
                if r:
                    times[packing].append((time.perf_counter() - t0) / args.steps)
        padded, packed = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {name} | {params / 1e6:.1f}M | {padding_fraction(batch['attention_mask']):.2f} | {padded:.3f} "
              f"| {packed:.3f} | {padded / packed:.2f}x |")


if __name__ == "__main__":
    main()
