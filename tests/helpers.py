"""Paths and helpers shared by the test modules (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config"
RECIPES = REPO / "sota-implementations" / "grpo"
# The shared data sets live next to the checkout (../shared/data), not inside it.
SHARED_DATA = REPO.parent / "shared" / "data"

# The tiny tokenizer's stop and pad ids (<|im_end|> and <|endoftext|>).
EOS, PAD = 257, 0


def train_cfg(**overrides):
    """A ``train`` config section for PolicyTrainer, with ``overrides`` applied."""
    base = {"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.99], "adam_eps": 1e-8, "max_grad_norm": 1e9,
            "warmup_steps": 2, "max_steps": 10, "min_lr_ratio": 0.1, "grad_accum_steps": 1}
    base.update(overrides)
    return OmegaConf.create(base)


def env_cfg(**overrides):
    """The shipped quick start config's ``env:`` section with overrides (a DictConfig, as the recipe
    passes it)."""
    env = OmegaConf.load(CONFIG / "grpo_quickstart.yaml").env
    return OmegaConf.merge(env, OmegaConf.create(overrides))
