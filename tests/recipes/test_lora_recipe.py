"""End to end: the sync recipe with ``train_model.lora.enabled=true`` (PEFT LoRA adapters)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.helpers import read_lines, run_and_resume, run_recipe, train_lines
from tests.recipes.test_sync_recipe import tiny_overrides

pytestmark = pytest.mark.slow  # each test launches the recipe in a subprocess

LORA = ["train_model.lora.enabled=true", "train_model.lora.r=4"]


def test_quickstart_learns_with_lora(env, tmp_path):
    """The quick start training adapters only (rank 8 on the attention projections) still lifts
    held-out greedy accuracy clearly."""
    run_dir = tmp_path / "lora"
    run_recipe(env, f"hydra.run.dir={run_dir}", "train_model.lora.enabled=true", "train.max_steps=30",
               "optimizer.lr=5e-3", "seed=1")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["heldout_accuracy_after"] - summary["heldout_accuracy_before"] >= 0.3, summary
    assert (run_dir / "final_model" / "adapter" / "adapter_model.safetensors").is_file()


def test_lora_resume_continues_exactly(env, tiny_dir, tmp_path):
    """With LoRA and a KL reference (the adapters-off base): resumed from step 2's adapter, steps 3-4
    equal the uninterrupted run's; the checkpoints load as merged models and as adapters."""
    args = [*LORA, "train.max_steps=4", "checkpoint.every_n_steps=2", "checkpoint.keep_last=null", "seed=3",
            "loss.kl_coef=0.05", "loss.entropy_coef=0.5", "optimizer.lr=0.01"]  # entropy: the random model earns no reward
    full, resumed = run_and_resume(env, lambda run_dir, *extra: tiny_overrides(tiny_dir, run_dir, *extra),
                                   tmp_path, args)

    ref = {r["step"]: r for r in train_lines(full)}
    got = {r["step"]: r for r in read_lines(resumed / "metrics.jsonl") if "reward/mean" in r}
    assert sorted(got) == [1, 2, 3, 4]
    assert ref[1]["kl_ref"] == pytest.approx(0.0, abs=1e-7)  # the reference is the policy before training
    assert abs(ref[4]["kl_ref"]) > 0  # ... and the adapters moved it
    for step in (3, 4):
        for key in ("reward/mean", "loss", "lr", "grad_norm", "entropy", "kl_ref"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-5, abs=1e-7), (step, key)

    a = load_file(full / "checkpoints" / "step_4" / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "checkpoints" / "step_4" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)

    # step_4 is the trained policy as a plain model, and as the adapter on the base model
    step = full / "checkpoints" / "step_4"
    merged = AutoModelForCausalLM.from_pretrained(step).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), step / "adapter").eval()
    ids = torch.tensor([[10, 20, 30, 40, 50]])
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=0, atol=1e-5)
        assert (base(input_ids=ids).logits - want).abs().max() > 1e-4
    final = full / "final_model"
    assert (final / "adapter" / "adapter_config.json").is_file()
    assert "adapter/adapter_model.safetensors" in json.loads((final / "manifest.json").read_text())["files"]

    # the LoRA checkpoint does not resume as a full-model run: one line, before any model loads
    proc = run_recipe(env, *tiny_overrides(tiny_dir, resumed, "train.max_steps=6", "checkpoint.every_n_steps=2",
                                           "seed=3", "resume=true"), check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "checkpoint checkpoints/step_4 holds a LoRA adapter (adapter/); it resumes only with " \
           "train_model.lora.enabled=true" in last, proc.stderr[-2000:]
