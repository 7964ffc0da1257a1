"""TorchRL users' command lines, composed and checked as the recipes do before anything loads
(no model, no Ray): each either runs what the user means or stops with one line naming the key
to use, or the hardware that is short."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from grpo_utils.config.cli import check_command_line, compose_jobs, renamed
from grpo_utils.errors import ConfigError
from grpo_utils.train.run import check_run

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"


def jobs(line: str, mode: str = "sync"):
    return compose_jobs(line.split(), CONFIG, "grpo_quickstart", mode)


def check(line: str, mode: str = "sync", gpus: int = 0):
    """Compose every job of ``line`` and run the recipe's pre-load checks on a machine with ``gpus``."""
    composed = jobs(line, mode)
    for cfg in composed:
        check_run(cfg, mode, available_gpus=gpus)
    return composed


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_devices_line_reaches_the_resource_check(mode):
    line = f"mode={mode} train_model.num_devices=2 ref_model.num_devices=2 inference_model.num_devices=2"
    with pytest.raises(ConfigError, match=r"^not enough GPUs: train_model.num_devices=2 \+ ref_model.num_devices=2 "
                                          r"\+ inference_model.num_devices=2 = 6 GPUs, but the machine has 0 "
                                          r"\(short by 6\)$"):
        check(line, mode)


def test_devices_line_on_a_big_enough_machine_checks_the_reference():
    """TorchRL's device line passes the machine check on 8 GPUs; two trainer ranks are built now,
    the reference needs a KL term and runs on one device (it only runs forward passes)."""
    line = "mode=sync train_model.num_devices=2 ref_model.num_devices=2 inference_model.num_devices=2"
    with pytest.raises(ConfigError, match=r"^ref_model.num_devices=2 but no reference model is loaded "
                                          r"\(loss.kl_coef=0\)$"):
        check(line, gpus=8)
    with pytest.raises(ConfigError, match=r"^ref_model.num_devices=2: a reference over several devices is not "
                                          r"supported"):
        check(line + " loss.kl_coef=0.1", gpus=8)


def test_ifeval_config_name_needs_its_data_path(shipped_hub_models):
    (cfg,) = jobs("mode=sync --config-name grpo_ifeval")
    assert (cfg.env.dataset, cfg.reward.name, cfg.mode.name) == ("ifeval", "ifeval", "sync")
    with pytest.raises(ConfigError, match=r"^env.train_path is required for env.dataset=ifeval"):
        check_run(cfg, "sync", available_gpus=0)
    (cfg,) = check("mode=sync --config-name grpo_ifeval env.train_path=" + str(CONFIG / "grpo_ifeval.yaml"))
    assert cfg.env.heldout_fraction == 0.1


def test_env_dataset_alone_scores_with_the_datasets_own_reward():
    from grpo_utils.config.validate import reward_config

    (cfg,) = jobs("mode=sync env.dataset=ifeval")
    assert reward_config(cfg)["name"] == "ifeval"  # not the quick start's numeric_answer (always 0 on IFEval)
    for dataset, reward in (("countdown", "countdown"), ("gsm8k", "gsm8k"), ("math", "math"),
                            ("quickstart", "numeric_answer")):
        (cfg,) = jobs(f"env.dataset={dataset}")
        assert reward_config(cfg)["name"] == reward
    (cfg,) = jobs("env.dataset=jsonl")
    with pytest.raises(ConfigError, match=r"^reward.name is required with env.dataset=jsonl"):
        reward_config(cfg)
    (cfg,) = jobs("env.dataset=ifeval reward.name=numeric_answer")  # an explicit choice is kept
    assert reward_config(cfg)["name"] == "numeric_answer"


def test_optimizer_keys_are_torchrls():
    (cfg,) = check("mode=sync optimizer.lr=2e-5 optimizer.weight_decay=0.01")
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (2e-5, 0.01)


def test_model_name_is_torchrls(tmp_path, tiny_dir, monkeypatch):
    from tests.config.test_bad_inputs import hub_cache

    hub_cache(tmp_path, tiny_dir, "meta-llama/Llama-2-7b-hf", monkeypatch)  # a hub name is read from the cache
    (cfg,) = check("mode=sync model.name=meta-llama/Llama-2-7b-hf")
    assert cfg.model.name == "meta-llama/Llama-2-7b-hf"


def test_learning_rate_sweep_makes_one_job_per_value():
    composed = check("-m mode=sync optimizer.lr=1e-4,1e-5,1e-6")
    assert [cfg.optimizer.lr for cfg in composed] == [1e-4, 1e-5, 1e-6]


def test_sweep_over_a_torchrl_kl_key_names_ours():
    with pytest.raises(ConfigError, match=r"^train.kl_to_ref_coeff is not a key of this config; use loss.kl_coef"):
        check("-m mode=sync optimizer.lr=1e-4,1e-5 train.kl_to_ref_coeff=0.01,0.1")
    composed = check("-m mode=sync optimizer.lr=1e-4,1e-5 loss.kl_coef=0.01,0.1")
    assert [(c.optimizer.lr, c.loss.kl_coef) for c in composed] == [(1e-4, 0.01), (1e-4, 0.1), (1e-5, 0.01),
                                                                     (1e-5, 0.1)]


@pytest.mark.parametrize(("key", "ours"), [
    ("train.kl_to_ref_coeff", "loss.kl_coef"), ("train.kl_to_inference_coeff", "loss.behaviour_kl_coef"),
    ("train.kl_coef_in_loss", "loss.kl_in"), ("train.entropy_coeff", "loss.entropy_coef"),
    ("train.sync_iter", "mode.sync_iter"), ("train.gradient_accumulation_steps", "train.grad_accum_steps"),
    ("train.checkpoint_frequency", "checkpoint.every_n_steps"), ("train.total_dialog_turns", "train.max_steps"),
    ("env.repeats", "env.group_size"), ("env.num_envs", "env.num_prompts"), ("train.lr", "optimizer.lr"),
    ("model.gradient_checkpointing", "train_model.gradient_checkpointing"),
    ("mode.collector_gpus", "inference_model.num_devices"), ("loss.dynamic_sampling", "shaping.dynamic_sampling"),
    ("rollout.engine", "rollout"),
])
def test_renamed_keys_name_the_key_to_use(key, ours):
    with pytest.raises(ConfigError, match=rf"^{key} is not a key of this config; use {ours}\b"):
        check_command_line([f"{key}=1"], CONFIG, "grpo_quickstart")
    # ... and every key pointed to exists in the composed config
    (cfg,) = jobs("")
    from omegaconf import OmegaConf

    assert OmegaConf.select(cfg, ours, default="missing") != "missing", ours


def test_features_not_here_say_so():
    assert "quantized training is not available" in renamed("train_model.quantization.load_in_4bit")
    # LoRA is here now: its keys pass the command-line check and compose
    assert renamed("train_model.lora.enabled") is None
    check_command_line(["train_model.lora.enabled=true", "train_model.lora.r=4",
                        "train_model.lora.target_modules=[q_proj,v_proj]"], CONFIG, "grpo_quickstart")
    (cfg,) = jobs("train_model.lora.enabled=true train_model.lora.target_modules=all-linear")
    assert cfg.train_model.lora.enabled is True and cfg.train_model.lora.target_modules == "all-linear"
    with pytest.raises(ConfigError, match=r"^unknown config key 'train_model.lora.rank'; allowed in "
                                          r"'train_model.lora': alpha, dropout, enabled, r, target_modules$"):
        check_command_line(["train_model.lora.rank=4"], CONFIG, "grpo_quickstart")


def test_torchrl_vllm_keys_are_keys_of_this_config():
    for key in ("backend", "gpu_memory_utilization", "enforce_eager", "enable_prefix_caching", "tensor_parallel_size"):
        assert renamed(f"inference_model.{key}") is None, key
    line = ("inference_model.backend=vllm inference_model.gpu_memory_utilization=0.5 inference_model.enforce_eager=true "
            "inference_model.enable_prefix_caching=false inference_model.max_model_len=256")
    (cfg,) = jobs(line)
    inf = cfg.inference_model
    assert (inf.backend, inf.gpu_memory_utilization, inf.enforce_eager, inf.enable_prefix_caching,
            inf.max_model_len) == ("vllm", 0.5, True, False, 256)
    with pytest.raises(ConfigError, match=r"^inference_model.torch_dtype is not a key of this config; use "
                                          r"inference_model.dtype\b"):
        check_command_line(["inference_model.torch_dtype=bfloat16"], CONFIG, "grpo_quickstart")


@pytest.mark.parametrize(("line", "message"), [
    ("env.num_promps=3", r"^unknown config key 'env.num_promps' \(did you mean env.num_prompts\?\); allowed in 'env'"),
    ("train.max_steps=abc", r"^train.max_steps='abc': Value 'abc' of type 'str' could not be converted to Integer"),
    ("mode.max_staleness=0", r"^mode.max_staleness is not a mode=sync setting; it is a mode=async setting"),
    ("loss=reinforce loss.clip_eps_high=0.3", r"^unknown config key 'loss.clip_eps_high'; allowed in 'loss'"),
    ("loss=foo", r"^loss=foo is unknown; expected one of cispo, dapo, dr_grpo, grpo, "),
    ("+env.typo=1", r"^unknown config key 'env.typo'"),
    ("reward.format_weight=0.1", r"a reward's options are added with \+reward.<option>=..."),
])
def test_bad_command_lines_are_one_line(line, message):
    with pytest.raises(ConfigError, match=message):
        check_command_line(line.split(), CONFIG, "grpo_quickstart")


def test_sync_iter_false_without_ray_is_refused():
    with pytest.raises(ConfigError, match=r"^mode.sync_iter=false needs mode.ray=true"):
        check("mode.sync_iter=false")
    (cfg,) = check("mode.ray=true mode.sync_iter=false mode.cluster_cpus=2")
    assert cfg.mode.sync_iter is False


def test_each_recipe_defaults_to_its_own_mode():
    """``grpo-async.py`` with its own default config runs async (``--cfg job`` prints the config
    Hydra composed, after the recipe's command-line check, and stops before training)."""
    for recipe, mode in (("grpo-sync.py", "sync"), ("grpo-async.py", "async")):
        out = subprocess.run([sys.executable, str(REPO / "sota-implementations" / "grpo" / recipe), "--cfg", "job"],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"name: {mode}\n" in out.stdout
    (cfg,) = check("", mode="async")
    assert cfg.mode.name == "async"


def test_recipe_prints_the_one_line_before_hydra():
    out = subprocess.run([sys.executable, str(REPO / "sota-implementations" / "grpo" / "grpo-sync.py"),
                          "train.kl_to_ref_coeff=0.1"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "config error: train.kl_to_ref_coeff is not a key of this config; use loss.kl_coef (> 0 loads a frozen "
        "reference model)"]


def test_rollout_engine_is_named_by_its_class():
    (cfg,) = check("rollout=collector")
    assert cfg.rollout._target_ == "grpo_utils.rollout.collector.CollectorRollout"
    (cfg,) = check("rollout._target_=tests.config.test_command_lines.MyRollout")  # a user's own engine
    from grpo_utils.config.validate import rollout_class

    assert rollout_class(cfg) is MyRollout
    with pytest.raises(ConfigError, match=r"^rollout._target_=builtins.dict must be a GroupRollout subclass"):
        check("rollout._target_=builtins.dict")
    with pytest.raises(ConfigError, match=r"^rollout=Coll.* needs the chat template"):
        check("rollout=collector env.chat_template=false")


from grpo_utils.rollout.group import GroupRollout  # noqa: E402


class MyRollout(GroupRollout):
    """A user's engine: same constructor and batches, e.g. another generator behind ``generate``."""
