"""Fixtures shared by the whole test suite.

The tiny tokenizer and model (grpo_utils.models.tiny) are built here once; a saved copy of the
tiny model is what the end-to-end recipe runs load with ``model.name=<dir>``. Helper functions
and repository paths are in tests/helpers.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from grpo_utils.models.tiny import build_model, build_tokenizer, save_tiny


@pytest.fixture(scope="session")
def tok():
    """The tiny byte-level tokenizer (nothing in the library or the tests modifies it)."""
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """A tiny random policy (hidden size 32, one layer) in eval mode; one per module, since a
    test may change its weights."""
    return build_model(tok, hidden_size=32, num_layers=1).eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny model and tokenizer saved as a Hugging Face directory (hidden size 32, one layer).
    Runs read it and write elsewhere, so one copy serves the whole session."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", hidden_size=32, num_layers=1)


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict[str, str]:
    """The environment of a recipe run in a subprocess: a model cache (GRPO_CACHE_DIR, kept if
    already set, so the quick-start model is built once), no Hydra tracebacks (errors stay one
    line), W&B offline and no Ray usage statistics."""
    cache = os.environ.get("GRPO_CACHE_DIR") or str(tmp_path_factory.mktemp("cache"))
    return {**os.environ, "GRPO_CACHE_DIR": cache, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline",
            "RAY_USAGE_STATS_ENABLED": "0"}
