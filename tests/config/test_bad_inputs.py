"""Bad inputs a new user tries, by class: each row is one input and the start of the one line it
must stop with, raised by the checks that run before any model loads (``check_run``, the recipes'
pre-load entry point; the model loaders are made to fail the test if anything reaches them).
README "Running" lists the classes; the tables here are the cases that are kept passing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

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
    ("resume=5", "config error: resume=5: expected true, false, must, or a checkpoint or run directory"),
    ("resume=[a]", "config error: resume=['a']: expected true, false, must"),
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
    ("env.countdown.seed=3", "config error: env.countdown.seed=3 has no effect with env.dataset=quickstart (it "
                             "applies only with env.dataset=countdown)"),
    ("env.dataset=countdown env.quickstart.num_train=100", "config error: env.quickstart.num_train=100 has no effect "
                                                           "with env.dataset=countdown"),
    ("shaping.max_resample_rounds=3", "config error: shaping.max_resample_rounds=3 has no effect with "
                                      "shaping.dynamic_sampling=false"),
    ("mode=async mode.in_flight_chunk_tokens=4", "config error: mode.in_flight_chunk_tokens=4 has no effect with "
                                                 "mode.in_flight_updates=false"),
]


@table(NO_EFFECT)
def test_keys_without_effect_are_refused_saying_why(line, expected):
    message = refused(line, mode="async" if line.startswith("mode=async") else "sync")
    assert message.startswith(expected), message
    assert "has no effect with" in message and "; remove it or set" in message


def test_in_flight_updates_need_vllm():
    assert refused("mode=async mode.in_flight_updates=true", mode="async").startswith(
        "config error: mode.in_flight_updates=true needs inference_model.backend=vllm")


@pytest.mark.parametrize("line", [
    "inference_model.gpu_memory_utilization=null inference_model.sleep=null inference_model.probe_every=1",
    "train_model.lora.r=8 train_model.lora.alpha=16",  # the defaults: not "set"
    "inference_model.backend=vllm inference_model.gpu_memory_utilization=0.5 inference_model.probe_every=3",
    "train_model.lora.enabled=true train_model.lora.r=16",
    "env.dataset=countdown env.countdown.seed=3 env.quickstart.num_train=5000",
    "shaping=dapo",  # sets max_resample_rounds with dynamic_sampling on
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


def hub_cache(cache: Path, model_dir: Path, repo: str, monkeypatch) -> Path:
    """A Hugging Face hub cache (as ``snapshot_download`` leaves it) holding ``model_dir`` as ``repo``;
    returns the snapshot directory."""
    from huggingface_hub import constants

    commit = "0" * 40
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(model_dir, snapshot)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return snapshot


# -------------------------------------------------- model directories (read, never loaded)
def _json(name: str, text: str):
    return lambda d: (d / name).write_text(text)


def _edit_config(**changes):
    def edit(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        config.update(changes)
        (d / "config.json").write_text(json.dumps(config))
    return edit


def _truncate(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _remove(*names: str):
    return lambda d: [(d / n).unlink() for n in names if (d / n).exists()]


def _sharded(d: Path) -> None:
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))


MODEL_DIRS = [
    ("invalid config.json", _json("config.json", '{"model_type": "qwen2",'), "config.json:1: not valid JSON"),
    ("empty config.json", _json("config.json", ""), "config.json is empty; expected a JSON object"),
    ("config.json not an object", _json("config.json", "[1, 2]"), "config.json is a JSON list, expected an object"),
    ("no model_type", _edit_config(model_type=None), "config.json has no model_type"),
    ("unknown model_type", _edit_config(model_type="qwen9"), "config.json's model_type='qwen9' is unknown to the "
                                                             "installed transformers"),
    ("not a causal LM", _edit_config(model_type="vit"), "model_type='vit' has no causal language model class"),
    ("no weights", _remove("model.safetensors"), "no weights in"),
    ("truncated safetensors", _truncate, "model.safetensors is truncated: its header lists"),
    ("not safetensors", _json("model.safetensors", "garbage"), "model.safetensors is not a readable safetensors "
                                                               "file"),
    ("vocab differs from the weights", _edit_config(vocab_size=1000), "weight model.embed_tokens.weight has shape"),
    ("width differs from the weights", _edit_config(hidden_size=64), "but config.json says vocab_size="),
    ("layers differ from the weights", _edit_config(num_hidden_layers=3), "the weights have 1 layers but config.json "
                                                                         "says num_hidden_layers=3"),
    ("index names a missing shard", _sharded, "model-00002-of-00002.safetensors is missing (listed in "
                                              "model.safetensors.index.json)"),
    ("no tokenizer files", _remove("tokenizer.json", "vocab.json", "merges.txt"), "no tokenizer files in"),
    ("invalid tokenizer_config.json", _json("tokenizer_config.json", "{"), "tokenizer_config.json:1: not valid JSON"),
]


@pytest.fixture
def model_copy(tmp_path, tiny_dir) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


@pytest.mark.parametrize(("case", "break_it", "expected"), MODEL_DIRS, ids=[c for c, _, _ in MODEL_DIRS])
def test_broken_model_directory_is_one_line(case, break_it, expected, model_copy):
    break_it(model_copy)
    message = refused(f"model.name={model_copy}")
    assert message.startswith(f"config error: model.name={model_copy}: "), message
    assert expected in message, message
    if "tokenizer" not in case:  # the reference needs no tokenizer of its own; everything else the same
        message = refused(f"ref_model.path={model_copy} loss.kl_coef=0.1")
        assert message.startswith(f"config error: ref_model.path={model_copy}: ") and expected in message, message


def test_model_settings_that_cannot_fit_the_model(tiny_dir, tmp_path):
    assert refused(f"model.name={tiny_dir} generation.max_new_tokens=100000").startswith(
        "config error: generation.max_new_tokens=100000 leaves no room for a prompt in the model's context of 8192 "
        "positions")
    assert refused(f"model.name={tiny_dir} train_model.lora.enabled=true train_model.lora.r=100000").startswith(
        "config error: train_model.lora.r=100000 exceeds the model's width hidden_size=32")


@pytest.mark.parametrize(("env", "expected"), [
    ({"HF_HUB_OFFLINE": "1"}, "config error: model.name=nobody-here/no-such-model: no such local directory, and not "
                              "in the Hugging Face cache (offline mode, HF_HUB_OFFLINE=1"),
    ({"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"},
     "config error: model.name=nobody-here/no-such-model: no such local directory, not in the Hugging Face cache, "
     "and the hub (http://127.0.0.1:9) cannot be reached"),
])
def test_hub_name_that_is_not_here_fails_at_once(env, expected, monkeypatch, tmp_path):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    assert refused("model.name=nobody-here/no-such-model").startswith(expected)
    assert time.monotonic() - start < 10  # not the minute of connection retries


# ------------------------------------------------------------------------------- resuming
def _loop(line: str, run_dir: Path):
    from grpo_utils.train.loop import GRPOLoop

    (cfg,) = jobs(line)
    return GRPOLoop(cfg, "sync", run_dir)


def test_resume_from_a_checkpoint_of_another_model_is_one_line(tiny_dir, tmp_path, tok):
    from grpo_utils.models.tiny import build_model
    from grpo_utils.train.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "old", 2, build_model(tok, hidden_size=48, num_layers=1), tok, {"step": 2})
    with pytest.raises(GRPOError) as info:
        _loop(f"model.name={tiny_dir} resume={tmp_path / 'old'}", tmp_path / "run").setup()
    message = info.value.one_line()
    assert message.startswith("config error: resume: checkpoint ") and "is of another model (hidden_size=48 in its " \
        "config.json, hidden_size=32 in model.name's)" in message, message


def test_resume_must_refuses_and_resume_true_warns_before_the_model_loads(tiny_dir, tmp_path, capsys):
    with pytest.raises(GRPOError) as info:
        _loop(f"model.name={tiny_dir} resume=must", tmp_path / "run").setup()
    assert info.value.one_line().startswith(f"error: resume=must: no checkpoint in {tmp_path / 'run'} to resume from")
    with pytest.raises(AssertionError, match="a model or tokenizer was loaded"):  # it goes on, from scratch
        _loop(f"model.name={tiny_dir} resume=true", tmp_path / "run").setup()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"warning: resume=true but {tmp_path / 'run'} has no checkpoint yet; starting from scratch (resume=must "
        "refuses to)")


# ------------------------------------------------------------------ sizes against the machine
SIZES = [
    ("env.num_prompts=1000000000", "config error: env.num_prompts=1000000000 x env.group_size=8 x "
                                   "(generation.max_new_tokens=4 + 1) tokens need at least"),
    ("generation.max_new_tokens=100000000", "config error: env.num_prompts=8 x env.group_size=8 x "
                                            "(generation.max_new_tokens=100000000 + 1) tokens need at least"),
    ("env.quickstart.num_train=10000000000", "config error: env.quickstart.num_train=10000000000 rows need at least"),
    ("env.dataset=countdown env.countdown.num_train=10000000000",
     "config error: env.countdown.num_train=10000000000 rows need at least"),
    ("eval.batch_size=100000000000", "config error: eval.batch_size=100000000000 x (generation.max_new_tokens=4 + 1) "
                                     "tokens need at least"),
    ("device=cpu train_model.num_devices=1024 train.optim_batch_size=1024 env.num_prompts=128",
     "config error: train_model.num_devices=1024 CPU ranks is 1024 per node, but this machine gives the process"),
]


@table(SIZES)
def test_sizes_beyond_the_machine(line, expected):
    message = refused(line)
    assert message.startswith(expected), message
    assert "GiB of memory" in message or "cores; use at most" in message


# ------------------------------------------------------------------------------- data rows
def rows_of(line: str):
    """The pre-load stage as ``GRPOLoop.setup`` runs it: the config checks, then the data rows."""
    from grpo_utils import build

    (cfg,) = jobs(line)
    check_run(cfg, "sync", available_gpus=0)
    return build.rows(cfg.env, cfg.eval.heldout_size)


def data_refused(line: str) -> str:
    with pytest.raises(GRPOError) as info:
        rows_of(line)
    message = info.value.one_line()
    assert "\n" not in message, message
    return message


GOOD = ['{"question": "1+1?", "answer": "2"}', '{"question": "2+2?", "answer": "4"}', '{"question": "3+3?", "answer": 6}']
BAD_ROWS = [
    ('{"question": 123, "answer": "2"}', "field 'question' (env.prompt_field) is a number, expected the prompt as "
                                         "non-empty text"),
    ('{"question": ["1+1?"], "answer": "2"}', "field 'question' (env.prompt_field) is a list"),
    ('{"question": {"text": "1+1?"}, "answer": "2"}', "field 'question' (env.prompt_field) is an object"),
    ('{"question": "", "answer": "2"}', "field 'question' (env.prompt_field) is empty"),
    ('{"question": null, "answer": "2"}', "field 'question' (env.prompt_field) is missing or null"),
    ('{"question": "1+1?", "answer": [2]}', "field 'answer' (env.answer_field) is a list, expected a string or a "
                                            "number"),
    ('{"question": "1+1?", "answer": {"value": 2}}', "field 'answer' (env.answer_field) is an object"),
    ('{"question": "1+1?", "answer": true}', "field 'answer' (env.answer_field) is a boolean"),
    ('{"question": "1+1?", "answer": null}', "field 'answer' (env.answer_field) is missing or null"),
    ('{"question": "1+1?", "answer": NaN}', "NaN is not a JSON number (JSON numbers are finite)"),
    ('{"question": "1+1?", "answer": Infinity}', "Infinity is not a JSON number"),
    ('{"question": "1+1?", "answer": -Infinity}', "-Infinity is not a JSON number"),
    ('{"question": "1+1?", "answer": 1e999}', "1e999 is out of range for a number"),
    ('{"question": "1+1?", "answer": "2", "weight": NaN}', "NaN is not a JSON number"),
    ('{"question": "1+1?"}', "missing field 'answer'"),
    ('["1+1?", "2"]', "expected a JSON object, got list"),
]


@pytest.mark.parametrize(("row", "expected"), BAD_ROWS, ids=[r for r, _ in BAD_ROWS])
def test_bad_rows_stop_naming_file_and_line_or_are_skipped(row, expected, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join([GOOD[0], GOOD[1], row, GOOD[2]]) + "\n")
    line = f"env.dataset=jsonl reward.name=numeric_answer env.train_path={data} env.heldout_count=1"
    assert data_refused(line).startswith(f"data error: {data}:3: {expected}")
    train, test = rows_of(line + " env.skip_bad_rows=true")
    assert (train.skipped, len(train) + len(test)) == (1, 3)  # the bad row is skipped and counted, not read


@pytest.mark.parametrize("dataset,row", [
    ("gsm8k", '{"question": "1+1?", "answer": "#### 2", "id": NaN}'),
    ("math", '{"problem": "1+1?", "answer": Infinity}'),
])
def test_non_finite_numbers_are_bad_rows_in_every_file_dataset(dataset, row, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(row + "\n")
    assert data_refused(f"env.dataset={dataset} env.train_path={data} env.test_path={data}").startswith(
        f"data error: {data}:1: ")
    assert data_refused(f"env.dataset={dataset} env.train_path={data} env.test_path={data} env.skip_bad_rows=true") \
        == f"data error: {data}: no valid rows (1 malformed rows skipped)"


PROMPT_FORMATS = [
    ("env.prompt_format='{question'", "config error: env.prompt_format='{question' is not a valid format string "
                                      "(expected '}' before end of string)"),
    ("env.prompt_format='Q:{}'", "config error: env.prompt_format='Q:{}' has a positional field {}; name a row "
                                  "field"),
    ("env.prompt_format='{nope}'", "data error: env.prompt_format='{nope}' reads field 'nope', which the train "
                                   "split's row 0 lacks (its fields: answer, digits, question)"),
]


@table(PROMPT_FORMATS)
def test_prompt_format_that_cannot_fill(line, expected):
    assert data_refused(line).startswith(expected)


def test_prompt_format_field_missing_in_a_file_names_the_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "a", "answer": "1", "hint": "h"}\n{"question": "b", "answer": "2"}\n')
    message = data_refused(f"env.dataset=jsonl reward.name=numeric_answer env.train_path={data} env.test_path={data} "
                           "env.prompt_format='{question}:{hint}'")
    assert message == (f"data error: env.prompt_format='{{question}}:{{hint}}' reads field 'hint', which {data}:2 "
                       "lacks (its fields: answer, question)")


def test_held_out_split_that_empties_training_is_one_line(tmp_path, tiny_dir):
    data = tmp_path / "ifeval.jsonl"
    row = {"key": 1, "prompt": "Write a haiku.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    data.write_text("\n".join(json.dumps({**row, "key": i}) for i in range(20)) + "\n")
    message = data_refused(f"--config-name grpo_ifeval model.name={tiny_dir} env.train_path={data}")
    assert message == (f"data error: env.train_path={data}: holding out 2 of 20 rows leaves no training rows (rows "
                       "sharing a held-out prompt leave training too; the file has 1 distinct prompt(s)); give "
                       "env.test_path or more distinct prompts")


# ------------------------------------------------------- Hydra-level input, through the launcher
def launched(argv: list[str], monkeypatch, mode: str = "sync") -> str:
    """The line a recipe's launcher exits with for ``argv``; its Hydra main must not start."""
    import sys

    from grpo_utils.launch import launch
    from tests.config.test_command_lines import CONFIG

    started = []
    monkeypatch.setattr(sys, "argv", ["grpo-sync.py", *argv])
    with pytest.raises(SystemExit) as info:
        launch(lambda: started.append(True), mode, CONFIG)
    assert not started, "the recipe started"
    message = info.value.code
    assert isinstance(message, str) and "\n" not in message, message  # a string exit: status 1, on stderr
    return message


HYDRA = [
    ("--config-name nope", "config error: --config-name nope: no nope.yaml in "),
    ("--config-name", "config error: --config-name needs a config name, e.g. --config-name grpo_gsm8k"),
    ("--config-dir /nonexistent/configs", "config error: --config-dir=/nonexistent/configs: no such directory"),
    ("--config-dir=/nonexistent/configs --config-name mine", "config error: --config-dir=/nonexistent/configs: no "
                                                             "such directory"),
    ("~optimizer.lr", "config error: ~optimizer.lr: a key of the schema cannot be deleted"),
    ("~env", "config error: ~env: a key of the schema cannot be deleted"),
    ("~optimizer.nope", "config error: unknown config key 'optimizer.nope'"),
    ("hydra.run.dir={file}/run", "config error: hydra.run.dir={file}/run: {file} is a file, not a directory"),
    ("-m optimizer.lr=1e-4,inf", "config error: sweep job 1: optimizer.lr=inf must be a finite number in (0, 1]"),
    ("-m env.group_size=8,1", "config error: sweep job 1: env.group_size=1 must be >= 2"),
]


@table(HYDRA)
def test_hydra_level_input_is_one_line_before_the_recipe_starts(line, expected, tmp_path, monkeypatch):
    file = tmp_path / "a-file"
    file.write_text("")
    message = launched(line.format(file=file).split(), monkeypatch)
    assert message.startswith(expected.format(file=file)), message


CONFIG_LEVEL = [
    ("model.name='${nope}'", "config error: model.name: cannot resolve its interpolation (Interpolation key 'nope' "
                             "not found)"),
    ("model.name='${oc.env:GRPO_SURELY_UNSET_VARIABLE}'", "config error: model.name: cannot resolve its "
                                                          "interpolation (Environment variable "
                                                          "'GRPO_SURELY_UNSET_VARIABLE' not found)"),
    ("loss._target_=builtins.dict", "config error: loss._target_=builtins.dict must be a PolicyLoss subclass"),
    ("loss._target_=nowhere.Loss", "config error: loss._target_=nowhere.Loss cannot be imported"),
    ("logger._target_=nowhere.Logger", "config error: logger._target_=nowhere.Logger cannot be imported"),
    ("shaping.overlong_penalty=1 shaping.overlong_cache_len=100",
     "config error: shaping.overlong_cache_len=100 exceeds the completion budget generation.max_new_tokens=4"),
    ("train.max_tokens_per_micro_batch=0", "config error: train.max_tokens_per_micro_batch=0 must be null or >= 1"),
    ("train.max_tokens_per_micro_batch=512 train.grad_accum_steps=2",
     "config error: train.max_tokens_per_micro_batch=512 forms the micro-batches by token count; "
     "train.grad_accum_steps=2 would have no effect"),
    ("loss.is_level=sentence", "config error: loss: is_level='sentence' is not supported"),
]


@table(CONFIG_LEVEL)
def test_config_level_input_is_one_line(line, expected):
    assert refused(line).startswith(expected)


@pytest.mark.slow
def test_a_bad_line_exits_nonzero_with_one_line_on_stderr(env, tmp_path):
    """End to end, once: the recipe process itself (exit status, stderr) for a bad input."""
    from tests.helpers import run_recipe

    proc = run_recipe(env, f"hydra.run.dir={tmp_path / 'r'}", "optimizer.lr=inf", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "config error: optimizer.lr=inf must be a finite number in (0, 1]"


# ------------------------------------------------------------------ grpo-eval.py, the same classes
EVAL = [
    ("generation.temperature=inf", "config error: generation.temperature=inf must be a finite number in (0, 100]"),
    ("model.name='${nope}'", "config error: model.name: cannot resolve its interpolation"),
    ("generation.max_new_tokens=100000", "config error: generation.max_new_tokens=100000 leaves no room for a prompt"),
    ("env.prompt_format='{nope}'", "data error: env.prompt_format='{nope}' reads field 'nope'"),
    ("env.prompt_format='{question'", "config error: env.prompt_format='{question' is not a valid format string"),
]


@table(EVAL)
def test_eval_refuses_the_same_bad_inputs_before_loading(line, expected, tiny_dir, tmp_path):
    from grpo_utils.config.cli import compose_jobs
    from grpo_utils.eval.run import run_evaluation
    from tests.config.test_command_lines import CONFIG

    args = [f"model.name={tiny_dir}", *line.split()] if "model.name" not in line else line.split()
    (cfg,) = compose_jobs(args, CONFIG, "grpo_eval", None)
    with pytest.raises(GRPOError) as info:
        run_evaluation(cfg, tmp_path)
    message = info.value.one_line()
    assert message.startswith(expected) and "\n" not in message, message
