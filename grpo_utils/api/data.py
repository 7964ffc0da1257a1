"""Datasets handed to the Python API, as the rows the recipes read.

A ``train_dataset`` may be a list of prompt strings, a list of dict rows, a
:class:`SimplePromptDataset` or a ``datasets.Dataset``. The rows are written to a JSONL file in
the run directory and read back by the recipes' ``jsonl`` dataset, so the API trains on exactly
what the same file would give the Hydra recipe (and Ray collectors can read it too).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from grpo_utils.errors import DataError

PROMPT_FIELDS = ("prompt", "question")


class SimplePromptDataset:
    """Prompts (and optionally, per prompt, the reference answer a verifier reward checks)."""

    def __init__(self, prompts: Iterable[str], answers: Iterable[Any] | None = None):
        self.prompts = list(prompts)
        self.answers = None if answers is None else list(answers)
        if self.answers is not None and len(self.answers) != len(self.prompts):
            raise DataError(f"SimplePromptDataset: {len(self.prompts)} prompts but {len(self.answers)} answers")
        for i, p in enumerate(self.prompts):
            if not isinstance(p, str):
                raise DataError(f"SimplePromptDataset: prompt {i} is a {type(p).__name__}, expected str")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row: dict[str, Any] = {"prompt": self.prompts[i]}
        if self.answers is not None:
            row["answer"] = self.answers[i]
        return row


def as_rows(dataset: Any, name: str) -> list[dict[str, Any]]:
    """The dataset's rows as dicts with a ``prompt`` string (a row's ``question`` when it has no
    ``prompt``); one-line :class:`DataError` naming ``name`` and the row otherwise."""
    if dataset is None:
        raise DataError(f"{name} is required")
    if isinstance(dataset, (str, bytes, Mapping)):
        raise DataError(f"{name}: expected a list of prompts or rows, a SimplePromptDataset or a datasets.Dataset, "
                        f"got a {type(dataset).__name__}")
    try:
        items = [dataset[i] for i in range(len(dataset))]
    except TypeError:
        raise DataError(f"{name}: expected a list of prompts or rows, a SimplePromptDataset or a datasets.Dataset, "
                        f"got a {type(dataset).__name__}") from None
    if not items:
        raise DataError(f"{name} is empty")
    rows = []
    for i, item in enumerate(items):
        row = {"prompt": item} if isinstance(item, str) else item
        if not isinstance(row, Mapping):
            raise DataError(f"{name}[{i}] is a {type(item).__name__}; expected a prompt string or a dict row")
        field = next((f for f in PROMPT_FIELDS if f in row), None)
        if field is None or not isinstance(row[field], str) or not row[field].strip():
            raise DataError(f"{name}[{i}] has no non-empty 'prompt' (or 'question') string")
        rows.append({"prompt": row[field], **row})
    return rows


def write_jsonl(rows: list[dict[str, Any]], path: Path, name: str) -> Path:
    """Write ``rows`` (JSON-serialisable values only) to ``path``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            try:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            except (TypeError, ValueError) as e:
                raise DataError(f"{name}[{i}]: a value is not JSON-serialisable ({e})") from None
    tmp.replace(path)
    return path
