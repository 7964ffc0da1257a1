"""Bad settings, each composed and checked as the recipes do before any model loads
(grpo_utils.config.cli, then grpo_utils.config.validate through check_run): every one stops with a
single line that starts by naming the key and says what was expected."""

from __future__ import annotations

import sys

import pytest
import torch

from grpo_utils.config.validate import check_model_name, resolve_device, seed_everything
from grpo_utils.errors import ConfigError
from grpo_utils.train.run import check_run
from tests.config.test_command_lines import CONFIG, jobs

BAD_CONFIGS = [
    # types (checked on the command line, before Hydra)
    ("train.max_steps=abc", "train.max_steps='abc': Value 'abc' of type 'str' could not be converted to Integer"),
    ("generation.temperature=hot", "generation.temperature='hot': Value 'hot' of type 'str' could not be converted "
                                   "to Float"),
    ("seed=abc", "seed='abc': Value 'abc' of type 'str' could not be converted to Integer"),
    ("train.max_steps=2.5", "train.max_steps=2.5: Value '2.5' of type 'float' could not be converted to Integer"),
    ("train.max_steps=3.0", "train.max_steps=3.0: Value '3.0' of type 'float' could not be converted to Integer"),
    ("env.heldout_count=1.5", "env.heldout_count=1.5: Value '1.5' of type 'float' could not be converted to Integer"),
    ("env.chat_template=sometimes", "env.chat_template='sometimes': Value 'sometimes' is not a valid bool"),
    ("train_model.gradient_checkpointing=maybe", "train_model.gradient_checkpointing='maybe': Value 'maybe' is not a "
                                                 "valid bool"),
    ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing is not a key of this config; use "
                                           "train_model.gradient_checkpointing"),
    # keys and groups
    ("loss=nonexistent", "loss=nonexistent is unknown; expected one of cispo, dapo, dr_grpo, grpo, "),
    ("foo=1", "unknown config key 'foo'; allowed at the top level: advantage, checkpoint, device, "),
    ("train.foo=1", "unknown config key 'train.foo'; allowed in 'train': epochs, grad_accum_steps, max_steps, "),
    ("model.name=~/nope", "cannot parse the override model.name=~/nope (LexerNoViableAltException); quote a value "
                          "with special characters, e.g. key='~/path'"),
    # values
    ("seed=-1", "seed=-1 must be in [0, 2**32-1] (numpy and PYTHONHASHSEED accept no other seeds)"),
    ("seed=4294967296", "seed=4294967296 must be in [0, 2**32-1]"),
    ("model.name=/nonexistent/model", "model.name=/nonexistent/model: no such directory; expected a local model "
                                      "directory or a hub name org/name"),
    ("model.name=./nonexistent", "model.name=./nonexistent: no such directory"),
    ("model.name=../nonexistent", "model.name=../nonexistent: no such directory"),
    ("model.name='~/nonexistent-grpo-model'", "model.name=~/nonexistent-grpo-model: no such directory"),
    ("model.name=runs/a/final_model", "model.name=runs/a/final_model: no such directory"),
    ("device=mps", "device='mps' is not supported; expected auto, cpu, cuda or cuda:N"),
    ("device=foo", "device='foo' is not a torch device; expected auto, cpu, cuda or cuda:N"),
    ("device=cuda:99", "device=cuda:99 but "),
    ("env.quickstart.num_train=0", "env.quickstart.num_train=0 must be >= 1"),
    ("env.quickstart.num_test=0", "env.quickstart.num_test=0 must be >= 1"),
    ("env.dataset=countdown env.countdown.num_train=0", "env.countdown.num_train=0 must be >= 1"),
    ("env.countdown.num_test=-3", "env.countdown.num_test=-3 must be >= 1"),
    ("env.countdown.min_numbers=1", "env.countdown.min_numbers=1 must be >= 2 and <= env.countdown.max_numbers=4"),
    ("env.countdown.max_target=0", "env.countdown.max_target=0 must be >= 1"),
    ("env.heldout_fraction=1.5", "env.heldout_fraction=1.5 must be in [0, 1)"),
    ("env.heldout_fraction=-0.1", "env.heldout_fraction=-0.1 must be in [0, 1)"),
    ("env.heldout_count=-1", "env.heldout_count=-1 must be >= 0"),
]


@pytest.mark.parametrize(("line", "start"), BAD_CONFIGS, ids=[line for line, _ in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_the_key(line, start):
    with pytest.raises(ConfigError) as info:
        for cfg in jobs(line):
            check_run(cfg, "sync", available_gpus=0)
    message = info.value.one_line()
    assert message.startswith("config error: " + start), message
    assert "\n" not in message


def test_seeds_in_range_pass_and_derived_seeds_stay_valid(monkeypatch):
    for seed in (0, 2**32 - 1):
        (cfg,) = jobs(f"seed={seed}")
        check_run(cfg, "sync", available_gpus=0)
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    seed_everything(2**32 - 1 + 2000)  # a collector's seed (seed + 1000 * (i + 1)) may pass 2**32
    import os

    assert 0 <= int(os.environ["PYTHONHASHSEED"]) < 2**32
    with pytest.raises(ConfigError, match=r"^seed=-5 must be in \[0, 2\*\*32-1\]$"):
        seed_everything(-5)


def test_model_name_is_a_model_directory_or_a_hub_name(tmp_path, tiny_dir, monkeypatch):
    from tests.config.test_bad_inputs import hub_cache

    hub_cache(tmp_path / "hub", tiny_dir, "Qwen/Qwen2.5-0.5B", monkeypatch)
    for name in ("builtin:quickstart", "Qwen/Qwen2.5-0.5B", str(tiny_dir)):
        check_model_name(name)  # a hub name is read from the local cache (no network here)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"^model.name=gpt2: no such local directory, and not in the Hugging Face "
                                          r"cache \(offline mode"):
        check_model_name("gpt2")
    with pytest.raises(ConfigError, match=rf"^model.name={tmp_path} is a directory without config.json; expected a "
                                          r"Hugging Face model directory"):
        check_model_name(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"^model.name={tmp_path / 'weights.bin'} is a file; expected a model "
                                          r"directory or a hub name org/name$"):
        check_model_name(str(tmp_path / "weights.bin"))
    (cfg,) = jobs(f"model.name={tmp_path}")
    with pytest.raises(ConfigError, match=rf"^model.name={tmp_path} is a directory without config.json"):
        check_run(cfg, "sync", available_gpus=0)


def test_device_accepts_the_documented_values():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^device=cuda but CUDA is not available; expected auto or cpu here$"):
            resolve_device("cuda")
        with pytest.raises(ConfigError, match=r"^device=cuda:0 but CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.parametrize(("line", "start"), [
    ("loss=nonexistent", "config error: loss=nonexistent is unknown; expected one of "),
    ("foo=1", "config error: unknown config key 'foo'; allowed at the top level: "),
    ("model.name=~/nope", "config error: cannot parse the override model.name=~/nope"),
    ("train.max_steps=2.5", "config error: train.max_steps=2.5: Value '2.5' of type 'float' could not be converted"),
])
def test_recipe_launch_stops_before_hydra_with_one_line(monkeypatch, capsys, line, start):
    """What a recipe's ``launch`` does with the command line: one line and a non-zero exit, and
    Hydra (its multi-line message, its HYDRA_FULL_ERROR hint) never runs."""
    from grpo_utils.launch import launch

    monkeypatch.setattr(sys, "argv", ["grpo-sync.py", *line.split()])
    with pytest.raises(SystemExit) as info:
        launch(lambda: pytest.fail("Hydra's main ran"), mode="sync", config_dir=CONFIG)
    assert isinstance(info.value.code, str) and info.value.code.startswith(start), info.value.code
    assert "\n" not in info.value.code and "HYDRA_FULL_ERROR" not in info.value.code + capsys.readouterr().err
