"""The Python API's arguments: every bad one is a one-line error before anything is generated, and
every GRPOConfig field lands on the recipe key it names."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForSequenceClassification

from grpo_utils import GRPOConfig, GRPOTrainer, SimplePromptDataset
from grpo_utils.errors import ConfigError, DataError

ROWS = [{"question": f"max {i} {i + 1}", "answer": str(i + 1)} for i in range(6)]


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir)


def make(policy, tok, tmp_path, config=None, **kwargs):
    kwargs.setdefault("train_dataset", ROWS)
    kwargs.setdefault("reward", "numeric_answer")
    config = config or GRPOConfig(output_dir=str(tmp_path / "out"), batch_size=2, num_generations_per_prompt=4)
    return GRPOTrainer(model=policy, tokenizer=tok, config=config, **kwargs)


def test_every_field_lands_on_its_recipe_key(policy, tok, tmp_path):
    config = GRPOConfig(num_generations_per_prompt=4, max_new_tokens=7, temperature=0.9, top_k=5, top_p=0.95,
                        learning_rate=3e-4, batch_size=3, num_epochs=2, gradient_accumulation_steps=2,
                        max_grad_norm=0.5, warmup_steps=1, kl_coef=0.01, clip_range=0.3, logging_steps=2,
                        save_steps=2, output_dir=str(tmp_path / "o"), wandb_project="p", wandb_run_name="r",
                        device="cpu", seed=7, loss="dr_grpo", keep_last=3, overrides=["eval.k=2"])
    cfg = make(policy, tok, tmp_path, config).cfg
    got = {k: OmegaConf.select(cfg, k) for k in (
        "env.group_size", "generation.max_new_tokens", "generation.temperature", "generation.top_k", "generation.top_p",
        "optimizer.lr", "env.num_prompts", "train.max_steps", "train.grad_accum_steps", "optimizer.clip_grad_norm",
        "optimizer.warmup_steps", "loss.kl_coef", "loss.clip_eps_low", "loss.clip_eps_high", "logger.log_every",
        "checkpoint.every_n_steps", "logger.project", "logger.run_name", "device", "seed", "checkpoint.keep_last",
        "eval.k", "train.optim_batch_size", "checkpoint.layout", "env.dataset", "reward.name")}
    assert got == {
        "env.group_size": 4, "generation.max_new_tokens": 7, "generation.temperature": 0.9, "generation.top_k": 5,
        "generation.top_p": 0.95, "optimizer.lr": 3e-4, "env.num_prompts": 3,
        "train.max_steps": 4,  # 2 epochs x ceil(6 rows / 3 prompts)
        "train.grad_accum_steps": 2, "optimizer.clip_grad_norm": 0.5, "optimizer.warmup_steps": 1,
        "loss.kl_coef": 0.01, "loss.clip_eps_low": 0.3, "loss.clip_eps_high": 0.3, "logger.log_every": 2,
        "checkpoint.every_n_steps": 2, "logger.project": "p", "logger.run_name": "r", "device": "cpu", "seed": 7,
        "checkpoint.keep_last": 3, "eval.k": 2, "train.optim_batch_size": 12, "checkpoint.layout": "hf",
        "env.dataset": "jsonl", "reward.name": "numeric_answer"}
    assert cfg.loss._target_.endswith("ClippedSurrogateLoss") and cfg.loss.aggregation == "constant_sum"  # the dr_grpo preset
    assert (tmp_path / "o" / "data" / "train.jsonl").read_text().count("\n") == len(ROWS)


def test_describe_lists_every_field():
    text = GRPOConfig.describe()
    for name in ("num_generations_per_prompt", "learning_rate", "gamma", "output_dir", "overrides"):
        assert f"\n{name} = " in f"\n{text}"
    assert "-> env.group_size" in text


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch_size": "4"}, r"^GRPOConfig.batch_size='4': expected int$"),
    ({"learning_rate": True}, r"^GRPOConfig.learning_rate=True: expected float$"),
    ({"batch_size": 0}, r"^GRPOConfig.batch_size=0 must be >= 1$"),
    ({"num_generations_per_prompt": 1}, r"^GRPOConfig.num_generations_per_prompt=1 must be >= 2"),
    ({"gamma": 0.99}, r"^GRPOConfig.gamma=0.99 must be 1.0 \(a completion is one step"),
    ({"top_p": 1.5}, r"^GRPOConfig.top_p=1.5 must be in \(0, 1\]$"),
    ({"mode": "fast"}, r"^GRPOConfig.mode='fast' must be sync or async$"),
    ({"overrides": ["seed"]}, r"^GRPOConfig.overrides: 'seed' is not key=value$"),
])
def test_bad_config_fields_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GRPOConfig(**kwargs)


def classifier(tok):
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    return Qwen2ForSequenceClassification(config)


@pytest.mark.parametrize(("case", "error", "message"), [
    ("reward_model_not_a_classifier", ConfigError,
     r"^reward_model: expected a Hugging Face sequence-classification model \(AutoModelForSequenceClassification\), "
     r"got Qwen2ForCausalLM$"),
    ("empty_dataset", DataError, r"^train_dataset is empty$"),
    ("dataset_of_ints", DataError, r"^train_dataset\[0\] is a int; expected a prompt string or a dict row$"),
    ("dataset_without_prompts", DataError, r"^train_dataset\[0\] has no non-empty 'prompt' \(or 'question'\) string$"),
    ("a_string_dataset", DataError, r"^train_dataset: expected a list of prompts or rows"),
    ("no_reward", ConfigError, r"^a reward is required: reward_model="),
    ("unknown_reward", ConfigError, r"reward.name='gsm9k' is unknown"),
    ("ref_model_without_kl", ConfigError, r"^ref_model= is only used with kl_coef > 0 \(GRPOConfig.kl_coef=0\)$"),
    ("clip_range_on_a_loss_without_clipping", ConfigError, r"^GRPOConfig.clip_range: loss=reinforce has no clipping$"),
    ("lambda_reward_on_ray", ConfigError, r"^reward: '<lambda>' is defined in __main__ or is a lambda; Ray collectors"),
    ("accumulation_not_dividing", ConfigError, r"grad_accum_steps=3"),
    ("model_is_a_classifier", ConfigError, r"^model: expected a causal LM \(AutoModelForCausalLM\) or a path, "
                                           r"got Qwen2ForSequenceClassification$"),
    ("config_is_a_dict", ConfigError, r"^config: expected a GRPOConfig, got a dict$"),
])
def test_bad_arguments_are_one_line_before_anything_generates(policy, tok, tmp_path, case, error, message):
    out = str(tmp_path / "out")
    small = {"output_dir": out, "batch_size": 2, "num_generations_per_prompt": 4}
    args = {
        "reward_model_not_a_classifier": dict(reward=None, reward_model=policy),
        "empty_dataset": dict(train_dataset=[]),
        "dataset_of_ints": dict(train_dataset=[1, 2]),
        "dataset_without_prompts": dict(train_dataset=[{"text": "x"}]),
        "a_string_dataset": dict(train_dataset="prompts.jsonl"),
        "no_reward": dict(reward=None),
        "unknown_reward": dict(reward="gsm9k"),
        "ref_model_without_kl": dict(ref_model=policy, config=GRPOConfig(**small, kl_coef=0.0)),
        "clip_range_on_a_loss_without_clipping": dict(config=GRPOConfig(**small, loss="reinforce", clip_range=0.2)),
        "lambda_reward_on_ray": dict(reward=lambda prompts, completions, **_: [0.0] * len(prompts),
                                     config=GRPOConfig(**small, mode="async")),
        "accumulation_not_dividing": dict(config=GRPOConfig(**small, gradient_accumulation_steps=3)),
        "model_is_a_classifier": dict(model=classifier(tok)),
        "config_is_a_dict": dict(config={"batch_size": 2}),
    }[case]
    model = args.pop("model", policy)
    config = args.pop("config", GRPOConfig(**small))
    args.setdefault("train_dataset", ROWS)
    args.setdefault("reward", "numeric_answer")
    with pytest.raises(error, match=message):
        GRPOTrainer(model=model, tokenizer=tok, config=config, **args)


def test_reward_forms_become_one_reward_config(policy, tok, tmp_path):
    rm = classifier(tok)

    def shorter(prompts, completions, **_):
        return [-len(c) for c in completions]

    trainer = make(policy, tok, tmp_path, reward=[("numeric_answer", 2.0), shorter], reward_model=rm)
    comps = OmegaConf.to_container(trainer.cfg.reward)["components"]
    assert [(c["name"], c["weight"], c["label"]) for c in comps] == [
        ("reward_model", 1.0, "reward_model"), ("numeric_answer", 2.0, "numeric_answer"), ("callable", 1.0, "shorter")]
    assert comps[2]["batched"] is True
    assert comps[0]["path"].startswith("grpo_utils.rewards.python_callable.IN_PROCESS.")
    # the in-process objects are the ones given
    from grpo_utils.rewards import build_reward

    fn = build_reward(trainer.cfg.reward)
    scores, failures = fn(["7", "12"], [{"question": "q", "answer": "7"}, {"question": "q", "answer": "3"}],
                          ["p1", "p2"])
    assert failures == 0
    assert [s["shorter/reward"] for s in scores] == [-1, -2]
    assert [s["numeric_answer/correct"] for s in scores] == [1.0, 0.0]


def test_simple_prompt_dataset_rows():
    ds = SimplePromptDataset(["a", "b"], answers=["1", "2"])
    assert len(ds) == 2 and ds[1] == {"prompt": "b", "answer": "2"}
    with pytest.raises(DataError, match=r"^SimplePromptDataset: 2 prompts but 1 answers$"):
        SimplePromptDataset(["a", "b"], answers=["1"])


def test_a_model_path_renders_prompts_with_its_chat_template(tiny_dir, tmp_path):
    trainer = GRPOTrainer(model=str(tiny_dir), config=GRPOConfig(output_dir=str(tmp_path / "o"), batch_size=2,
                                                                 num_generations_per_prompt=4),
                          train_dataset=ROWS, reward="numeric_answer")
    assert trainer.cfg.env.template == "chat"
    with pytest.raises(ConfigError, match=r"^model='/nonexistent/model': no tokenizer loads from it"):
        GRPOTrainer(model="/nonexistent/model", config=GRPOConfig(output_dir=str(tmp_path / "p")),
                    train_dataset=ROWS, reward="numeric_answer")


def test_a_datasets_dataset_is_rows(policy, tok, tmp_path):
    import datasets
    ds = datasets.Dataset.from_list(ROWS)
    trainer = make(policy, tok, tmp_path, train_dataset=ds)
    import json

    written = [json.loads(line) for line in (tmp_path / "out" / "data" / "train.jsonl").read_text().splitlines()]
    assert [r["question"] for r in written] == [r["question"] for r in ROWS]
    assert trainer.cfg.env.answer_field == "answer"


def test_reward_settings_stay_with_an_in_memory_reward(policy, tok, tmp_path):
    def constant(prompts, completions, **_):
        return [1.0] * len(completions)

    config = GRPOConfig(output_dir=str(tmp_path / "o"), batch_size=2, num_generations_per_prompt=4,
                        overrides=["reward.stop_after_failed_steps=5", "reward.timeout_s=3"])
    trainer = make(policy, tok, tmp_path, config, reward=constant)
    assert (trainer.cfg.reward.stop_after_failed_steps, trainer.cfg.reward.timeout_s) == (5, 3)
    assert trainer.cfg.reward.name == "callable" and "components" not in trainer.cfg.reward
