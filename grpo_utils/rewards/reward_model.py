"""Learned reward: a Hugging Face sequence-classification model scores prompt + completion.

Scored in batches (one forward per ``batch_size`` samples) on the model's own ``device``, so it
can sit next to the policy on another GPU (or on the CPU).
"""

from __future__ import annotations

import math
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class RewardModelScorer:
    """Scores = logit ``label_index`` of the model's last non-padding token (``sigmoid`` maps it
    into (0, 1)).

    The text scored is ``prompt + completion``; with ``chat_template`` it is instead the
    reward model tokenizer's chat template applied to ``[user: prompt, assistant: completion]``
    (then ``prompt_field: question`` is usually wanted, so the user turn is the raw question and
    not the policy's rendered prompt). The prompt is ``row[prompt_field]`` when
    ``prompt_field`` is set, else the prompt the caller passes (the rendered policy prompt),
    else ``row["prompt"]`` / ``row["question"]``. With ``max_length`` longer inputs keep their
    last ``max_length`` tokens (the completion's end). Scores: ``reward``, ``score`` (raw logit).
    """

    keys = ("reward", "score")

    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32", batch_size: int = 8,
                 max_length: int | None = None, chat_template: bool = False, prompt_field: str | None = None,
                 label_index: int = 0, sigmoid: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from grpo_utils.rewards.python_callable import IN_PROCESS_PREFIX

        if path.startswith(IN_PROCESS_PREFIX):  # (model, tokenizer) handed over in memory
            from grpo_utils.rewards.python_callable import import_object

            self.model, self.tokenizer = import_object(path)
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype))
        self.model.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.chat_template = chat_template
        self.prompt_field = prompt_field
        self.label_index = label_index
        self.sigmoid = sigmoid
        num_labels = self.model.config.num_labels
        if not 0 <= label_index < num_labels:
            raise ValueError(f"label_index={label_index} is out of range for a model with {num_labels} labels")
        if chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"chat_template=true but the tokenizer at {path} has no chat template")
        # The head pools the rightmost token that is not the config's pad id: pad with that id.
        pad_id = self.model.config.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
                else self.tokenizer.eos_token_id
            self.model.config.pad_token_id = pad_id
        if pad_id is None:
            raise ValueError(f"the reward model at {path} defines no pad or EOS token to pad batches with")
        self.pad_id = int(pad_id)

    def text(self, completion: str, row: dict[str, Any], prompt: str | None) -> str:
        if self.prompt_field is not None:
            prompt = str(row[self.prompt_field])
        elif prompt is None:
            prompt = str(row.get("prompt", row.get("question", "")))
        if self.chat_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + completion

    def encode(self, text: str) -> list[int]:
        # A chat template already holds its special tokens; plain text gets the tokenizer's own.
        ids = self.tokenizer(text, add_special_tokens=not self.chat_template)["input_ids"]
        return ids[-self.max_length:] if self.max_length else ids

    def __call__(self, completions: list[str], rows: list[dict[str, Any]],
                 prompts: list[str] | None = None) -> list[dict[str, float]]:
        import torch

        prompts = prompts if prompts is not None else [None] * len(completions)
        ids = [self.encode(self.text(c, r, p)) for c, r, p in zip(completions, rows, prompts)]
        out: list[dict[str, float]] = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start:start + self.batch_size]
            width = max(len(seq) for seq in chunk)
            input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, seq in enumerate(chunk):  # right padding: positions match an unpadded forward
                input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[i, :len(seq)] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for value in logits[:, self.label_index].float().cpu().tolist():
                reward = _sigmoid(value) if self.sigmoid else value
                out.append({"reward": reward, "score": value})
        return out
