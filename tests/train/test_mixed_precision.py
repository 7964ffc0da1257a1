"""``train.mixed_precision``: bf16/fp16 autocast of the trainer's forwards over fp32 master
weights, fp16's loss scaling (skipped steps, its state in checkpoints), and the config checks."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch

from grpo_utils.algo.logprobs import batch_log_probs
from grpo_utils.algo.losses import ClippedSurrogateLoss, LossOutput
from grpo_utils.errors import ConfigError
from grpo_utils.models.tiny import build_model
from grpo_utils.train.checkpoint import load_model_weights, load_trainer_state, save_checkpoint
from grpo_utils.train.run import check_run
from grpo_utils.train.trainer import PolicyTrainer
from tests.config.test_command_lines import jobs
from tests.helpers import REPO, read_lines, run_recipe, train_cfg, train_lines
from tests.train.test_trainer import synthetic_batch

FRESH_SCALE = 2.0**16  # GradScaler's initial scale


@pytest.fixture
def policy(tok):
    """A tiny fp32 policy of its own (the tests change its weights)."""
    torch.manual_seed(0)
    return build_model(tok, hidden_size=32, num_layers=1)


def make_trainer(model, mixed_precision: str, **cfg) -> PolicyTrainer:
    return PolicyTrainer(model, ClippedSurrogateLoss(), train_cfg(mixed_precision=mixed_precision, **cfg),
                         temperature=1.0)


def overflow_next_backward(model) -> None:
    """Make the next backward's gradient of one weight inf (an fp16 overflow, as it would happen)."""
    weight = model.lm_head.weight if model.lm_head.weight is not model.model.embed_tokens.weight \
        else model.model.norm.weight

    def to_inf(grad):
        handle.remove()
        return torch.full_like(grad, math.inf)

    handle = weight.register_hook(to_inf)


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------ no / bf16


def test_no_mixed_precision_adds_nothing(policy):
    trainer = make_trainer(policy, "no")
    assert trainer.scaler is None and trainer.autocast_dtype is None
    with trainer.autocast():
        assert not torch.is_autocast_enabled("cpu")
    metrics = trainer.optimizer_step(synthetic_batch(policy, 1.0))
    assert set(trainer.state_dict()) == {"optimizer", "scheduler"}
    assert "grad_scale" not in metrics and "skipped_step" not in metrics


def test_bf16_forward_runs_in_bf16_over_fp32_master_weights(policy):
    batch = synthetic_batch(policy, 1.0)
    fp32_model, bf16_model = copy.deepcopy(policy), copy.deepcopy(policy)
    fp32 = make_trainer(fp32_model, "no").optimizer_step(batch.clone())

    trainer = make_trainer(bf16_model, "bf16")
    seen = []
    hook = bf16_model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    bf16 = trainer.optimizer_step(batch.clone())
    hook.remove()
    assert seen == [torch.bfloat16]  # the training forward ran under bf16 autocast
    # bf16 rounds the forward: close to the fp32 loss, but not the same computation
    assert bf16["loss"] != fp32["loss"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.02, abs=1e-3)
    assert bf16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=0.05)
    # master weights and optimizer state stay fp32, and the weights moved
    assert {p.dtype for p in bf16_model.parameters()} == {torch.float32}
    state = trainer.optimizer.state_dict()["state"]
    assert state and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in state.values())
    assert any(not torch.equal(p, q) for p, q in zip(bf16_model.parameters(), policy.parameters()))
    # log-probs come out of autocast in fp32
    with trainer.autocast():
        log_probs, entropy = trainer._log_probs(bf16_model, batch, with_entropy=True)
    assert log_probs.dtype == entropy.dtype == torch.float32


def test_bf16_behaviour_log_probs_make_the_first_ratio_exactly_one(policy):
    """annotate runs the behaviour forward in bf16 too; in fp32 it would not match the bf16
    training forward, and the first (on-policy) update's ratio would not be 1."""
    batch = synthetic_batch(policy, 1.0)
    del batch["old_log_probs"]
    trainer = make_trainer(policy, "bf16")
    trainer.annotate(batch, need_behaviour=True, micro_batch_size=len(batch))
    fp32_behaviour = batch_log_probs(policy, batch, 1.0, len(batch))
    mask = batch["response_mask"]
    assert (batch["old_log_probs"] - fp32_behaviour)[mask].abs().max() > 1e-4
    metrics = trainer.optimizer_step(batch)
    assert metrics["ratio/mean"] == 1.0


# ------------------------------------------------------------------------------------------ fp16


def test_fp16_overflow_skips_the_step_and_halves_the_scale(policy):
    batch = synthetic_batch(policy, 1.0)
    trainer = make_trainer(policy, "fp16", grad_accum_steps=2)
    seen = []
    hook = policy.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    before = params(policy)
    overflow_next_backward(policy)
    skipped = trainer.optimizer_step(batch)
    hook.remove()
    assert seen == [torch.float16, torch.float16]  # both micro-batches' forwards in fp16
    assert skipped["skipped_step"] == 1.0 and skipped["grad_scale"] == FRESH_SCALE
    assert trainer.scaler.get_scale() == FRESH_SCALE / 2
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())  # nothing moved
    assert not trainer.optimizer.state  # the optimizer never stepped: no moments either
    assert all(p.grad is None for p in policy.parameters())

    taken = trainer.optimizer_step(batch)
    assert taken["skipped_step"] == 0.0 and taken["grad_scale"] == FRESH_SCALE / 2
    assert math.isfinite(taken["grad_norm"]) and trainer.scaler.get_scale() == FRESH_SCALE / 2
    assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters())
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())
    # clipping saw the unscaled gradient: its norm matches an fp32 step's, not 2**15 times it
    fp32 = make_trainer(copy.deepcopy(policy), "no")
    assert fp32.optimizer_step(batch)["grad_norm"] == pytest.approx(
        make_trainer(copy.deepcopy(policy), "fp16").optimizer_step(batch)["grad_norm"], rel=0.02)


def test_fp16_scaler_state_round_trips_through_a_checkpoint(policy, tok, tmp_path):
    batch = synthetic_batch(policy, 1.0)
    trainer = make_trainer(policy, "fp16")
    for overflow in (True, False, True, False):
        if overflow:
            overflow_next_backward(policy)
        trainer.optimizer_step(batch)
    saved = trainer.scaler.state_dict()
    assert saved["scale"] == FRESH_SCALE / 4 and saved["_growth_tracker"] == 1
    path = save_checkpoint(tmp_path, 4, policy, tok, {"trainer": trainer.state_dict()})
    state = load_trainer_state(path)  # plain data only (weights_only): the scaler's state must be
    assert state["trainer"]["scaler"] == saved

    restored = make_trainer(build_model(tok, hidden_size=32, num_layers=1), "fp16")
    restored.load_state_dict(state["trainer"])
    assert restored.scaler.state_dict() == saved
    # a checkpoint from before the scaler was saved: a fresh scaler
    older = make_trainer(build_model(tok, hidden_size=32, num_layers=1), "fp16")
    older.load_state_dict({k: v for k, v in state["trainer"].items() if k != "scaler"})
    assert older.scaler.get_scale() == FRESH_SCALE
    # bf16 has no scaler: none saved, and a saved one is ignored
    bf16 = make_trainer(build_model(tok, hidden_size=32, num_layers=1), "bf16")
    assert "scaler" not in bf16.state_dict()
    bf16.load_state_dict(state["trainer"])


def test_fp16_resumed_trainer_continues_exactly(policy, tok, tmp_path):
    """Steps 3-4 after a checkpoint at step 2 equal an uninterrupted run's: the same scale (lowered
    by an overflow before the checkpoint), skip decisions, losses and weights."""
    batch = synthetic_batch(policy, 1.0)
    overflow_at = {1, 3}

    def steps(trainer, model, numbers):
        out = []
        for n in numbers:
            if n in overflow_at:
                overflow_next_backward(model)
            out.append(trainer.optimizer_step(batch))
        return out

    full_model = copy.deepcopy(policy)
    full = steps(make_trainer(full_model, "fp16"), full_model, [1, 2, 3, 4])
    first = make_trainer(policy, "fp16")
    steps(first, policy, [1, 2])
    path = save_checkpoint(tmp_path, 2, policy, tok, {"trainer": first.state_dict()})

    model = build_model(tok, hidden_size=32, num_layers=1)
    load_model_weights(path, model)
    resumed = make_trainer(model, "fp16")
    resumed.load_state_dict(load_trainer_state(path)["trainer"])
    tail = steps(resumed, model, [3, 4])
    assert [m["grad_scale"] for m in full] == [FRESH_SCALE, FRESH_SCALE / 2, FRESH_SCALE / 2, FRESH_SCALE / 4]
    assert [m["skipped_step"] for m in full] == [1.0, 0.0, 1.0, 0.0]
    for got, ref in zip(tail, full[2:]):
        for key in ("grad_scale", "skipped_step", "loss", "lr", "ratio/mean"):
            assert got[key] == ref[key], key
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], nan_ok=True)
    for (name, p), q in zip(full_model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(("line", "message"), [
    ("train.mixed_precision=fp8", "train.mixed_precision='fp8' is unknown; expected one of no, bf16, fp16"),
    ("train.mixed_precision=true", "train.mixed_precision='True' is unknown; expected one of no, bf16, fp16 "
                                   "(TorchRL's true is bf16 here; in YAML write 'no' quoted)"),
    ("train.mixed_precision=bf16 model.dtype=bfloat16",
     "train.mixed_precision=bf16 needs model.dtype=float32 (fp32 master weights); got bfloat16"),
    ("train.mixed_precision=fp16 model.dtype=float16",
     "train.mixed_precision=fp16 needs model.dtype=float32 (fp32 master weights); got float16"),
    ("train.mixed_precision=fp16 train_model.num_devices=2",
     "train.mixed_precision=fp16 with train_model.num_devices=2: use bf16 with sharded training"),
])
def test_bad_mixed_precision_is_one_line_naming_the_key(line, message):
    (cfg,) = jobs(line)
    with pytest.raises(ConfigError) as info:
        check_run(cfg, "sync", available_gpus=8)
    assert info.value.one_line() == "config error: " + message


@pytest.mark.parametrize("value", ["no", "bf16", "fp16"])
def test_mixed_precision_values_pass_and_reach_the_trainer(value, policy):
    from grpo_utils import build

    (cfg,) = jobs(f"train.mixed_precision={value}")
    check_run(cfg, "sync", available_gpus=0)
    trainer = build.trainer(cfg, policy, ClippedSurrogateLoss())
    assert trainer.mixed_precision == value and (trainer.scaler is not None) == (value == "fp16")


def test_trainer_refuses_an_unknown_value(policy):
    with pytest.raises(ValueError, match=r"^train.mixed_precision='fp8' is unknown"):
        make_trainer(policy, "fp8")


# ---------------------------------------------------------------------------------------- recipe


class OverflowingLoss(ClippedSurrogateLoss):
    """GRPO's loss times 8: on the quick start the fp16 backward then overflows at the scaler's
    initial scale (and now and then at half of it), so the scale changes before a checkpoint and
    some later steps are skipped (a user's loss plugged in with ``loss._target_``)."""

    def forward(self, *args, **kwargs) -> LossOutput:
        out = super().forward(*args, **kwargs)
        return LossOutput(loss=out.loss * 8, metrics=out.metrics)


@pytest.mark.slow
def test_bf16_quickstart_learns(env, tmp_path):
    run_dir = tmp_path / "bf16"
    run_recipe(env, f"hydra.run.dir={run_dir}", "train.mixed_precision=bf16")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["heldout_accuracy_after"] - summary["heldout_accuracy_before"] >= 0.3, summary
    assert "grad_scale" not in train_lines(run_dir)[0]


@pytest.mark.slow
def test_fp16_recipe_resumes_with_the_same_scale_sequence(env, tmp_path):
    """Interrupted after step 2 (the later checkpoint dropped) and resumed: the scaler's state
    comes back with the checkpoint, so the grad_scale sequence and every metric match."""
    env = {**env, "PYTHONPATH": str(REPO)}  # the recipe imports this module's loss
    full = tmp_path / "full"
    args = ["train.max_steps=4", "checkpoint.every_n_steps=2", "checkpoint.keep_last=null", "seed=3",
            "train.mixed_precision=fp16", f"loss._target_={__name__}.OverflowingLoss", "eval.before_after=false",
            "eval.every_n_steps=0", "env.num_prompts=4", "env.group_size=4", "train.optim_batch_size=16"]
    run_recipe(env, f"hydra.run.dir={full}", *args)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_4")
    (resumed / "summary.json").unlink()
    proc = run_recipe(env, f"hydra.run.dir={resumed}", *args, "resume=true")
    assert "Resumed from" in proc.stdout and "step 2" in proc.stdout
    ref = {r["step"]: r for r in read_lines(full / "metrics.jsonl") if "reward/mean" in r}
    got = {r["step"]: r for r in read_lines(resumed / "metrics.jsonl") if "reward/mean" in r}
    assert sorted(got) == [1, 2, 3, 4]
    scales = [ref[s]["grad_scale"] for s in (1, 2, 3, 4)]
    assert scales[2] < FRESH_SCALE, scales  # the scale fell before the checkpoint: restoring it matters
    assert [got[s]["grad_scale"] for s in (1, 2, 3, 4)] == scales
    for step in (3, 4):
        for key in ("skipped_step", "reward/mean", "loss", "lr", "entropy", "grad_norm"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-4, abs=1e-6, nan_ok=True), (step, key)
    assert load_trainer_state(resumed / "checkpoints" / "step_4")["trainer"]["scaler"]["scale"] < FRESH_SCALE
