# %% [markdown]
# # GRPO from a notebook: a walkthrough of the Python API
#
# Each `# %%` cell runs in Jupyter / VS Code (or run the file as a script). CPU only, a few
# minutes, nothing downloaded: the models are built locally.
#
# 1. a policy and its tokenizer, in memory;
# 2. rewards: a sequence-classifier reward model, a Python function, a registry name, weighted;
# 3. training, with metrics on `trainer.history`;
# 4. the artefacts (`final_model/`, `checkpoint-<N>/`) and resuming;
# 5. the same run as a recipe command line.

# %%
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

from grpo_utils import GRPOConfig, GRPOTrainer
from grpo_utils.data.datasets import quickstart_rows
from grpo_utils.models.quickstart import ensure_quickstart_model

OUT = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "walkthrough_output"

# %% [markdown]
# ## 1. The policy
# The quick-start model: a tiny Qwen2 warm-started on "name the largest of five digits". It knows
# the skill but prefers a shortcut (repeating the first digit), so greedy accuracy starts low.

# %%
path = ensure_quickstart_model()
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
train_rows = quickstart_rows(2000, seed=1)  # {"question": "max 3 9 1 4 7", "answer": "9", "digits": [...]}
eval_rows = quickstart_rows(100, seed=2)

# %% [markdown]
# ## 2. Rewards
# A reward model is any Hugging Face sequence classifier: its logit on prompt + completion is the
# reward. This one is built by hand so that it prefers larger final digits (a stand-in for a
# trained preference model). A Python function gets the prompts, the completions and every row
# field as a list. A registry name (`numeric_answer`, `gsm8k`, `math`, `text_similarity`, ...)
# uses the row's `answer`. A list of `(reward, weight)` sums them.

# %%
def digit_preferring_reward_model(tok):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    rm = Qwen2ForSequenceClassification(config)
    with torch.no_grad():
        for layer in rm.model.layers:  # layers that add nothing: the score reads the last token
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = torch.zeros(len(tok), 64)
        emb[:, 0] = 1.0
        for d in range(10):
            emb[tok.convert_tokens_to_ids(str(d)), 1] = d / 3
        rm.model.embed_tokens.weight.copy_(emb)
        rm.score.weight.zero_()
        rm.score.weight[0, 1] = 1.0
    return rm.eval()


def short_answers(prompts, completions, **columns):
    return [0.0 if len(c.strip()) <= 2 else -0.5 for c in completions]


reward_model = digit_preferring_reward_model(tokenizer)
rewards = [("numeric_answer", 1.0), (short_answers, 0.5)]

# %% [markdown]
# ## 3. Train
# `GRPOConfig` fields map onto the recipes' keys (`GRPOConfig.describe()` lists them); anything
# else goes in `overrides`, e.g. `overrides=["loss.is_correction=truncate"]`.

# %%
print(GRPOConfig.describe())
config = GRPOConfig(batch_size=8, num_generations_per_prompt=8, max_new_tokens=4, learning_rate=2e-3,
                    max_steps=30, warmup_steps=5, save_steps=10, keep_last=2, loss="grpo", output_dir=OUT)
trainer = GRPOTrainer(model=model, tokenizer=tokenizer, config=config, train_dataset=train_rows,
                      eval_dataset=eval_rows, reward_model=reward_model, reward=rewards)
summary = trainer.train()
steps = [r for r in trainer.history if "reward/mean" in r]
print("reward by step:", [round(r["reward/mean"], 2) for r in steps])
print("held-out accuracy:", summary["heldout_accuracy_before"], "->", summary["heldout_accuracy_after"])

# %% [markdown]
# ## 4. Artefacts and resuming
# `final_model/` and every `checkpoint-<N>/` are Hugging Face model directories.
# `train(resume_from_checkpoint=True)` continues from the newest checkpoint in `output_dir`.

# %%
trained = AutoModelForCausalLM.from_pretrained(f"{OUT}/final_model")
print(type(trained).__name__, "loaded from", f"{OUT}/final_model")
more = GRPOTrainer(model=f"{OUT}/final_model", config=GRPOConfig(**{**config.__dict__, "max_steps": 40}),
                   train_dataset=train_rows, eval_dataset=eval_rows, reward_model=reward_model, reward=rewards)
more.train(resume_from_checkpoint=True)
print("now at step", more.state.step)

# %% [markdown]
# ## 5. The same run as a recipe
# Every setting the trainer composed is a recipe override (rewards given in memory excepted):

# %%
print(trainer.command_line())
