"""bench/gpu_check.sh's CPU dry run: the real grpo-sync.py (the one-GPU config: bf16 weights, a KL
reference, a checkpoint, a resume from it, LoRA) on a tiny model, and its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402


@pytest.mark.slow
def test_cpu_dry_run_reports_every_field():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "GPU_CHECK_TIMEOUT": "240"}
    proc = subprocess.run(["bash", str(REPO / "bench/gpu_check.sh"), "--cpu", "--tiny", "--peak-tflops", "1"],
                          env=env, capture_output=True, text=True, timeout=270, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    report = json.loads(next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("GPU_CHECK ")))
    for line in ("generation:", "training:", "tokens/s", "MFU", "peak memory", "max abs diff"):
        assert line in out
    full, resumed, lora = report["full"], report["resumed"], report["lora"]
    # LoRA trains the adapters only (every linear layer), on top of the same base
    assert full["params"] == full["trainable"] == resumed["params"]
    assert 0 < lora["trainable"] < full["params"]
    assert lora["params"] == full["params"] + lora["trainable"]
    assert full["train_flops_per_token"] == 6 * full["params"]
    assert lora["train_flops_per_token"] == 4 * lora["params"] + 2 * lora["trainable"]
    # 4 steps (2 batches, a checkpoint after each); resumed from step 2 to 4; LoRA one batch
    assert (full["steps"], resumed["steps"], lora["steps"]) == (4, 2, 2)
    assert resumed["resume"]["steps"] == [3, 4]
    assert resumed["resume"]["max_abs_diff"] <= 1e-3  # bf16 on the CPU: exact but for accumulation order
    assert set(resumed["resume"]["per_key"]) >= {"loss", "kl_ref", "entropy", "grad_norm", "lr"}
    for r in report.values():
        if not isinstance(r, dict) or "steps" not in r:
            continue
        assert r["loss_finite"] and r["kl_ref_last"] > 0  # trained away from the KL reference
        tokens = 2 * 4 * 8 * r["timed_batches"]  # prompts x group x new tokens per batch
        assert r["gen_tokens_per_s"] == pytest.approx(tokens / r["generate_s"], rel=0.01)
        assert r["train_mfu"] == pytest.approx(r["train_flops_per_token"] * r["train_tokens_per_s"] / 1e12)
        assert r["gen_mfu"] == pytest.approx(2 * r["params"] * r["gen_tokens_per_s"] / 1e12)
        assert r["peak_mem_gib"] is None  # perf/peak_mem_gib is logged on CUDA only
    assert report["device"] == "cpu" and report["peak_tflops"] == 1


def test_peak_flops_from_the_device_name():
    assert gpu_check.peak_tflops_of("NVIDIA H100 80GB HBM3") == 989.0  # dense bf16
    assert gpu_check.peak_tflops_of("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops_of("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops_of("NVIDIA GeForce RTX 4090") is None
    assert gpu_check.mfu(None).startswith("n/a")
    with pytest.raises(SystemExit):  # 16 x 8 sequences do not split into 3 mini-batches
        gpu_check.parse_args(["--steps-per-batch", "3"])
    with pytest.raises(SystemExit):  # one batch: no checkpoint to resume from before the end
        gpu_check.parse_args(["--steps", "2"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--runs", "resumed"])


def test_resume_difference_names_the_largest():
    full = [{"step": s, "loss": 0.1 * s, "lr": 1.0, "reward/mean": 0.0} for s in (1, 2, 3, 4)]
    resumed = [{"step": 3, "loss": 0.3, "lr": 1.0, "reward/mean": 0.0},
               {"step": 4, "loss": 0.45, "lr": 1.0, "reward/mean": 0.0}]
    d = gpu_check.resume_difference(full, resumed, 3)
    assert d["steps"] == [3, 4] and d["max_abs_diff"] == pytest.approx(0.05) and d["per_key"]["lr"] == 0
    with pytest.raises(RuntimeError, match="logged steps"):
        gpu_check.resume_difference(full, resumed[:1], 3)
