"""``make gpu-check`` (bench/gpu_selfcheck.py): which GPU paths run on which machine, that each path's
overrides are a valid config needing exactly the GPUs the plan says (the recipe's own checks), and
that on a machine without GPUs every path is skipped with its reason."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.helpers import CONFIG, REPO

sys.path.insert(0, str(REPO / "bench"))

import gpu_selfcheck  # noqa: E402

ALL = [p.name for p in gpu_selfcheck.PATHS]


def runnable(gpus: int, vllm: bool, ray: bool) -> list[str]:
    return [p.name for p, reason in gpu_selfcheck.plan(gpus, vllm, ray) if reason is None]


def test_plan_by_gpus_and_packages():
    assert runnable(0, True, True) == []
    assert runnable(1, True, True) == ["colocated-vllm"]
    assert runnable(1, False, True) == []
    assert runnable(2, True, True) == ["colocated-vllm", "ray-nccl-sync", "fsdp-2-ranks", "reference-own-gpu"]
    assert runnable(2, False, False) == ["fsdp-2-ranks", "reference-own-gpu"]
    assert runnable(4, True, True) == ALL
    assert runnable(4, True, False) == ["colocated-vllm", "fsdp-2-ranks", "reference-own-gpu"]
    reasons = dict((p.name, r) for p, r in gpu_selfcheck.plan(1, False, False))
    assert reasons["colocated-vllm"] == "needs vLLM: pip install -e '.[vllm]'"
    assert reasons["fsdp-2-ranks"] == "needs 2 GPUs, found 1"
    assert reasons["tensor-parallel-2"] == "needs 3 GPUs, found 1"
    assert dict((p.name, r) for p, r in gpu_selfcheck.plan(4, True, False))["ray-nccl-sync"] == "needs Ray: pip install ray"
    assert [p.name for p, _ in gpu_selfcheck.plan(4, True, True, only=["fsdp-2-ranks"])] == ["fsdp-2-ranks"]


@pytest.mark.parametrize("path", gpu_selfcheck.PATHS, ids=ALL)
def test_path_is_a_valid_config_needing_its_gpus(path, tiny_dir, tmp_path, monkeypatch):
    """The recipe's own checks (command line, values, device plan) accept each path's overrides with
    the GPUs the plan gives it, and refuse it with one fewer (CUDA reported available: the checks
    run as on a GPU machine; nothing touches a device)."""
    from grpo_utils.config.cli import compose_jobs
    from grpo_utils.config.validate import check_placement, validate
    from grpo_utils.distributed.resources import check_devices, needs_reference

    argv = [*gpu_selfcheck.common_overrides(tiny_dir, tmp_path / "run"), *path.overrides]
    (cfg,) = compose_jobs(argv, CONFIG, "grpo_quickstart", "sync")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    validate(cfg, "sync")
    trainer = torch.device("cuda", 0)
    check_devices(cfg, trainer, available_gpus=path.gpus)
    check_placement(cfg, "sync", needs_reference(cfg))
    with pytest.raises(ValueError, match="not enough GPUs"):
        check_devices(cfg, trainer, available_gpus=path.gpus - 1)


def test_without_gpus_every_path_is_skipped(capsys):
    assert torch.cuda.device_count() == 0  # the suite's machines have none
    assert gpu_selfcheck.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [x for x in out if not x.startswith("gpu-check:")]
    assert len(lines) == len(ALL)
    for name, text in zip(ALL, lines):
        need = next(p.gpus for p in gpu_selfcheck.PATHS if p.name == name)
        assert text.split() == [name, "SKIPPED", "(needs", str(need), "GPU" + ("s" if need > 1 else "") + ",", "found", "0)"]


def test_report_lines():
    path = gpu_selfcheck.PATHS[0]
    assert gpu_selfcheck.line(path, {"status": "PASS", "step_s": 0.5, "wall_s": 40, "probe_max_abs_diff": 0.0123}) == \
        "colocated-vllm     PASS (step 0.50 s, probe max abs diff 0.0123; run 40 s)"
    assert gpu_selfcheck.line(path, {"status": "FAIL", "why": "weight sync error: ..."}) == \
        "colocated-vllm     FAIL (weight sync error: ...)"
    assert gpu_selfcheck.last_line("a\nconfig error: x\n\n") == "config error: x"
