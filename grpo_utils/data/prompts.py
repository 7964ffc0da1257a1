"""Prompts: rendering rows into model input (templates) and the seeded, resumable prompt stream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from grpo_utils.data.datasets import TEMPLATES, DataError, Rows, _opt

R1_ZERO_INSTRUCTION = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
    "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>."
)
# transformers' model_max_length when a tokenizer does not know its context (int(1e30)): not a length.
UNKNOWN_LENGTH = 10**9


class PromptRenderer:
    """Turns a row into the exact prompt text the model sees.

    ``prompt_format`` (a format string over the row's fields) gives the user content, which
    ``template`` wraps:

    - ``plain``: the content as is (``system_prompt`` is not used);
    - ``chat``: the tokenizer's chat template, with ``system_prompt`` as a system message;
    - ``r1_zero``: DeepSeek-R1-Zero's plain-text conversation,
      ``<instruction>\\nUser: <content>\\nAssistant: <think>``, where the instruction asks for
      reasoning in ``<think> </think>`` and the answer in ``<answer> </answer>``
      (``system_prompt``, when set, replaces the instruction).

    ``template=None`` keeps the older switch: ``chat`` when ``chat`` is true, else ``plain``.
    The ``chat`` attribute is true only for the ``chat`` template.

    A row with ``messages`` (a conversation, e.g. from the ``dialogue`` dataset) is rendered as it
    is, without ``prompt_format``: ``chat`` passes it to the chat template; ``plain`` writes the
    system content's lines, then ``User: ...`` / ``Assistant: ...`` lines, then ``Assistant:``;
    ``r1_zero`` writes the same after its instruction (unless ``system_prompt`` is set, which the
    dialogue loader has already put into the system message) and ends with ``Assistant: <think>``.
    """

    def __init__(self, tokenizer, prompt_format: str, system_prompt: str | None, chat: bool,
                 template: str | None = None):
        template = template or ("chat" if chat else "plain")
        if template not in TEMPLATES:
            raise DataError(f"env.template={template!r} is unknown; expected one of {', '.join(TEMPLATES)}")
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.system_prompt = system_prompt
        self.template = template
        self.chat = template == "chat"
        if self.chat and not getattr(tokenizer, "chat_template", None):
            raise DataError("env.chat_template=true but the tokenizer has no chat template")

    def content(self, row: dict[str, Any]) -> str:
        """The user content: ``prompt_format`` filled with the row's fields."""
        try:
            return self.prompt_format.format(**row)
        except KeyError as e:
            raise DataError(f"env.prompt_format refers to {e} which the dataset rows lack") from None

    def __call__(self, row: dict[str, Any]) -> str:
        if "messages" in row:
            return self._conversation(row["messages"])
        content = self.content(row)
        if self.template == "plain":
            return content
        if self.template == "r1_zero":
            return f"{self.system_prompt or R1_ZERO_INSTRUCTION}\nUser: {content}\nAssistant: <think>"
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _conversation(self, messages: Any) -> str:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise DataError("a row's 'messages' must be a non-empty list of {role, content} string mappings")
        if self.chat:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        speakers = {"user": "User", "assistant": "Assistant"}
        lines = [m["content"] if m["role"] == "system" else f"{speakers.get(m['role'], m['role'])}: {m['content']}"
                 for m in messages]
        if self.template == "plain":
            return "\n".join([*lines, "Assistant:"])
        head = [] if self.system_prompt else [R1_ZERO_INSTRUCTION]
        return "\n".join([*head, *lines, "Assistant: <think>"])


def renderer_from_config(env_cfg, tokenizer) -> PromptRenderer:
    """The renderer an ``env:`` config section describes (``template`` null follows ``chat_template``)."""
    return PromptRenderer(tokenizer, _opt(env_cfg, "prompt_format", "{question}"), _opt(env_cfg, "system_prompt"),
                          bool(_opt(env_cfg, "chat_template", True)), template=_opt(env_cfg, "template"))


def context_length(model_config, tokenizer) -> int | None:
    """The model's context in tokens: the config's ``max_position_embeddings``, else the
    tokenizer's ``model_max_length`` when it is a real length; None when neither says."""
    for n in (getattr(model_config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)):
        if isinstance(n, int) and not isinstance(n, bool) and 0 < n < UNKNOWN_LENGTH:
            return n
    return None


def fit_to_context(rows: Rows, render, tokenizer, budget: int, skip_bad: bool, where: str,
                   why: str) -> Rows:
    """The rows whose rendered prompt is at most ``budget`` tokens (tokenized as the rollout does).

    A longer prompt raises :class:`DataError` naming its ``file:line`` (``where`` and the row
    index for rows not read from a file) and the lengths (``why`` says where the budget comes
    from), or with ``skip_bad`` is dropped and counted in the returned rows' ``skipped``. A prompt
    of more characters than ``budget`` tokens can cover (the vocabulary's longest token times
    ``budget``) is too long without being tokenized."""
    vocab = tokenizer.get_vocab() if callable(getattr(tokenizer, "get_vocab", None)) else {}
    max_chars = budget * max(1, max(map(len, vocab), default=64))
    texts = []
    for i, row in enumerate(rows):
        try:
            texts.append(render(row))
        except DataError as e:
            raise DataError(f"{rows.where(i) or f'{where}: row {i}'}: {e}") from None
    lengths: dict[str, int] = {}  # distinct texts short enough to be worth tokenizing
    pending = list(dict.fromkeys(t for t in texts if len(t) <= max_chars))
    for start in range(0, len(pending), 1024):
        chunk = pending[start:start + 1024]
        ids = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        lengths.update(zip(chunk, map(len, ids)))
    keep, lines, too_long = [], [], 0
    for i, (row, text) in enumerate(zip(rows, texts)):
        n = lengths.get(text)
        if n is not None and n <= budget:
            keep.append(row)
            if rows.lines is not None:
                lines.append(rows.lines[i])
            continue
        if not skip_bad:
            size = f"{n} tokens" if n is not None else f"{len(text)} characters, certainly more than {budget} tokens"
            raise DataError(f"{rows.where(i) or f'{where}: row {i}'}: the prompt is {size}; {why} "
                            "(env.skip_bad_rows=true skips such rows)")
        too_long += 1
    if not keep:
        source = rows.source if rows.lines is not None else where
        raise DataError(f"{source}: no prompt fits ({too_long} rows too long; {why})")
    return Rows(keep, skipped=rows.skipped + too_long, source=rows.source,
                lines=None if rows.lines is None else lines)


class PromptStream:
    """An endless, seeded, resumable stream of prompt batches over a list of rows.

    Each epoch is a fresh permutation; ``state_dict`` records the epoch and position so a
    resumed run sees exactly the prompts it would have seen.
    """

    def __init__(self, rows: list[dict[str, Any]], batch_size: int, seed: int, shuffle: bool = True):
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def next_batch(self) -> list[dict[str, Any]]:
        batch = []
        while len(batch) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation()
            batch.append(self.rows[self._order[self.position]])
            self.position += 1
        return batch

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation()


