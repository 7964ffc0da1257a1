"""Paths and helpers shared by the test modules (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config"
RECIPES = REPO / "sota-implementations" / "grpo"
# The shared data sets live next to the checkout (../shared/data), not inside it.
SHARED_DATA = REPO.parent / "shared" / "data"
