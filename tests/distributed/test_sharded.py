"""FSDP2 trainer ranks (gloo on CPU): N ranks take the optimizer step one rank takes on the same
mini-batch, and their checkpoints resume on any number of ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import free_port

pytestmark = pytest.mark.ranks  # every test starts gloo rank processes (~2 min in all)

WORKER = Path(__file__).with_name("sharded_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def run_ranks(model_dir: Path, out: Path, world: int, **options) -> dict:
    """Run the worker on ``world`` ranks; rank 0's saved result."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), f"--model={model_dir}", f"--out={out}",
                               f"--rank={r}", f"--world={world}", f"--port={port}", *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for r, (p, text) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed:\n{text[-3000:]}"
    return torch.load(out, weights_only=False)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# aggregation:grad_accum_steps, then train.packing and train.max_tokens_per_micro_batch (4 micro-batches
# of 2 sequences: 2 micro-steps of one per rank)
CASES = ["token_mean:1", "seq_mean_token_mean:1", "token_mean:2", "seq_mean_token_mean:2",
         "token_mean:1:packed:tokens=30", "seq_mean_token_mean:1:tokens=30"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from grpo_utils.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("sharded") / "model", hidden_size=32, num_layers=2, num_heads=2)


@pytest.fixture(scope="module")
def two_steps(model_dir, tmp_path_factory) -> dict[int, dict]:
    """Every case's two optimizer steps on 1 and on 2 ranks."""
    out = tmp_path_factory.mktemp("two_steps")
    return {world: run_ranks(model_dir, out / f"{world}.pt", world, cases=",".join(CASES), steps=2)
            for world in (1, 2)}


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_take_the_one_rank_step(model_dir, two_steps, case):
    """Token and sequence means, with and without accumulation, packed and by token budget: same
    weights to 1e-6 after two steps, same loss, gradient norm, LR, Adam moments and schedule."""
    from safetensors.torch import load_file

    one, two = two_steps[1][case], two_steps[2][case]
    initial = load_file(model_dir / "model.safetensors")  # lm_head is tied to the embedding: not saved
    assert max_diff({k: one["weights"][k] for k in initial}, initial) > 1e-4  # the steps moved the weights
    assert max_diff(one["weights"], two["weights"]) < 1e-6
    for m1, m2 in zip(one["metrics"], two["metrics"], strict=True):
        assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5, abs=1e-7)
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
        assert m2["lr"] == m1["lr"]
        # every metric the trainer logs (token means, clip fractions, effective sample sizes, the IS
        # weights') is that of the whole mini-batch, not an average of the ranks' parts
        assert m2.keys() == m1.keys() >= {"loss/policy", "entropy", "clip_fraction", "ratio/mean", "ess",
                                          "approx_kl_behaviour", "mismatch_kl", "is_weight/mean"}
        for key in m1.keys() - {"time/train_s"}:
            assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key
    # the parts differ (a ragged batch, ratios moved by the first step), so averaging them would not do
    assert 0 < one["metrics"][1]["clip_fraction"] < 1 and one["metrics"][1]["is_weight/corrected_fraction"] > 0
    # the gathered optimizer state is numbered as the one-device trainer numbers it
    s1, s2 = one["trainer"]["optimizer"], two["trainer"]["optimizer"]
    assert s1["param_groups"][0]["params"] == s2["param_groups"][0]["params"]
    assert s1["state"].keys() == s2["state"].keys()
    for i in s1["state"]:
        assert torch.allclose(s1["state"][i]["exp_avg"], s2["state"][i]["exp_avg"], atol=1e-8)
        assert torch.allclose(s1["state"][i]["exp_avg_sq"], s2["state"][i]["exp_avg_sq"], atol=1e-10)
    assert one["trainer"]["scheduler"] == two["trainer"]["scheduler"]


def test_checkpoints_move_between_world_sizes(model_dir, two_steps, tmp_path):
    """Step 1 on N ranks, step 2 on M ranks == two steps on one rank, for (N, M) = (2, 1), (1, 2)."""
    straight = two_steps[1]["token_mean:1"]
    for first, second in ((2, 1), (1, 2)):
        half = run_ranks(model_dir, tmp_path / f"half{first}.pt", first, steps=1)["token_mean:1"]
        torch.save(half["weights"], tmp_path / "w.pt")
        torch.save(half["trainer"], tmp_path / "t.pt")
        resumed = run_ranks(model_dir, tmp_path / f"resumed{second}.pt", second, steps=1,
                            weights=tmp_path / "w.pt", trainer_state=tmp_path / "t.pt")["token_mean:1"]
        assert max_diff(straight["weights"], resumed["weights"]) < 1e-6, (first, second)
        assert resumed["metrics"][0]["lr"] == straight["metrics"][1]["lr"]


def test_bf16_param_dtype_all_gathers_in_bf16_over_fp32_shards(model_dir, two_steps, tmp_path):
    """train_model.fsdp_param_dtype=bfloat16: the step runs on bf16 copies of the parameters (so it
    differs from the fp32 step, by bf16 rounding), while the shards, and the weights rank 0
    gathers, stay fp32."""
    fp32 = two_steps[1]["token_mean:1"]
    bf16 = run_ranks(model_dir, tmp_path / "bf16.pt", 2, steps=2, param_dtype="bfloat16")["token_mean:1"]
    assert all(v.dtype == torch.float32 for v in bf16["weights"].values())
    diff = max_diff(fp32["weights"], bf16["weights"])
    assert 1e-6 < diff < 1e-2
    for m1, m2 in zip(fp32["metrics"], bf16["metrics"], strict=True):
        assert m2["loss"] == pytest.approx(m1["loss"], rel=5e-2, abs=1e-3)
