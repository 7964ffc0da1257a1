"""Prompt datasets: rows from local JSONL files or generated tasks, rendered into prompts.

A row is a dict with at least ``question`` (what the model is asked) and ``answer`` (what the
reward checks against); dataset-specific fields are kept so rewards can use them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

DATASETS = ("quickstart", "gsm8k", "jsonl")


class DataError(ValueError):
    """A data file or row is not what the config says it should be."""


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [row for _, row in read_jsonl_numbered(path)]


def read_jsonl_numbered(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs, so row errors can name the file line (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def gsm8k_final_answer(solution: str) -> str:
    """The number after ``####`` in an official GSM8K solution."""
    return solution.split("####")[-1].strip().replace(",", "")


def _gsm8k_rows(path: str | Path) -> list[dict[str, Any]]:
    out = []
    for i, row in read_jsonl_numbered(path):
        if "question" not in row or "answer" not in row or "####" not in str(row["answer"]):
            raise DataError(
                f"{path}:{i}: expected GSM8K fields 'question' and 'answer' (ending in '#### N')"
            )
        out.append({**row, "solution": row["answer"], "answer": gsm8k_final_answer(row["answer"])})
    return out


def _jsonl_rows(path: str | Path, prompt_field: str, answer_field: str) -> list[dict[str, Any]]:
    numbered = read_jsonl_numbered(path)
    for i, row in numbered:
        for field in (prompt_field, answer_field):
            if field not in row:
                raise DataError(f"{path}:{i}: missing field '{field}'")
    rows = [row for _, row in numbered]
    return [{**r, "question": r[prompt_field], "answer": str(r[answer_field])} for r in rows]


def quickstart_rows(n: int, seed: int, num_digits: int = 5,
                    exclude: set[str] | None = None) -> list[dict[str, Any]]:
    """The bundled task: name the largest of a few digits. Verifiable, and small enough for a
    tiny model to learn on two CPU cores. ``exclude`` keeps held-out prompts out of training."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    exclude = exclude or set()
    while len(rows) < n:
        digits = [rng.randrange(10) for _ in range(num_digits)]
        if "max " + " ".join(map(str, digits)) in exclude:
            continue
        rows.append({"question": "max " + " ".join(map(str, digits)), "answer": str(max(digits)),
                     "digits": digits})
    return rows


def load_split(env_cfg, split: str) -> list[dict[str, Any]]:
    """Rows of ``split`` ("train" or "test") for the dataset named in ``env_cfg.dataset``."""
    name = env_cfg.dataset
    if name == "quickstart":
        test = quickstart_rows(env_cfg.quickstart.num_test, seed=2)
        if split == "test":
            return test
        return quickstart_rows(env_cfg.quickstart.num_train, seed=1,
                               exclude={r["question"] for r in test})
    path = env_cfg.train_path if split == "train" else env_cfg.test_path
    if path is None:
        raise DataError(f"env.{split}_path is required for env.dataset={name}")
    if name == "gsm8k":
        return _gsm8k_rows(path)
    if name == "jsonl":
        return _jsonl_rows(path, env_cfg.prompt_field, env_cfg.answer_field)
    raise DataError(f"env.dataset={name!r} is unknown; expected one of {', '.join(DATASETS)}")


class PromptRenderer:
    """Turns a row into the exact prompt text the model sees (chat template or plain)."""

    def __init__(self, tokenizer, prompt_format: str, system_prompt: str | None, chat: bool):
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.system_prompt = system_prompt
        self.chat = chat
        if chat and not getattr(tokenizer, "chat_template", None):
            raise DataError("env.chat_template=true but the tokenizer has no chat template")

    def __call__(self, row: dict[str, Any]) -> str:
        try:
            content = self.prompt_format.format(**row)
        except KeyError as e:
            raise DataError(f"env.prompt_format refers to {e} which the dataset rows lack") from None
        if not self.chat:
            return content
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


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


RowFn = Callable[[dict[str, Any]], str]
