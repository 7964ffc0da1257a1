"""Tiny, locally built Qwen2 models for the quick start and the tests (no downloads).

The tokenizer is built with the same pipeline as ``Qwen2Tokenizer`` (byte-level BPE with no
merges: one token per byte), so it saves and reloads through ``AutoTokenizer`` with identical
ids. transformers 5 rebuilds any ``qwen2`` tokenizer with its own pre-tokenizer, so a tokenizer
trained the generic byte-level way would not survive the round trip.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer() -> Qwen2Tokenizer:
    """A byte-level Qwen2 tokenizer (259 tokens) with a ChatML template; EOS is ``<|im_end|>``."""
    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM sized for CPU runs."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(config)


def save_tiny(path: str | Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
              num_heads: int = 4, max_positions: int = 512) -> Path:
    """Build and save an untrained tiny model + tokenizer (used by tests and the benchmark).
    vLLM's CPU attention needs a head size of 64 or more (``hidden_size / num_heads``).
    ``max_positions`` is the context prompts are checked against (one token per byte)."""
    path = Path(path)
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                        max_positions=max_positions, seed=seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def default_cache_dir() -> Path:
    return Path(os.environ.get("GRPO_CACHE_DIR", Path.home() / ".cache" / "grpo-torchrl"))


def warm_start(model, tokenizer, examples: list[tuple[str, str]], *, steps: int, batch_size: int,
               lr: float, seed: int) -> list[float]:
    """Supervised fine-tuning on (prompt, completion) pairs: loss on the completion only.

    This is what turns the random tiny model into a "base model" that RL can then improve.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps))
    eos = tokenizer.eos_token
    model.train()
    losses = []
    for _ in range(steps):
        batch = rng.sample(examples, batch_size)
        prompts = tokenizer([p for p, _ in batch], add_special_tokens=False)["input_ids"]
        fulls = tokenizer([p + c + eos for p, c in batch], add_special_tokens=False)["input_ids"]
        width = max(map(len, fulls))
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        attn = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (p, f) in enumerate(zip(prompts, fulls)):
            ids[i, : len(f)] = torch.tensor(f)
            attn[i, : len(f)] = 1
            labels[i, len(p) : len(f)] = torch.tensor(f[len(p) :])
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
