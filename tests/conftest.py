"""Fixtures shared by the whole test suite.

The tests mirror the package: tests/<area>/test_<module>.py tests grpo_utils/<area>/<module>.py;
tests/recipes/ launches the recipes (sota-implementations/grpo/*.py) through Hydra, end to end.

Running a part of the suite (from the repository root):

    python -m pytest                       # everything (what `make test` runs)
    python -m pytest -m "not slow"         # the quick subset: no recipe runs, no Ray cluster
    python -m pytest -m slow               # only the slow ones: recipe runs and Ray
    python -m pytest -m ray                # only the tests that start Ray
    python -m pytest -m "slow and not ray" # the recipe runs without Ray
    python -m pytest tests/algo            # one area

Markers (registered in pyproject.toml): ``slow`` marks end-to-end runs (every test in
tests/recipes/, the Ray recipe runs in tests/distributed/test_async.py and the Ray-cluster tests in
tests/distributed/test_weight_sync.py); ``ray`` marks the tests that start Ray, all of which are
also ``slow``; ``faults`` marks tests/train/test_fault_injection.py (damaged checkpoints, a full
disk, kill -9; its recipe runs are also ``slow``); ``slurm`` marks tests/distributed/test_slurm.py
(jobs on a real two-node SLURM cluster it starts, tests/slurm_cluster.py; also ``slow``). Nothing is
deselected by default.

The tiny tokenizer and model (grpo_utils.models.tiny) are built here once; a saved copy of the
tiny model is what the end-to-end recipe runs load with ``model.name=<dir>``. Helper functions
(``run_recipe``, ``train_cfg``, ...) and repository paths are in tests/helpers.py, imported as
``from tests.helpers import ...`` (tests/ is a package, so pytest puts the repository root on
sys.path).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

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
    Runs read it and write elsewhere, so one copy serves the whole session. Its context (8192
    positions, one token per byte) holds every prompt of the shared GSM8K, MATH and IFEval files,
    which runs check against it (rotary positions: no weights depend on it)."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", hidden_size=32, num_layers=1, max_positions=8192)


@pytest.fixture(scope="session")
def vllm_dir(tmp_path_factory) -> Path:
    """A tiny model vLLM's CPU attention can run (head size 64: hidden 64, one head, one layer)."""
    return save_tiny(tmp_path_factory.mktemp("tiny_vllm") / "model", hidden_size=64, num_layers=1, num_heads=1)


@pytest.fixture(scope="session")
def vllm_generator(vllm_dir):
    """ONE in-process vLLM engine on ``vllm_dir`` for the whole session (start-up about 12 s with the
    import), sampling at temperature 0.7 for 8 tokens with seed 0. A test that loads other weights
    into it restores them (see tests/inference/test_vllm_engine.py)."""
    from grpo_utils.inference.vllm_engine import VLLMGenerator, VLLMSettings

    gen_cfg = OmegaConf.create({"temperature": 0.7, "top_p": 1.0, "top_k": 0, "max_new_tokens": 8,
                                "min_new_tokens": 0})
    generator = VLLMGenerator(str(vllm_dir), VLLMSettings(max_model_len=128), gen_cfg, stop_ids=[257], pad_id=0,
                              seed=0, device=torch.device("cpu"))
    yield generator
    generator.close()


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict[str, str]:
    """The environment of a recipe run in a subprocess: a model cache (GRPO_CACHE_DIR, kept if
    already set, so the quick-start model is built once), no Hydra tracebacks (errors stay one
    line), W&B offline and no Ray usage statistics."""
    cache = os.environ.get("GRPO_CACHE_DIR") or str(tmp_path_factory.mktemp("cache"))
    return {**os.environ, "GRPO_CACHE_DIR": cache, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline",
            "RAY_USAGE_STATS_ENABLED": "0"}
