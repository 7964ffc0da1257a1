"""The shipped configs name hub models; with no network here, their pre-load checks read them
from a local Hugging Face cache that holds the tiny model under those names."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.config.test_bad_inputs import hub_cache

SHIPPED_HUB_MODELS = ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-Math-1.5B")


@pytest.fixture
def shipped_hub_models(tmp_path, tiny_dir, monkeypatch) -> Path:
    """The hub cache (``HF_HUB_CACHE``) with :data:`SHIPPED_HUB_MODELS`, each a copy of ``tiny_dir``."""
    for repo in SHIPPED_HUB_MODELS:
        hub_cache(tmp_path / "hub", tiny_dir, repo, monkeypatch)
    return tmp_path / "hub"
