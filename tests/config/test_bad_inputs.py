"""Bad inputs a new user tries, by class: each row is one input and the start of the one line it
must stop with, raised by the checks that run before any model loads (``check_run``, the recipes'
pre-load entry point; the model loaders are made to fail the test if anything reaches them).
README "Running" lists the classes; the tables here are the cases that are kept passing."""

from __future__ import annotations

import math

import pytest

from grpo_utils.errors import ConfigError, GRPOError
from grpo_utils.train.run import check_run
from tests.config.test_command_lines import jobs


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Every refusal here must come before a model or tokenizer is loaded."""
    import transformers

    def loaded(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the bad input was refused")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", loaded)


def refused(line: str, mode: str = "sync") -> str:
    """The one line ``line`` stops with, composed and checked as the recipes do before loading."""
    with pytest.raises(GRPOError) as info:
        for cfg in jobs(line, mode):
            check_run(cfg, mode, available_gpus=0)
    message = info.value.one_line()
    assert "\n" not in message, message
    return message


def table(rows):
    return pytest.mark.parametrize(("line", "expected"), rows, ids=[r[0] for r in rows])


# --------------------------------------------------------------------- numbers: range, finiteness
NUMBERS = [
    ("optimizer.lr=inf", "config error: optimizer.lr=inf must be a finite number in (0, 1]"),
    ("optimizer.lr=nan", "config error: optimizer.lr=nan must be a finite number in (0, 1]"),
    ("optimizer.lr=1e30", "config error: optimizer.lr=1e+30 must be in (0, 1]"),
    ("optimizer.lr=-1e-5", "config error: optimizer.lr=-1e-05 must be in (0, 1]"),
    ("optimizer.weight_decay=inf", "config error: optimizer.weight_decay=inf must be a finite number in [0, 100]"),
    ("optimizer.weight_decay=1e9", "config error: optimizer.weight_decay=1000000000.0 must be in [0, 100]"),
    ("optimizer.eps=2.0", "config error: optimizer.eps=2.0 must be in (0, 1)"),
    ("optimizer.clip_grad_norm=inf", "config error: optimizer.clip_grad_norm=inf must be a finite number > 0"),
    ("optimizer.min_lr_ratio=-inf", "config error: optimizer.min_lr_ratio=-inf must be a finite number in [0, 1]"),
    ("loss.kl_coef=inf", "config error: loss.kl_coef=inf must be a finite number"),
    ("loss.clip_eps_low=nan", "config error: loss.clip_eps_low=nan must be a finite number"),
    ("generation.temperature=inf", "config error: generation.temperature=inf must be a finite number in (0, 100]"),
    ("generation.temperature=1e6", "config error: generation.temperature=1000000.0 must be in (0, 100]"),
    ("generation.top_p=nan", "config error: generation.top_p=nan must be a finite number in (0, 1]"),
    ("eval.temperature=-inf", "config error: eval.temperature=-inf must be a finite number in (0, 100]"),
    ("env.heldout_fraction=nan", "config error: env.heldout_fraction=nan must be a finite number in [0, 1)"),
    ("train_model.timeout_s=inf", "config error: train_model.timeout_s=inf must be a finite number > 0"),
    ("train_model.lora.enabled=true train_model.lora.alpha=inf",
     "config error: train_model.lora.alpha=inf must be a finite number > 0"),
    ("advantage.eps=inf", "config error: advantage.eps=inf must be a finite number < 1"),
    ("shaping.overlong_penalty=inf", "config error: shaping.overlong_penalty=inf must be a finite number <= 1000"),
    ("mode.actor_timeout_s=inf", "config error: mode.actor_timeout_s=inf must be a finite number > 0"),
    ("env.shuffle=2", "config error: env.shuffle=2: expected true or false"),
    ("train_model.gradient_checkpointing=-1", "config error: train_model.gradient_checkpointing=-1: expected true or "
                                              "false"),
    ("logger.log_every=0", "config error: logger.log_every=0 must be >= 1"),
    ("num_threads=-2", "config error: num_threads=-2 must be >= 0"),
]


@table(NUMBERS)
def test_numbers_out_of_range_or_not_finite(line, expected):
    assert refused(line).startswith(expected)


# ------------------------------------------------------------------ keys that would have no effect
NO_EFFECT = [(f"inference_model.{key}", f"config error: inference_model.{key.split('=')[0]}=") for key in (
    "gpu_memory_utilization=0.5", "tensor_parallel_size=2", "sleep=true", "enforce_eager=true",
    "enable_prefix_caching=false", "max_model_len=512", "cpu_kv_cache_gib=4", "probe_every=3",
    "probe_tolerance=0.01", "dtype=bfloat16")] + [
    ("train_model.lora.r=16", "config error: train_model.lora.r=16 has no effect with train_model.lora.enabled=false "
                              "(it applies only with train_model.lora.enabled=true)"),
    ("train_model.lora.alpha=32", "config error: train_model.lora.alpha=32.0 has no effect"),
    ("train_model.lora.dropout=0.1", "config error: train_model.lora.dropout=0.1 has no effect"),
    ("train_model.lora.target_modules=all-linear", "config error: train_model.lora.target_modules=all-linear has no "
                                                   "effect"),
]


@table(NO_EFFECT)
def test_keys_without_effect_are_refused_saying_why(line, expected):
    message = refused(line)
    assert message.startswith(expected), message
    assert "has no effect with" in message and "; remove it or set" in message


@pytest.mark.parametrize("line", [
    "inference_model.gpu_memory_utilization=null inference_model.sleep=null inference_model.probe_every=1",
    "train_model.lora.r=8 train_model.lora.alpha=16",  # the defaults: not "set"
    "inference_model.backend=vllm inference_model.gpu_memory_utilization=0.5 inference_model.probe_every=3",
    "train_model.lora.enabled=true train_model.lora.r=16",
])
def test_keys_at_their_default_or_where_they_apply_pass(line, monkeypatch):
    import importlib.util

    if "vllm" in line and importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    for cfg in jobs(line):
        check_run(cfg, "sync", available_gpus=0)


# ----------------------------------------------------------------------------- the Python API
API = [
    ({"learning_rate": math.inf}, "config error: GRPOConfig.learning_rate=inf must be a finite number"),
    ({"learning_rate": 1e30}, "config error: GRPOConfig.learning_rate=1e+30 must be in (0, 1]"),
    ({"temperature": math.nan}, "config error: GRPOConfig.temperature=nan must be a finite number"),
    ({"max_grad_norm": -math.inf}, "config error: GRPOConfig.max_grad_norm=-inf must be a finite number"),
    ({"kl_coef": math.inf}, "config error: GRPOConfig.kl_coef=inf must be a finite number"),
    ({"lr": 1e-5}, "config error: GRPOConfig got an unknown field 'lr'"),
    ({"learning_rte": 1e-5}, "config error: GRPOConfig got an unknown field 'learning_rte' (did you mean "
                             "learning_rate?)"),
]


@pytest.mark.parametrize(("kwargs", "expected"), API, ids=[repr(kwargs) for kwargs, _ in API])
def test_api_config_errors_are_the_projects_error_type(kwargs, expected):
    from grpo_utils.api.config import GRPOConfig

    with pytest.raises(ConfigError) as info:
        GRPOConfig(**kwargs)
    assert info.value.one_line().startswith(expected), info.value.one_line()
    assert "\n" not in info.value.one_line()
