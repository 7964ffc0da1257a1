"""bench/gpu_check.sh's CPU dry run: the GPU check's whole path (FSDP2 at world size 1, LoRA, bf16
autocast, generate -> annotate -> optimizer steps -> publish) on a tiny model, and its report."""

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
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "GPU_CHECK_TIMEOUT": "60"}
    proc = subprocess.run(["bash", str(REPO / "bench/gpu_check.sh"), "--cpu", "--tiny", "--peak-tflops", "1"],
                          env=env, capture_output=True, text=True, timeout=90, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    results = {r["variant"]: r for r in (json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
                                        if line.startswith("GPU_CHECK "))}
    assert set(results) == {"lora", "full"}
    for line in ("generation:", "training:", "tokens/s", "MFU", "peak memory"):
        assert line in out
    lora, full = results["lora"], results["full"]
    # LoRA trains the adapters only (attention and MLP projections), on top of the same base
    assert lora["params_base"] == full["params"] == full["params_trainable"]
    assert 0 < lora["params_trainable"] < lora["params_base"]
    assert lora["params"] == lora["params_base"] + lora["params_trainable"]
    assert full["train_flops_per_token"] == 6 * full["params"]
    assert lora["train_flops_per_token"] == 4 * lora["params"] + 2 * lora["params_trainable"]
    for r in results.values():
        assert r["device"] == "cpu" and r["precision"] == "bf16"
        assert r["optimizer_steps"] == (1 + 3) * 2  # warm-up + timed iterations, 2 mini-batches each
        assert r["loss_finite"] and r["policy_changed"]  # trained, and published into the generating policy
        assert r["heavy_imports"] == []  # no torchrl, Ray, vLLM or Hydra: the bare GPU image has none
        tokens = r["sequences"] * r["new_tokens"]
        assert r["gen_tokens_per_s"] == pytest.approx(tokens / r["generate_s"], rel=0.01)
        train_tokens = r["sequences"] * (r["prompt_tokens"] + r["new_tokens"])
        assert r["train_tokens_per_s"] == pytest.approx(train_tokens / r["train_s"], rel=0.01)
        assert r["train_mfu"] == pytest.approx(r["train_flops_per_token"] * r["train_tokens_per_s"] / 1e12)
        assert r["gen_mfu"] == pytest.approx(2 * r["params"] * r["gen_tokens_per_s"] / 1e12)
        assert r["peak_memory_kind"] == "host RSS high-water" and r["train_peak_memory_gib"] > 0.05


def test_peak_flops_default_only_on_the_gpu():
    assert gpu_check.parse_args([]).peak_tflops == 989.0  # H200 dense bf16
    assert gpu_check.parse_args(["--cpu"]).peak_tflops is None
    assert gpu_check.mfu(None).startswith("n/a")
    with pytest.raises(SystemExit):  # 16 x 8 sequences do not split into 3 mini-batches
        gpu_check.parse_args(["--minibatches", "3"])
