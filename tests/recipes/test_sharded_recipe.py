"""``train_model.num_devices=2`` from the recipe's command line (CPU ranks, gloo): the run learns,
its checkpoints load with ``from_pretrained`` and resume on one rank as they continue on two, and
no rank outlives rank 0. The exactness of one step is tested in tests/distributed/test_sharded.py."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from grpo_utils.errors import ConfigError
from tests.helpers import SYNC_RECIPE, recipe_command, run_recipe, train_lines

TWO_RANKS = ("device=cpu", "train_model.num_devices=2")
SMALL = ("train.max_steps=4", "eval.heldout_size=20", "eval.every_n_steps=0", "checkpoint.every_n_steps=2",
         "checkpoint.keep_last=null")


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_rank_as_it_continues_on_two(env, tmp_path):
    from transformers import AutoModelForCausalLM

    two = tmp_path / "two"
    run_recipe(env, *TWO_RANKS, *SMALL, f"hydra.run.dir={two}")
    lines = train_lines(two)
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    summary = (two / "summary.json").read_text()
    assert '"heldout_accuracy_after"' in summary
    model = AutoModelForCausalLM.from_pretrained(two / "checkpoints" / "step_2")  # a plain HF model dir
    assert model.num_parameters() > 0

    one = tmp_path / "one"
    run_recipe(env, *SMALL, f"resume={two / 'checkpoints' / 'step_2'}", f"hydra.run.dir={one}")
    resumed = train_lines(one)
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(lines[2:], resumed, strict=True):
        assert b["reward/mean"] == a["reward/mean"]  # same completions sampled
        for key in ("loss", "grad_norm", "kl_ref", "clip_fraction"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_no_rank_outlives_a_killed_rank_0(env, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(recipe_command(SYNC_RECIPE, *TWO_RANKS, "train.max_steps=400", "eval.heldout_size=10",
                                           "eval.every_n_steps=0", f"hydra.run.dir={run_dir}"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() or not train_lines(run_dir):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.5)
        ranks = _children(proc.pid)
        assert ranks, "rank 1 is a child process of the recipe"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
              for pid in ranks if Path(f"/proc/{pid}/stat").exists()):
        assert time.monotonic() < deadline, f"trainer ranks {ranks} outlived rank 0"
        time.sleep(0.2)


@pytest.mark.parametrize("line,message", [
    ("device=cpu train_model.num_devices=3",
     r"^train.optim_batch_size=64 / train.grad_accum_steps=1 = 64 sequences per micro-batch must divide evenly "
     r"over train_model.num_devices=3 ranks$"),
    ("device=cpu train_model.num_devices=4 train_model.num_nodes=3",
     r"^train_model.num_nodes=3 must be >= 1 and divide train_model.num_devices=4"),
    ("device=cpu train_model.num_devices=4 train_model.num_nodes=2",
     r"^train_model.num_nodes=2 needs train_model.rendezvous=HOST:PORT"),
    ("device=cpu train_model.num_devices=2 train_model.rendezvous=nohost",
     r"^train_model.rendezvous='nohost'; expected HOST:PORT$"),
    ("train_model.num_devices=2", r"^not enough GPUs: train_model.num_devices=2 = 2 GPUs, but the machine has 0"),
])
def test_rank_settings_are_one_line_before_any_model_loads(line, message):
    from tests.config.test_command_lines import check

    with pytest.raises(ConfigError, match=message):
        check(line)


def test_trainer_ranks_then_inference_then_reference_on_the_gpus():
    """Device plan on a machine with GPUs (faked: this one has none): 2 trainer ranks from cuda:1
    need cuda:1..cuda:2; the reference takes the GPU after the trainer's and the inference GPUs."""
    import torch

    from grpo_utils.distributed.resources import check_devices, reference_device
    from tests.config.test_command_lines import jobs

    (cfg,) = jobs("device=cuda:1 train_model.num_devices=2")
    with pytest.raises(ValueError, match=r"^not enough GPUs: 2 trainer ranks from device=cuda:1 need "
                                         r"cuda:1..cuda:2, but the machine has 2$"):
        check_devices(cfg, torch.device("cuda", 1), available_gpus=2)
    check_devices(cfg, torch.device("cuda", 1), available_gpus=3)
    line = "device=cuda train_model.num_devices=2 loss.kl_coef=0.1 ref_model.num_devices=1"
    (cfg,) = jobs(line)
    assert reference_device(cfg, torch.device("cuda", 0), available_gpus=3) == torch.device("cuda", 2)
    with pytest.raises(ValueError, match=r"^not enough GPUs: train_model.num_devices=2 \+ ref_model.num_devices=1 "
                                         r"= 3 GPUs, but the machine has 2 \(short by 1\)$"):
        check_devices(cfg, torch.device("cuda", 0), available_gpus=2)
    (cfg,) = jobs("mode=async " + line + " inference_model.num_devices=2", "async")
    assert reference_device(cfg, torch.device("cuda", 0), available_gpus=5) == torch.device("cuda", 4)
