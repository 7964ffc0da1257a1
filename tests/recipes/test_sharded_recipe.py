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
        # every logged training metric (token means such as entropy and loss/policy included), not
        # only the summed loss: 2 ranks log what one rank logs for the same step
        timing = {k for k in a if k.startswith("time") or k.endswith("_per_s")}
        assert b.keys() == a.keys() and {"loss", "grad_norm", "entropy", "loss/policy", "ratio/mean"} <= a.keys()
        for key in a.keys() - timing:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def _start_long_run(env, run_dir: Path, *extra: str) -> tuple[subprocess.Popen, list]:
    """A 2-rank run with room for hundreds of steps, once it has logged ``steps`` steps; with the
    recipe's child processes (rank 1)."""
    import psutil

    proc = subprocess.Popen(recipe_command(SYNC_RECIPE, *TWO_RANKS, "train.max_steps=400", "eval.heldout_size=10",
                                           "eval.every_n_steps=0", "checkpoint.every_n_steps=0",
                                           f"hydra.run.dir={run_dir}", *extra),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's job has
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() or len(train_lines(run_dir)) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run did not train: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any("grpo_utils.distributed.join" in " ".join(c.cmdline()) for c in children), "rank 1 is a child"
    return proc, children


@pytest.mark.slow
def test_no_rank_outlives_a_killed_rank_0(env, tmp_path):
    import psutil

    proc, children = _start_long_run(env, tmp_path / "run")
    os.kill(proc.pid, signal.SIGKILL)  # rank 0 only
    proc.communicate()
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [p.cmdline() for p in alive]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm_to_rank_0", "ctrl_c_to_every_process"])
def test_a_stop_checkpoints_with_both_ranks_and_the_run_resumes(env, tmp_path, how):
    """SIGTERM to rank 0, or Ctrl-C (SIGINT to the terminal's whole process group: rank 1 gets it
    too and leaves it to rank 0), lands between the ranks' commands, never half-way through a
    step: rank 0 gathers a checkpoint with rank 1, stops it, and exits with one line; the run
    resumes from there."""
    import psutil

    run_dir = tmp_path / "run"
    proc, children = _start_long_run(env, run_dir)
    if how == "sigterm_to_rank_0":
        proc.send_signal(signal.SIGTERM)
        expected, code = "error: terminated (SIGTERM); last checkpoint: step ", 1
    else:
        os.killpg(proc.pid, signal.SIGINT)
        expected, code = "interrupted; last checkpoint: step ", 130
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never left running when the assertion below fails
    last = err.strip().splitlines()[-1]
    assert proc.returncode == code and last.startswith(expected), err[-2000:]
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    step = int(last.rsplit(" ", 1)[1])
    assert (run_dir / "checkpoints" / f"step_{step}" / "manifest.json").is_file()
    run_recipe(env, *TWO_RANKS, f"train.max_steps={step + 2}", "eval.heldout_size=10", "eval.every_n_steps=0",
               "resume=true", f"hydra.run.dir={run_dir}")
    assert [r["step"] for r in train_lines(run_dir)][-2:] == [step + 1, step + 2]


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
    ("train_model.fsdp_param_dtype=bfloat16", r"^train_model.fsdp_param_dtype=bfloat16 applies to sharded training "
                                              r"only; it needs train_model.num_devices > 1 \(got 1\)$"),
    ("device=cpu train_model.num_devices=2 train_model.fsdp_param_dtype=half",
     r"^train_model.fsdp_param_dtype='half'; expected null, bfloat16 or float32$"),
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


def test_colocated_vllm_with_trainer_ranks_is_one_line():
    from tests.config.test_command_lines import check

    with pytest.raises(ConfigError, match=r"^inference_model.backend=vllm with train_model.num_devices=2 needs the "
                                          r"engine in a collector \(mode.ray=true or grpo-async.py\)"):
        check("device=cpu train_model.num_devices=2 inference_model.backend=vllm")
