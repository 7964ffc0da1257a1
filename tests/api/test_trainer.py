"""The Python API end to end: it runs the recipes' loop (same metrics, same weights as the Hydra
recipe with the same settings), writes checkpoint-<N>/ and final_model/ that load with
from_pretrained, resumes at the right step, and learns from a sequence-classifier reward model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

from grpo_utils import GRPOConfig, GRPOTrainer
from grpo_utils.data.datasets import quickstart_rows
from tests.helpers import REPO, SYNC_RECIPE, read_lines, train_lines

pytestmark = pytest.mark.slow  # each test trains

VOLATILE = ("time", "time/generate_s", "time/train_s", "tokens_per_s")


def small_config(out, **kwargs) -> GRPOConfig:
    base = dict(output_dir=str(out), batch_size=2, num_generations_per_prompt=4, max_new_tokens=6,
                learning_rate=1e-3, max_steps=4, save_steps=2, warmup_steps=1, seed=3, overrides=["num_threads=1"])
    return GRPOConfig(**{**base, **kwargs})


def stable(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k not in VOLATILE} for line in lines]


def test_api_runs_the_recipes_loop(tiny_dir, tmp_path, env):
    """Same seed and settings: the API (with an in-memory model) and grpo-sync.py (with the
    trainer's own command line) write identical metrics lines and identical final weights."""
    rows, heldout = quickstart_rows(20, seed=1), quickstart_rows(8, seed=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    trainer = GRPOTrainer(model=model, tokenizer=tok, config=small_config(tmp_path / "api"), train_dataset=rows,
                          eval_dataset=heldout, reward="numeric_answer")
    summary = trainer.train()
    assert summary["steps_done"] == 4 and trainer.state.step == 4
    assert [r["step"] for r in trainer.history if "reward/mean" in r] == [1, 2, 3, 4]

    recipe_dir = tmp_path / "recipe"
    # The API's overrides name its in-memory model "<in-memory>": the recipe loads the same weights by path.
    overrides = [o if not o.startswith("model.name=") else f"model.name={tiny_dir}" for o in trainer.overrides]
    proc = subprocess.run([sys.executable, str(SYNC_RECIPE), f"hydra.run.dir={recipe_dir}", *overrides], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stable(read_lines(recipe_dir / "metrics.jsonl")) == stable(trainer.history)
    a = load_file(tmp_path / "api" / "final_model" / "model.safetensors")
    b = load_file(recipe_dir / "final_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert trainer.command_line().startswith("python sota-implementations/grpo/grpo-sync.py hydra.run.dir=")


def test_outputs_load_and_resume_continues_at_the_right_step(tiny_dir, tmp_path):
    rows = quickstart_rows(20, seed=1)
    out = tmp_path / "run"
    trainer = GRPOTrainer(model=str(tiny_dir), config=small_config(out), train_dataset=rows, reward="numeric_answer")
    trainer.train()
    for d in ("checkpoint-2", "checkpoint-4", "final_model"):
        assert AutoModelForCausalLM.from_pretrained(out / d).config.model_type == "qwen2", d
        assert AutoTokenizer.from_pretrained(out / d)("hi")["input_ids"]
    assert (out / "final_model" / "trainer_state.pt").is_file()  # final_model resumes too
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "summary.json").is_file()
    full = load_file(out / "final_model" / "model.safetensors")

    # Interrupted after step 2 (the later checkpoint dropped): resume continues at step 3.
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "final_model")
    again = GRPOTrainer(model=str(tiny_dir), config=small_config(out), train_dataset=rows, reward="numeric_answer")
    again.train(resume_from_checkpoint=out / "checkpoint-2")
    steps = [r["step"] for r in train_lines(out)]
    assert steps == [1, 2, 3, 4] and again.state.step == 4
    resumed = load_file(out / "final_model" / "model.safetensors")
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-4, atol=1e-5, msg=k)


def last_digit_reward_model(tok) -> Qwen2ForSequenceClassification:
    """A sequence classifier built by hand: it scores a text by its last token, higher for larger
    digits. Its layers add nothing (zero output projections), so the pooled state is the last
    token's normalized embedding; the score head reads the component that encodes the digit."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    rm = Qwen2ForSequenceClassification(config)
    with torch.no_grad():
        for layer in rm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = torch.zeros(len(tok), 64)
        emb[:, 0] = 1.0
        for d in range(10):
            emb[tok.convert_tokens_to_ids(str(d)), 1] = d / 3
        rm.model.embed_tokens.weight.copy_(emb)
        rm.score.weight.zero_()
        rm.score.weight[0, 1] = 10.0
    return rm.eval()


def test_sequence_classifier_reward_model_drives_learning(tmp_path):
    """On the quick-start task, a reward model preferring larger final digits raises the reward."""
    from grpo_utils.models.quickstart import ensure_quickstart_model

    path = ensure_quickstart_model()
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    rm = last_digit_reward_model(tok)
    scores = [rm(input_ids=torch.tensor([tok(f"x {d}")["input_ids"]])).logits.item() for d in range(10)]
    assert scores == sorted(scores) and scores[9] - scores[0] > 5  # the reward model ranks digits
    config = GRPOConfig(output_dir=str(tmp_path / "rm"), batch_size=8, num_generations_per_prompt=8, max_new_tokens=4,
                        learning_rate=2e-3, max_steps=24, warmup_steps=2, overrides=["num_threads=1"])
    trainer = GRPOTrainer(model=model, tokenizer=tok, config=config, train_dataset=quickstart_rows(400, seed=1),
                          reward_model=rm)
    trainer.train()
    rewards = [r["reward/mean"] for r in trainer.history if "reward/mean" in r]
    assert len(rewards) == 24
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 1.0, rewards


def train_saved_in_memory_model(tiny_dir, config: GRPOConfig) -> list[dict]:
    """Train an in-memory copy of the tiny model for 4 steps where another process needs it by
    path: it must be saved to output_dir/initial_model first. Returns the training lines."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    trainer = GRPOTrainer(model=model, tokenizer=tok, config=config, train_dataset=quickstart_rows(20, seed=1),
                          reward="numeric_answer")
    assert (Path(config.output_dir) / "initial_model" / "config.json").is_file()
    trainer.train()
    lines = [r for r in trainer.history if "reward/mean" in r]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    return lines


@pytest.mark.ray
def test_async_mode_from_the_api(tiny_dir, tmp_path):
    """mode="async": the in-memory model is saved for the Ray collectors, which load it by path."""
    out = tmp_path / "async"
    lines = train_saved_in_memory_model(tiny_dir, small_config(out, mode="async", overrides=[
        "num_threads=1", "mode.actor_timeout_s=60"]))
    assert all("staleness/max" in r for r in lines)
    assert (out / "final_model" / "model.safetensors").is_file()


def test_two_trainer_ranks_from_the_api(tiny_dir, tmp_path):
    """train_model.num_devices=2 with an in-memory model: it is saved for the other rank to build
    the architecture from (the weights then come from rank 0), and the run trains on both ranks."""
    out = tmp_path / "ranks"
    # An entropy bonus moves the weights even where the untrained model earns no reward.
    train_saved_in_memory_model(tiny_dir, small_config(out, device="cpu", overrides=[
        "num_threads=1", "train_model.num_devices=2", "loss.entropy_coef=0.5"]))
    before = AutoModelForCausalLM.from_pretrained(out / "initial_model").state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "final_model").state_dict()
    assert max((before[k] - after[k]).abs().max().item() for k in before) > 0  # rank 0's policy got the steps
