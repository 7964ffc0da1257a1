"""End to end: the sync recipe launched through Hydra, as a user launches it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from tests.helpers import CONFIG, read_lines, run_and_resume, run_recipe, train_lines
from tests.helpers import SHARED_DATA as SHARED

pytestmark = pytest.mark.slow  # each test launches the recipe in a subprocess

REQUIRED_KEYS = {"step", "reward/mean", "reward/std", "advantage/mean", "loss", "clip_fraction", "entropy",
                 "response_length/mean", "grad_norm", "lr", "time/generate_s", "time/train_s", "tokens_per_s"}


def tiny_overrides(tiny_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"model.name={tiny_dir}", f"hydra.run.dir={run_dir}", "env.num_prompts=2", "env.group_size=4",
            "train.optim_batch_size=4", "train.grad_accum_steps=2", "generation.max_new_tokens=6",
            "eval.heldout_size=8", "eval.every_n_steps=2", *extra]


def test_quickstart_learns_across_seeds(env, tmp_path):
    """The shipped quick start, as a Hydra multirun over two seeds: each job gets its own run
    directory and each raises held-out greedy accuracy by at least 0.3."""
    sweep = tmp_path / "sweep"
    run_recipe(env, "-m", "seed=0,1", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${seed}")
    for seed in (0, 1):
        run_dir = sweep / str(seed)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["heldout_accuracy_after"] - summary["heldout_accuracy_before"] >= 0.3, summary
        lines = train_lines(run_dir)
        assert [r["step"] for r in lines] == list(range(1, summary["steps_done"] + 1))
        assert REQUIRED_KEYS <= lines[0].keys()
        assert (run_dir / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
        assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_run_dir_contract_and_kl(env, tiny_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_recipe(env, *tiny_overrides(tiny_dir, run_dir, "train.max_steps=3", "checkpoint.every_n_steps=2",
                                    "loss.kl_coef=0.05", "train.epochs=2"))
    lines = read_lines(run_dir / "metrics.jsonl")
    train = [r for r in lines if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(REQUIRED_KEYS | {"kl_ref"} <= r.keys() for r in train)
    assert any("eval/accuracy" in r for r in lines)
    # rollout of 8 sequences, optim batch 4, 2 epochs: 4 updates per rollout; the first is on-policy
    assert train[0]["ratio/mean"] == pytest.approx(1.0, abs=1e-5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_done"] == 3 and "heldout_accuracy_after" in summary
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_3", "step_4"] or ckpts == ["step_3"] or "step_3" in ckpts
    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step_3")
    assert model.config.model_type == "qwen2"
    assert (run_dir / "checkpoints" / "step_3" / "trainer_state.pt").is_file()


@pytest.mark.parametrize("engine", ["direct", "collector"])
def test_resume_continues_exactly(env, tiny_dir, tmp_path, engine):
    """Interrupt after step 2 (simulated by dropping the later checkpoint), resume, and get the
    same steps 3-4 as the uninterrupted run: step, optimizer, LR, RNG and data position restored."""
    args = ["train.max_steps=4", "checkpoint.every_n_steps=2", "checkpoint.keep_last=null", "seed=3",
            f"rollout={engine}"]
    full, resumed = run_and_resume(env, lambda run_dir, *extra: tiny_overrides(tiny_dir, run_dir, *extra),
                                   tmp_path, args)
    ref = {r["step"]: r for r in read_lines(full / "metrics.jsonl") if "reward/mean" in r}
    got = {r["step"]: r for r in read_lines(resumed / "metrics.jsonl") if "reward/mean" in r}
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("reward/mean", "loss", "lr", "grad_norm", "entropy"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert list(resumed.glob("metrics.pre_resume_step_2*.jsonl")), "the pre-resume metrics are kept"
    a = AutoModelForCausalLM.from_pretrained(full / "checkpoints" / "step_4")
    b = AutoModelForCausalLM.from_pretrained(resumed / "checkpoints" / "step_4")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


PRESETS = sorted(p.stem for p in (CONFIG / "loss").glob("*.yaml"))


def test_every_loss_preset_trains_in_the_recipe(env, tiny_dir, tmp_path):
    """Each ``loss=<name>`` preset runs 2 optimizer steps end to end (one Hydra multirun)."""
    sweep = tmp_path / "presets"
    run_recipe(env, "-m", f"loss={','.join(PRESETS)}", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}",
               *tiny_overrides(tiny_dir, sweep / "unused", "train.max_steps=2", "eval.every_n_steps=0",
                               "eval.before_after=false")[2:])
    for num, name in enumerate(PRESETS):
        run_dir = sweep / str(num)
        config = (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert f"loss={name}" in config
        train = train_lines(run_dir)
        assert [r["step"] for r in train] == [1, 2], name
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train), name
        if name == "dapo":
            assert "dynamic_sampling/groups_dropped" in train[0]


def test_kl_in_reward_penalizes_after_the_policy_moves(env, tiny_dir, tmp_path):
    """The random tiny model earns no reward, so an entropy bonus is what moves it off the reference."""
    run_dir = tmp_path / "rloo_kl"
    run_recipe(env, *tiny_overrides(tiny_dir, run_dir, "loss=rloo", "loss.kl_coef=0.5", "loss.entropy_coef=0.5", "train.max_steps=3",
                                    "optimizer.lr=0.05", "eval.every_n_steps=0", "eval.before_after=false"))
    train = train_lines(run_dir)
    assert train[0]["kl_reward_penalty/mean"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert abs(train[2]["kl_reward_penalty/mean"]) > 1e-6
    resolved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert resolved.advantage.estimator == "rloo"


@pytest.mark.skipif(not (SHARED / "gsm8k" / "test.jsonl").is_file(), reason="shared GSM8K data absent")
def test_gsm8k_dataset_runs(env, tiny_dir, tmp_path):
    run_dir = tmp_path / "gsm8k"
    run_recipe(env, *tiny_overrides(tiny_dir, run_dir, "train.max_steps=1", "env.dataset=gsm8k",
                                    f"env.train_path={SHARED / 'gsm8k' / 'train.jsonl'}",
                                    f"env.test_path={SHARED / 'gsm8k' / 'test.jsonl'}",
                                    "env.system_prompt='Solve, then end with #### N.'", "eval.every_n_steps=0",
                                    "eval.heldout_size=4"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_done"] == 1 and 0.0 <= summary["heldout_accuracy_after"] <= 1.0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.optim_batch_size=48", "train.optim_batch_size=48 must divide"),
        ("train.grad_accum_steps=3", "not divisible by train.grad_accum_steps=3"),
        ("env.dataset=squad", "env.dataset='squad' is unknown"),
        ("env.dataset=gsm8k", "env.train_path is required"),
        ("+env.typo=1", "unknown config key 'env.typo'"),
        ("loss.aggregation=mean", "aggregation"),
        ("model.name=builtin:nope", "model.name='builtin:nope' is unknown"),
        ("advantage.estimator=loo", "advantage.estimator='loo' is unknown"),
        ("loss.is_correction=truncate generation.temperature=0.7", "loss.is_correction=truncate needs"),
    ],
)
def test_bad_config_fails_fast_with_one_line(env, tmp_path, override, expected):
    run_dir = tmp_path / "bad"
    proc = run_recipe(env, f"hydra.run.dir={run_dir}", *override.split(), check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert expected in last, proc.stderr[-2000:]
    assert not (run_dir / "metrics.jsonl").exists()


TASK_DATA = {
    "grpo_gsm8k": [f"env.train_path={SHARED / 'gsm8k' / 'train.jsonl'}", f"env.test_path={SHARED / 'gsm8k' / 'test.jsonl'}"],
    "grpo_math": [f"env.train_path={SHARED / 'math' / 'train.jsonl'}",
                  f"env.test_path={SHARED / 'math' / 'math500_test.jsonl'}"],
    "grpo_ifeval": [f"env.train_path={SHARED / 'ifeval' / 'input_data.jsonl'}"],
    "grpo_countdown": [],
}


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data absent")
@pytest.mark.parametrize("config", sorted(TASK_DATA))
def test_task_config_runs_one_step(env, tiny_dir, tmp_path, config):
    """Each shipped task config (dataset + template + reward) trains a step and evaluates, on a tiny model."""
    run_dir = tmp_path / config
    run_recipe(env, f"--config-name={config}", *TASK_DATA[config], f"model.name={tiny_dir}", f"hydra.run.dir={run_dir}",
               "device=cpu", "model.dtype=float32", "train_model.gradient_checkpointing=false", "env.num_prompts=2",
               "env.group_size=4", "train.optim_batch_size=8", "train.grad_accum_steps=2", "train.max_steps=1",
               "generation.max_new_tokens=8", "eval.heldout_size=4", "eval.every_n_steps=0", "eval.k=2")
    train = train_lines(run_dir)
    assert len(train) == 1 and REQUIRED_KEYS <= train[0].keys()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["heldout_accuracy_after"] <= 1.0
    assert 0.0 <= summary["best"]["eval/pass@2"] <= 1.0


def test_gsm8k_config_requires_data_paths(env, tmp_path):
    proc = run_recipe(env, "--config-name=grpo_gsm8k", f"hydra.run.dir={tmp_path / 'r'}", "device=cpu", check=False)
    assert proc.returncode != 0
    assert "env.train_path is required" in proc.stderr.strip().splitlines()[-1]


def test_resume_from_a_missing_checkpoint_is_one_line(env, tmp_path):
    missing = tmp_path / "nowhere" / "step_5"
    proc = run_recipe(env, f"hydra.run.dir={tmp_path / 'r'}", f"resume={missing}", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: resume=") and str(missing) in last


def test_missing_data_file_is_named(env, tmp_path):
    missing = tmp_path / "nope.jsonl"
    proc = run_recipe(env, f"hydra.run.dir={tmp_path / 'r'}", "env.dataset=gsm8k", f"env.train_path={missing}",
                      f"env.test_path={missing}", check=False)
    assert proc.returncode != 0
    assert f"env.train_path={missing}: file not found" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(("override", "start"), [
    ("loss=nonexistent", "config error: loss=nonexistent is unknown; expected one of "),  # before Hydra composes
    ("seed=-1", "config error: seed=-1 must be in [0, 2**32-1]"),  # before the model loads
    ("model.name=/nonexistent/model", "config error: model.name=/nonexistent/model: no such directory"),
])
def test_bad_input_ends_in_one_line_not_hydras_message(env, tmp_path, override, start):
    run_dir = tmp_path / "bad"
    proc = run_recipe(env, f"hydra.run.dir={run_dir}", override, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(start), proc.stderr[-2000:]
    assert "HYDRA_FULL_ERROR" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (run_dir / "metrics.jsonl").exists()


def gsm8k_line(question: str, answer) -> bytes:
    return json.dumps({"question": question, "answer": answer}).encode() + b"\n"


def test_bad_rows_are_skipped_and_counted_in_the_summary(env, tiny_dir, tmp_path):
    """A UTF-8 BOM, bytes that are not UTF-8, an answer that is a list and a 10 MB question: with
    env.skip_bad_rows=true the run trains on the rest and counts the three bad rows; without it, a
    prompt too long for the model stops the run with its file:line before anything generates."""
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    good = [gsm8k_line(f"What is {i} + 1?", f"{i} + 1 = {i + 1}\n#### {i + 1}") for i in range(4)]
    train.write_bytes(b"\xef\xbb\xbf" + good[0] + b'{"question": "caf\xe9", "answer": "#### 1"}\n' + good[1]
                      + gsm8k_line("huge", ["#### 1"]) + gsm8k_line("x" * 10_000_000, "#### 1") + good[2] + good[3])
    test.write_bytes(b"".join(good))
    run_dir = tmp_path / "skip"
    run_recipe(env, *tiny_overrides(tiny_dir, run_dir, "env.dataset=gsm8k", f"env.train_path={train}",
                                    f"env.test_path={test}", "env.skip_bad_rows=true", "train.max_steps=1",
                                    "eval.every_n_steps=0", "eval.heldout_size=2"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_done"] == 1 and summary["data/skipped_rows"] == 3, summary

    train.write_bytes(b"".join(good) + gsm8k_line("x" * 10_000_000, "#### 1"))
    proc = run_recipe(env, *tiny_overrides(tiny_dir, tmp_path / "stop", "env.dataset=gsm8k", f"env.train_path={train}",
                                           f"env.test_path={test}", "train.max_steps=1"), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"data error: {train}:5: the prompt is 10000050 characters, certainly more than 8186 tokens; the model's "
        "context of 8192 tokens leaves 8186 for a prompt after generation.max_new_tokens=6"), proc.stderr[-2000:]
    assert not (tmp_path / "stop" / "metrics.jsonl").exists()
