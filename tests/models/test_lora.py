"""LoRA on the policy (grpo_utils/models/lora.py): trainable parameters, merged weights, the
adapters-off reference, checkpoints (merged model + adapter/) and resume, config errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForCausalLM

from grpo_utils import build
from grpo_utils.errors import CheckpointError, ConfigError
from grpo_utils.models.lora import (
    AdaptersDisabled,
    apply_lora,
    base_model,
    check_checkpoint,
    is_lora,
    merged_state_dict,
)
from grpo_utils.models.tiny import build_model
from grpo_utils.train.checkpoint import load_model_weights, save_checkpoint, save_final_model, verify_checkpoint
from grpo_utils.train.trainer import make_optimizer
from tests.config.test_command_lines import jobs
from tests.train.test_checkpoint import StubTokenizer

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_cfg(**overrides):
    base = {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ATTENTION}
    return OmegaConf.create({**base, **overrides})


def plain(tok, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tok, hidden_size=32, num_layers=2).eval()


def with_random_adapters(model, seed: int = 1):
    """LoRA initialises B to zero (merged = base); give B values so the adapters change something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def ids():
    return torch.tensor([[5, 17, 99, 3, 42, 7], [0, 0, 11, 12, 13, 14]]), torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])


def logits(model):
    input_ids, mask = ids()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask).logits


@pytest.mark.parametrize("targets", [ATTENTION, ["q_proj", "v_proj"], "all-linear"])
def test_only_the_adapters_train(tok, targets):
    model = plain(tok)
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    r = 4
    if targets == "all-linear":  # every linear layer but the output layer
        chosen = [m for n, m in linear.items() if n != "lm_head"]
    else:
        chosen = [m for n, m in linear.items() if n.rpartition(".")[2] in targets]
    expected = sum(r * (m.in_features + m.out_features) for m in chosen)
    assert len(chosen) == 2 * (7 if targets == "all-linear" else len(targets))

    policy = apply_lora(model, lora_cfg(r=r, target_modules=targets))
    assert is_lora(policy) and not is_lora(model) and base_model(policy) is model
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    optimizer = make_optimizer(policy, 1e-3, 0.0, (0.9, 0.99), 1e-8)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == expected


def test_merged_weights_are_base_plus_the_scaled_product(tok):
    model = plain(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keys = list(before)
    policy = with_random_adapters(apply_lora(model, lora_cfg(r=4, alpha=8.0)))
    merged = merged_state_dict(policy)
    assert list(merged) == keys  # the plain model's names, in its order (collective sync buckets rely on it)
    inner = policy.get_base_model()
    for name in keys:
        layer, _, leaf = name.rpartition(".")
        if leaf == "weight" and layer.rpartition(".")[2] in ATTENTION:
            module = inner.get_submodule(layer)
            b, a = module.lora_B["default"].weight, module.lora_A["default"].weight
            expected = before[name] + (b @ a) * (8.0 / 4)
            assert not torch.equal(merged[name], before[name])
            torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged[name], before[name]), name
    # PEFT's own merge on a copy agrees, and the live module was never merged
    unloaded = copy.deepcopy(policy).merge_and_unload().state_dict()
    for name in keys:
        torch.testing.assert_close(merged[name], unloaded[name], rtol=0, atol=1e-6)
    assert not any(m.merged for m in inner.modules() if hasattr(m, "merged_adapters"))
    assert torch.equal(inner.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight,
                       before["model.layers.0.self_attn.q_proj.weight"])
    # a plain model's merged weights are its state dict; its layout is what the collective sync sizes from
    from grpo_utils.distributed.weight_sync import _layout

    fresh = plain(tok)
    assert _layout(merged_state_dict(fresh)) == _layout(fresh.state_dict()) == _layout(merged)


def test_merged_weights_generate_what_the_policy_generates(tok):
    policy = with_random_adapters(apply_lora(plain(tok), lora_cfg()))
    copy_ = plain(tok, seed=5)  # other weights, overwritten by the merged ones (as a Ray collector's copy)
    copy_.load_state_dict(merged_state_dict(policy))
    torch.testing.assert_close(logits(copy_), logits(policy), rtol=0, atol=1e-5)


def test_reference_is_the_base_with_adapters_off(tok):
    model = plain(tok)
    base_logits = logits(model)
    policy = apply_lora(model, lora_cfg(dropout=0.1))
    cfg = OmegaConf.create({"ref_model": {"path": None, "device": None, "num_devices": 0}})
    ref = build.reference(cfg, policy, torch.device("cpu"))
    assert isinstance(ref, AdaptersDisabled) and ref.policy is policy
    assert list(ref.parameters()) == [] and list(ref.state_dict()) == []  # nothing counted twice
    assert torch.equal(logits(ref), base_logits)

    policy.train()
    optimizer = make_optimizer(policy, 1e-2, 0.0, (0.9, 0.99), 1e-8)
    for _ in range(2):  # two steps: the first only moves B (it starts at zero), the second both
        input_ids, mask = ids()
        policy(input_ids=input_ids, attention_mask=mask).logits.logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert policy.training  # the reference's forward leaves the policy's mode alone
    assert torch.equal(logits(ref), base_logits)
    assert policy.training
    assert (logits(policy) - base_logits).abs().max() > 1e-4
    # the trainer's reference log-probs come from it too (batch_log_probs switches modes around it)
    from grpo_utils.algo.logprobs import response_log_probs

    input_ids, mask = ids()
    got, _ = response_log_probs(ref, input_ids, mask, 3)
    want, _ = response_log_probs(plain(tok), input_ids, mask, 3)
    assert torch.equal(got, want)


def test_gradient_checkpointing_still_trains_the_adapters(tok):
    model = plain(tok)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    policy = apply_lora(model, lora_cfg())
    policy.train()
    input_ids, mask = ids()
    policy(input_ids=input_ids, attention_mask=mask).logits.mean().backward()
    grads = [p.grad for n, p in policy.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)


def test_checkpoint_holds_the_merged_model_and_the_adapter(tok, tmp_path):
    policy = with_random_adapters(apply_lora(plain(tok), lora_cfg()))
    step = save_checkpoint(tmp_path, 3, policy, StubTokenizer(), {"step": 3})
    assert (step / "adapter" / "adapter_config.json").is_file()
    assert (step / "adapter" / "adapter_model.safetensors").is_file()
    assert not (step / "adapter" / "README.md").exists()
    files = json.loads((step / "manifest.json").read_text())["files"]
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "model.safetensors"} <= set(files)
    assert verify_checkpoint(step) is None

    merged = AutoModelForCausalLM.from_pretrained(step)  # the trained policy, as a plain model
    assert not is_lora(merged)
    torch.testing.assert_close(logits(merged.eval()), logits(policy), rtol=0, atol=1e-5)
    adapted = PeftModel.from_pretrained(plain(tok), step / "adapter")  # the adapter, on the base
    torch.testing.assert_close(logits(adapted), logits(policy), rtol=0, atol=1e-6)

    # resume: the adapter loads exactly into a fresh LoRA policy on the same base
    fresh = apply_lora(plain(tok), lora_cfg())
    load_model_weights(step, fresh)
    want = {k: v for k, v in policy.state_dict().items() if "lora_" in k}
    got = fresh.state_dict()
    assert want and all(torch.equal(got[k], v) for k, v in want.items())
    # ... but not into a plain model (it would need the base, not the merged weights)
    with pytest.raises(CheckpointError, match=r"holds a LoRA adapter \(adapter/\); it resumes only with "
                                              r"train_model.lora.enabled=true"):
        load_model_weights(step, plain(tok))

    final = save_final_model(tmp_path, policy, StubTokenizer(), checkpoint=step)
    assert (final / "adapter" / "adapter_model.safetensors").is_file() and verify_checkpoint(final) is None

    # a damaged adapter is caught by the manifest
    weights = step / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert verify_checkpoint(step) == "adapter/adapter_model.safetensors: checksum mismatch"


def test_a_checkpoint_resumes_only_as_what_it_is(tok, tmp_path):
    lora_step = save_checkpoint(tmp_path / "a", 2, apply_lora(plain(tok), lora_cfg()), None, {"step": 2})
    full_step = save_checkpoint(tmp_path / "b", 2, plain(tok), None, {"step": 2})
    check_checkpoint(lora_step, lora_cfg())
    check_checkpoint(full_step, lora_cfg(enabled=False))
    with pytest.raises(CheckpointError, match=r"^checkpoint step_2 holds a LoRA adapter \(adapter/\); it resumes "
                                              r"only with train_model.lora.enabled=true"):
        check_checkpoint(lora_step, lora_cfg(enabled=False), "step_2")
    with pytest.raises(CheckpointError, match=r"holds full-model weights \(no adapter/\); it resumes only with "
                                              r"train_model.lora.enabled=false$"):
        check_checkpoint(full_step, lora_cfg())
    with pytest.raises(ConfigError, match=r"^train_model.lora.r=8 differs from checkpoint .*'s adapter \(r=4\)"):
        check_checkpoint(lora_step, lora_cfg(r=8))
    with pytest.raises(ConfigError, match=r"^train_model.lora.target_modules=\['q_proj'\] differs"):
        check_checkpoint(lora_step, lora_cfg(target_modules=["q_proj"]))


def test_a_target_that_matches_nothing_is_one_line(tok):
    with pytest.raises(ConfigError, match=r"^train_model.lora.target_modules: 'qkv_proj' matches no module of the "
                                          r"model \(its linear layers: q_proj, k_proj, v_proj, o_proj, gate_proj, "
                                          r"up_proj, down_proj, lm_head\)$"):
        apply_lora(plain(tok), lora_cfg(target_modules=["q_proj", "qkv_proj"]))


@pytest.mark.parametrize(("line", "message"), [
    ("train_model.lora.r=0", "train_model.lora.r=0 must be >= 1"),
    ("train_model.lora.alpha=0", "train_model.lora.alpha=0.0 must be > 0"),
    ("train_model.lora.dropout=1", "train_model.lora.dropout=1.0 must be in [0, 1)"),
    ("train_model.lora.dropout=-0.1", "train_model.lora.dropout=-0.1 must be in [0, 1)"),
    ("train_model.lora.target_modules=[]", "train_model.lora.target_modules=[] is empty"),
    ("train_model.lora.target_modules=qproj", "train_model.lora.target_modules='qproj': expected a list of layer "
                                              "names, e.g. [q_proj,v_proj], or all-linear"),
])
def test_bad_lora_settings_are_one_line(line, message):
    from grpo_utils.train.run import check_run

    (cfg,) = jobs(f"train_model.lora.enabled=true {line}")
    with pytest.raises(ConfigError) as e:
        check_run(cfg, "sync")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_build_applies_lora_to_the_trained_copy_only(tiny_dir):
    (cfg,) = jobs(f"model.name={tiny_dir} train_model.lora.enabled=true train_model.lora.r=2")
    policy, _ = build.policy(cfg, torch.device("cpu"))
    assert is_lora(policy) and policy.peft_config["default"].r == 2
    generating, _ = build.policy(cfg, torch.device("cpu"), for_training=False)  # a Ray collector's copy
    assert not is_lora(generating)
    (off,) = jobs(f"model.name={tiny_dir}")
    assert not is_lora(build.policy(off, torch.device("cpu"))[0])
