"""Prompt datasets: rows from local JSONL files or generated tasks, rendered into prompts.

A row is a dict with at least ``question`` (what the model is asked) and ``answer`` (what the
reward checks against); dataset-specific fields are kept so rewards can use them.

Datasets (``env.dataset``):

- ``quickstart``: generated "max of five digits" (the quick start's task).
- ``gsm8k``: official GSM8K JSONL (``question``, ``answer`` ending in ``#### N``).
- ``math``: MATH-style JSONL (``problem``, ``solution`` with ``\\boxed{}``, optional ``answer``,
  ``level``, ``subject``/``type``); the answer is ``answer`` when present, else the content of
  the solution's last ``\\boxed{...}``.
- ``ifeval``: the official IFEval input JSONL (``key``, ``prompt``, ``instruction_id_list``,
  ``kwargs``); the answer is empty (the instructions are the reference).
- ``countdown``: generated from a seed: reach ``target`` from ``numbers`` with + - * /.
- ``jsonl``: any JSONL; ``env.prompt_field`` and ``env.answer_field`` name the fields.
- ``dialogue``: ConvAI2-style JSONL (``history`` turns, gold ``response``, optional ``persona`` and
  ``context``); rows carry chat ``messages`` ending with the user's turn (see :func:`dialogue_parser`).

The held-out split is ``env.test_path`` when given; otherwise, for file datasets, a deterministic
slice of the training file (``env.heldout_fraction`` or ``env.heldout_count``) that is removed
from the training rows. Generated datasets draw their held-out rows from another seed.

Malformed rows raise :class:`DataError` naming ``file:line`` and what was expected, or, with
``env.skip_bad_rows=true``, are skipped and counted in the returned :class:`Rows`' ``skipped``.
"""

from __future__ import annotations

import codecs
import json
import math
import random
import re
import string
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

from grpo_utils.errors import DataError
from grpo_utils.rewards.numeric import gsm8k_final_answer  # one parser: the gsm8k reward reads '#### N' too

DATASETS = ("quickstart", "gsm8k", "math", "ifeval", "countdown", "jsonl", "dialogue")
FILE_DATASETS = ("gsm8k", "math", "ifeval", "jsonl", "dialogue")
GENERATED_DATASETS = ("quickstart", "countdown")
TEMPLATES = ("plain", "chat", "r1_zero")
# The reward each dataset is scored with when ``reward.name`` is null (jsonl has none of its own).
DATASET_REWARDS = {"quickstart": "numeric_answer", "gsm8k": "gsm8k", "math": "math", "ifeval": "ifeval",
                   "countdown": "countdown", "dialogue": "text_similarity"}
SPLITS = ("train", "test")

# The held-out slice of a training file does not depend on the run's seed, so runs with different
# seeds (and the evaluation script) always hold out the same rows.
HELDOUT_SEED = 0

QUICKSTART_DEFAULTS = {"num_train": 5000, "num_test": 200}
COUNTDOWN_DEFAULTS = {"num_train": 10000, "num_test": 200, "seed": 0, "min_numbers": 3, "max_numbers": 4,
                      "max_number": 99, "max_target": 999}


class BadRow(ValueError):
    """One row does not fit its dataset; the message says what was expected (no location)."""


class Rows(list):
    """The rows of one split: a plain list, plus ``skipped`` (malformed rows dropped from this
    split's file under ``env.skip_bad_rows=true``), ``source`` (the file, or ``generated``) and,
    for a file, ``lines`` (each row's line number).

    A held-out split cut from the training file reports ``skipped=0``: the file's malformed rows
    are counted once, on the training split.
    """

    def __init__(self, rows=(), skipped: int = 0, source: str = "", lines: list[int] | None = None):
        super().__init__(rows)
        self.skipped = skipped
        self.source = source
        #: The file line of each row (rows read from a file), so a later check can name ``file:line``.
        self.lines = None if lines is None else list(lines)

    def where(self, i: int) -> str | None:
        """``file:line`` of row ``i``, or None when the rows do not come from a file."""
        return f"{self.source}:{self.lines[i]}" if self.lines is not None else None


def _opt(cfg, key: str, default: Any = None) -> Any:
    """``cfg.key`` for a DictConfig, dict or object, or ``default`` when absent or null."""
    if cfg is None:
        return default
    if isinstance(cfg, dict) or hasattr(cfg, "get"):
        try:
            value = cfg.get(key, default)
        except Exception:  # a struct DictConfig may refuse unknown keys
            value = default
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


# ----------------------------------------------------------------------------- JSONL reading


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """(line number, row or BadRow) for every non-blank line of ``path``: a line that is not UTF-8,
    not JSON or not an object is a BadRow. A UTF-8 byte-order mark at the start is ignored."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, BadRow(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line, parse_constant=_not_a_json_number, parse_float=_finite_float)
            except json.JSONDecodeError as e:
                yield lineno, BadRow(f"not valid JSON ({e.msg})")
                continue
            except BadRow as e:
                yield lineno, e
                continue
            if not isinstance(row, dict):
                yield lineno, BadRow(f"expected a JSON object, got {type(row).__name__}")
                continue
            yield lineno, row


def _not_a_json_number(name: str) -> float:
    """Python's json reads NaN and Infinity; JSON has no such numbers, and a row holding one (an
    answer no reward can match, a score that poisons a mean) is a bad row."""
    raise BadRow(f"{name} is not a JSON number (JSON numbers are finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise BadRow(f"{text} is out of range for a number")
    return value


def _check_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [row for _, row in read_jsonl_numbered(path)]


def read_jsonl_numbered(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs, so row errors can name the file line (blank lines are skipped)."""
    path = _check_file(path)
    rows = []
    for lineno, row in _iter_jsonl(path):
        if isinstance(row, BadRow):
            raise DataError(f"{path}:{lineno}: {row}")
        rows.append((lineno, row))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def load_rows_from_file(path: str | Path, parse: Callable[[dict[str, Any]], dict[str, Any]],
                        skip_bad: bool = False) -> Rows:
    """Parse every row of a JSONL file with ``parse`` (which raises :class:`BadRow`).

    A malformed line (bad JSON, not an object, or rejected by ``parse``) raises
    ``DataError("<file>:<line>: <what was expected>")``, or is skipped and counted with ``skip_bad``.
    """
    path = _check_file(path)
    rows, lines, skipped, seen = [], [], 0, 0
    for lineno, row in _iter_jsonl(path):
        seen += 1
        try:
            if isinstance(row, BadRow):
                raise row
            rows.append(parse(row))
            lines.append(lineno)
        except BadRow as e:
            if not skip_bad:
                raise DataError(f"{path}:{lineno}: {e}") from None
            skipped += 1
    if not seen:
        raise DataError(f"{path}: no rows")
    if not rows:
        raise DataError(f"{path}: no valid rows ({skipped} malformed rows skipped)")
    return Rows(rows, skipped=skipped, source=str(path), lines=lines)


# ----------------------------------------------------------------------------- GSM8K


def _json_type(value: Any) -> str:
    """How a JSON value is named in an error: 'missing', 'null', 'a list', ..."""
    if value is None:
        return "missing or null"
    names = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return names.get(type(value), f"a {type(value).__name__}")


def _gsm8k_row(row: dict[str, Any]) -> dict[str, Any]:
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str) or "####" not in answer:
        got = "".join(f"; '{k}' is {_json_type(v)}" for k, v in (("question", question), ("answer", answer))
                      if not isinstance(v, str))
        raise BadRow(f"expected GSM8K fields 'question' and 'answer' (ending in '#### N'), both strings{got}")
    return {**row, "solution": row["answer"], "answer": gsm8k_final_answer(row["answer"])}


def _gsm8k_rows(path: str | Path, skip_bad: bool = False) -> Rows:
    return load_rows_from_file(path, _gsm8k_row, skip_bad)


# ----------------------------------------------------------------------------- MATH

_BOXED = re.compile(r"\\(?:boxed|fbox)")


def _braced(text: str, start: int) -> str | None:
    """Content of the balanced ``{...}`` opening at ``text[start]``, or None if unbalanced.
    Escaped braces (``\\{``, ``\\}``: LaTeX set braces) do not open or close a group."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed_answer(text: str) -> str | None:
    """Content of the last well-formed ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, with
    nested braces balanced; ``\\boxed 5`` (no braces) gives ``5``. None when there is none."""
    found = None
    for m in _BOXED.finditer(text):
        rest = m.end()
        if rest < len(text) and text[rest] == "{":
            inner = _braced(text, rest)
            if inner is not None:
                found = inner.strip()
        elif text.startswith(" ", rest):
            token = text[rest:].strip().split("$")[0].split()
            if token:
                found = token[0].rstrip(".,;")
    return found


def _math_row(row: dict[str, Any]) -> dict[str, Any]:
    expected = "expected MATH fields 'problem' and 'solution' (with a \\boxed{} answer) or 'answer'"
    problem = row.get("problem")
    if not isinstance(problem, str) or not problem.strip():
        raise BadRow(expected)
    answer = row.get("answer")
    if isinstance(answer, (bool, list, dict)):
        raise BadRow(f"{expected}; 'answer' is {_json_type(answer)}, expected a string or a number")
    if answer is None or not str(answer).strip():
        solution = row.get("solution")
        answer = last_boxed_answer(solution) if isinstance(solution, str) else None
        if not answer:
            raise BadRow(expected)
    out = {**row, "question": problem, "answer": str(answer).strip()}
    if "subject" not in out and "type" in out:  # the original MATH release calls it "type"
        out["subject"] = out["type"]
    return out


# ----------------------------------------------------------------------------- IFEval


def _ifeval_row(row: dict[str, Any]) -> dict[str, Any]:
    prompt, ids, kwargs = row.get("prompt"), row.get("instruction_id_list"), row.get("kwargs")
    if (not isinstance(prompt, str) or not prompt.strip() or not isinstance(ids, list)
            or not all(isinstance(i, str) for i in ids) or not isinstance(kwargs, list)
            or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs)):
        raise BadRow("expected IFEval fields 'prompt' (text), 'instruction_id_list' (list of ids) and "
                     "'kwargs' (one object per instruction)")
    return {**row, "question": prompt, "answer": ""}


# ----------------------------------------------------------------------------- jsonl


def _jsonl_parser(prompt_field: str, answer_field: str | None) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def parse(row: dict[str, Any]) -> dict[str, Any]:
        for field in (prompt_field, answer_field):
            if field is not None and field not in row:
                raise BadRow(f"missing field '{field}'")
        prompt = row[prompt_field]
        if not isinstance(prompt, str) or not prompt.strip():
            got = "empty" if prompt == "" else _json_type(prompt)
            raise BadRow(f"field '{prompt_field}' (env.prompt_field) is {got}, expected the prompt as non-empty text")
        answer = None if answer_field is None else row[answer_field]
        if answer_field is not None and (isinstance(answer, (bool, list, dict)) or answer is None):
            raise BadRow(f"field '{answer_field}' (env.answer_field) is {_json_type(answer)}, expected a string or "
                         "a number")
        return {**row, "question": prompt, "answer": "" if answer is None else str(answer)}

    return parse


def _jsonl_rows(path: str | Path, prompt_field: str, answer_field: str | None, skip_bad: bool = False) -> Rows:
    return load_rows_from_file(path, _jsonl_parser(prompt_field, answer_field), skip_bad)


# ----------------------------------------------------------------------------- dialogue


def _nonempty_strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v.strip() for v in value)


def dialogue_parser(system_prompt: str | None = None) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Parse ConvAI2-style rows: ``history`` (the turns so far, the last one the user's), gold
    ``response`` (a string, or a list of them: several gold replies), optional ``persona`` (a string
    or a list of strings) and ``context`` (a string).

    The row gains ``answer`` (the gold response(s), text_similarity's default reference),
    ``question`` (the last turn, so the default ``env.prompt_format`` still formats) and chat
    ``messages``. Roles are assigned backwards from the last turn (user, assistant, user, ...)
    because the model always answers the last turn, whatever the history's length. The system
    message (``system_prompt``, then the persona, then the context; left out when all are empty)
    is built here, so the renderer shows it under every template without adding it twice.
    """
    def parse(row: dict[str, Any]) -> dict[str, Any]:
        history, response = row.get("history"), row.get("response")
        persona, context = row.get("persona"), row.get("context")
        if not _nonempty_strings(history):
            raise BadRow("expected dialogue field 'history': a non-empty list of non-empty strings "
                         "(the turns so far, the user's last)")
        if isinstance(response, str) and response.strip():
            answer: str | list[str] = response
        elif _nonempty_strings(response):
            answer = list(response)
        else:
            raise BadRow("expected dialogue field 'response': a non-empty string, or a non-empty list of "
                         "non-empty strings (several gold responses)")
        if isinstance(persona, str):
            persona = [persona]
        if persona is not None and not (isinstance(persona, list) and all(isinstance(p, str) for p in persona)):
            raise BadRow("expected dialogue field 'persona': a string or a list of strings")
        if context is not None and not isinstance(context, str):
            raise BadRow("expected dialogue field 'context': a string")
        persona_text = " ".join(p.strip() for p in persona or [] if p.strip())
        system = [part for part in (system_prompt, persona_text and f"Your persona: {persona_text}", context)
                  if part and part.strip()]
        messages = [{"role": "system", "content": "\n".join(system)}] if system else []
        last = len(history) - 1
        messages += [{"role": "user" if (last - i) % 2 == 0 else "assistant", "content": turn}
                     for i, turn in enumerate(history)]
        return {**row, "question": history[-1], "answer": answer, "messages": messages}

    return parse


# ----------------------------------------------------------------------------- quickstart


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


# ----------------------------------------------------------------------------- countdown

COUNTDOWN_OPS = ("+", "-", "*", "/")


def countdown_question(numbers: list[int], target: int) -> str:
    return (f"Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
            "arithmetic operations (+, -, *, /) and each number can be used at most once.")


def _random_expression(numbers: list[int], rng: random.Random) -> tuple[str, Fraction]:
    """A random expression using every number once (a random binary tree), evaluated exactly.

    ``-`` puts the larger operand first and ``/`` never divides by zero, so every intermediate
    value is a non-negative Fraction; the caller keeps the expression if its value is an integer.
    """
    items = [(str(n), Fraction(n)) for n in numbers]
    while len(items) > 1:
        (ea, a), (eb, b) = (items.pop(rng.randrange(len(items))) for _ in range(2))
        op = rng.choice(COUNTDOWN_OPS if b != 0 else COUNTDOWN_OPS[:3])
        if op == "-" and a < b:
            (ea, a), (eb, b) = (eb, b), (ea, a)
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
        items.append((f"({ea} {op} {eb})", value))
    expr, value = items[0]
    if expr.startswith("(") and expr.endswith(")"):
        expr = expr[1:-1]  # the outermost parentheses are never needed
    return expr, value


def countdown_rows(n: int, seed: int | str, min_numbers: int = 3, max_numbers: int = 4, max_number: int = 99,
                   max_target: int = 999, exclude: set[str] | None = None) -> list[dict[str, Any]]:
    """``n`` Countdown problems: ``numbers`` (``min_numbers``..``max_numbers`` ints in
    1..``max_number``) and an integer ``target`` in 1..``max_target`` reachable with + - * /
    using each number at most once (``solution`` is one such expression, using all of them).

    Built by evaluating a random expression over the numbers with exact Fraction arithmetic and
    keeping it when the value is an integer in range that is not simply one of the numbers.
    Deterministic in ``seed``; ``exclude`` (question texts) keeps held-out problems out.
    """
    if not 2 <= min_numbers <= max_numbers:
        raise DataError(f"env.countdown: need 2 <= min_numbers ({min_numbers}) <= max_numbers ({max_numbers})")
    if max_number < 1 or max_target < 1:
        raise DataError(f"env.countdown: max_number ({max_number}) and max_target ({max_target}) must be >= 1")
    rng = random.Random(seed)
    exclude = exclude or set()
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        count = rng.randint(min_numbers, max_numbers)  # drawn once per row: counts stay uniform
        for _ in range(10000):
            numbers = [rng.randint(1, max_number) for _ in range(count)]
            expr, value = _random_expression(numbers, rng)
            if value.denominator != 1 or not 1 <= value <= max_target or int(value) in numbers:
                continue
            question = countdown_question(numbers, int(value))
            if question not in exclude:
                break
        else:
            raise DataError(f"env.countdown: could only generate {len(rows)} of {n} problems with "
                            f"{count} numbers, max_number={max_number}, max_target={max_target}; widen the ranges")
        rows.append({"question": question, "answer": str(int(value)), "numbers": numbers, "target": int(value),
                     "solution": expr})
    return rows


def _countdown_split(env_cfg, split: str) -> Rows:
    c = {k: _opt(_opt(env_cfg, "countdown"), k, v) for k, v in COUNTDOWN_DEFAULTS.items()}
    shape = {k: c[k] for k in ("min_numbers", "max_numbers", "max_number", "max_target")}
    # String seeds are hashed deterministically (not by PYTHONHASHSEED): distinct streams per split.
    test = countdown_rows(c["num_test"], seed=f"countdown:test:{c['seed']}", **shape)
    if split == "test":
        return Rows(test, source="generated")
    return Rows(countdown_rows(c["num_train"], seed=f"countdown:train:{c['seed']}",
                               exclude={r["question"] for r in test}, **shape), source="generated")


# ----------------------------------------------------------------------------- splits


def _file_rows(env_cfg, name: str, path: str | Path) -> Rows:
    skip = bool(_opt(env_cfg, "skip_bad_rows", False))
    if name == "gsm8k":
        return _gsm8k_rows(path, skip)
    if name == "math":
        return load_rows_from_file(path, _math_row, skip)
    if name == "ifeval":
        return load_rows_from_file(path, _ifeval_row, skip)
    if name == "dialogue":
        return load_rows_from_file(path, dialogue_parser(_opt(env_cfg, "system_prompt")), skip)
    return _jsonl_rows(path, _opt(env_cfg, "prompt_field", "question"), env_cfg.get("answer_field", "answer"), skip)


def heldout_size(env_cfg, num_rows: int) -> int:
    """How many of ``num_rows`` training rows ``env.heldout_count`` / ``env.heldout_fraction`` hold out."""
    count, fraction = int(_opt(env_cfg, "heldout_count", 0)), float(_opt(env_cfg, "heldout_fraction", 0.0))
    if count < 0 or not 0 <= fraction < 1:
        raise DataError(f"env.heldout_count={count} must be >= 0 and env.heldout_fraction={fraction} in [0, 1)")
    size = count if count else (max(1, round(fraction * num_rows)) if fraction else 0)
    if size >= num_rows:
        raise DataError(f"env.heldout_count/heldout_fraction hold out {size} of {num_rows} rows; "
                        "at least one must remain for training")
    return size


def _prompt_key(row: dict[str, Any]) -> str:
    # A dialogue's last turn ("hi") recurs across conversations: the whole conversation is the prompt.
    return json.dumps(row["messages"]) if "messages" in row else str(row["question"])


def split_heldout(rows: list[dict[str, Any]], size: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out): ``size`` rows picked by a fixed-seed draw (kept in file order) are held
    out; training drops them and any other row with the same prompt (``question``, or the whole
    ``messages`` of a dialogue) so nothing leaks via duplicates."""
    picked = set(random.Random(HELDOUT_SEED).sample(range(len(rows)), size))
    heldout = [r for i, r in enumerate(rows) if i in picked]
    prompts = {_prompt_key(r) for r in heldout}
    train = [r for i, r in enumerate(rows) if i not in picked and _prompt_key(r) not in prompts]
    return train, heldout


def load_split(env_cfg, split: str) -> Rows:
    """Rows of ``split`` ("train" or "test") for the dataset named in ``env_cfg.dataset``.

    Returns a :class:`Rows` list (``.skipped`` counts malformed rows dropped under
    ``env.skip_bad_rows=true``).
    """
    name = env_cfg.dataset
    if split not in SPLITS:
        raise DataError(f"split={split!r} is unknown; expected train or test")
    if is_user_dataset(name):
        rows = user_dataset(name)(split, env_cfg)
        rows = rows if isinstance(rows, list) else list(rows)
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"env.dataset={name}: row {i} of the {split} split is a {type(row).__name__}, "
                                "expected a dict")
        if not rows:
            raise DataError(f"env.dataset={name}: the {split} split is empty")
        return Rows(rows, source=name)
    if name == "quickstart":
        q = env_cfg.quickstart
        test = quickstart_rows(q.num_test, seed=2)
        if split == "test":
            return Rows(test, source="generated")
        return Rows(quickstart_rows(q.num_train, seed=1, exclude={r["question"] for r in test}), source="generated")
    if name == "countdown":
        return _countdown_split(env_cfg, split)
    if name not in FILE_DATASETS:
        raise DataError(f"env.dataset={name!r} is unknown; expected one of {', '.join(DATASETS)}")

    train_path, test_path = _opt(env_cfg, "train_path"), _opt(env_cfg, "test_path")
    holdout = bool(_opt(env_cfg, "heldout_count", 0) or _opt(env_cfg, "heldout_fraction", 0.0))
    if test_path is not None and holdout:
        raise DataError("env.test_path and env.heldout_fraction/heldout_count are exclusive: the held-out "
                        "split is either its own file or a slice of env.train_path")
    if split == "test" and test_path is not None:
        return _file_rows(env_cfg, name, test_path)
    if train_path is None:
        raise DataError(f"env.{split}_path is required for env.dataset={name}"
                        + ("" if split == "train" else
                           " (or env.train_path with env.heldout_fraction or env.heldout_count)"))
    if split == "test" and not holdout:
        raise DataError(f"env.test_path is required for env.dataset={name} (or hold out part of "
                        "env.train_path with env.heldout_fraction or env.heldout_count)")
    rows = _file_rows(env_cfg, name, train_path)
    if not holdout:
        return rows
    train, heldout = split_heldout(rows, heldout_size(env_cfg, len(rows)))
    if not train:
        distinct = len({_prompt_key(r) for r in rows})
        raise DataError(f"env.train_path={train_path}: holding out {len(heldout)} of {len(rows)} rows leaves no "
                        f"training rows (rows sharing a held-out prompt leave training too; the file has {distinct} "
                        "distinct prompt(s)); give env.test_path or more distinct prompts")
    line_of = {id(row): line for row, line in zip(rows, rows.lines or ())}
    if split == "test":
        return Rows(heldout, skipped=0, source=rows.source, lines=[line_of.get(id(r)) for r in heldout])
    return Rows(train, skipped=rows.skipped, source=rows.source, lines=[line_of.get(id(r)) for r in train])


def prompt_fields(prompt_format: str) -> set[str]:
    """The row fields ``env.prompt_format`` reads; :class:`DataError` when it is not a format string
    over named fields (``{question``, ``{}``)."""
    try:
        parsed = list(string.Formatter().parse(prompt_format))
    except ValueError as e:
        raise DataError(f"env.prompt_format={prompt_format!r} is not a valid format string ({e}); write fields as "
                        "{question} and literal braces as {{ }}") from None
    fields = set()
    for _, name, _, _ in parsed:
        if name is None:
            continue
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not root or root.isdigit():
            raise DataError(f"env.prompt_format={prompt_format!r} has a positional field {{{name}}}; name a row field, "
                            "e.g. {question}")
        fields.add(root)
    return fields


def check_prompt_fields(prompt_format: str, rows: Rows, split: str) -> None:
    """Every row (but chat rows, which carry their ``messages``) has the fields ``env.prompt_format``
    reads: checked on the rows, before a model loads, naming the first row that lacks one."""
    fields = prompt_fields(prompt_format)
    for i, row in enumerate(rows):
        if "messages" in row:
            continue
        missing = sorted(f for f in fields if f not in row)
        if missing:
            where = rows.where(i) or f"the {split} split's row {i}"
            raise DataError(f"env.prompt_format={prompt_format!r} reads field '{missing[0]}', which {where} lacks "
                            f"(its fields: {', '.join(sorted(map(str, row)))})")


def is_user_dataset(name) -> bool:
    """``env.dataset`` names a function of the user's (``my_pkg.data.rows``) rather than a builtin."""
    return isinstance(name, str) and "." in name


def user_dataset(name: str) -> Callable[[str, Any], Any]:
    """The function ``env.dataset`` names: ``(split, env) -> rows`` (dicts with the fields
    ``env.prompt_format`` and the reward read), for ``split`` "train" and "test"."""
    from hydra.utils import get_method

    try:
        return get_method(name)
    except Exception as e:
        raise DataError(f"env.dataset={name} cannot be imported ({str(e).splitlines()[0]})") from None


def validate_env(env_cfg, splits: tuple[str, ...] = SPLITS) -> None:
    """Check the ``env:`` data settings needed to load ``splits`` without reading any data.

    Raises :class:`DataError` with one line naming the key (for ``config.validate``).
    """
    name = _opt(env_cfg, "dataset")
    if is_user_dataset(name):
        user_dataset(name)  # importable now, not after the model has loaded
    elif name not in DATASETS:
        raise DataError(f"env.dataset={name!r} is unknown; expected one of {', '.join(DATASETS)}, or the "
                        "dotted path of your own function (split, env) -> rows")
    prompt_fields(_opt(env_cfg, "prompt_format", "{question}"))
    template = _opt(env_cfg, "template")
    if template is not None and template not in TEMPLATES:
        raise DataError(f"env.template={template!r} is unknown; expected one of {', '.join(TEMPLATES)}")
    # The generated datasets' sizes and the held-out share are checked whatever the dataset: a value
    # out of range is a mistake even where it is not used.
    q = {k: _opt(_opt(env_cfg, "quickstart"), k, v) for k, v in QUICKSTART_DEFAULTS.items()}
    for key in ("num_train", "num_test"):
        if q[key] < 1:
            raise DataError(f"env.quickstart.{key}={q[key]} must be >= 1")
    c = {k: _opt(_opt(env_cfg, "countdown"), k, v) for k, v in COUNTDOWN_DEFAULTS.items()}
    for key in ("num_train", "num_test"):
        if c[key] < 1:
            raise DataError(f"env.countdown.{key}={c[key]} must be >= 1")
    if not 2 <= c["min_numbers"] <= c["max_numbers"]:
        raise DataError(f"env.countdown.min_numbers={c['min_numbers']} must be >= 2 and <= "
                        f"env.countdown.max_numbers={c['max_numbers']}")
    for key in ("max_number", "max_target"):
        if c[key] < 1:
            raise DataError(f"env.countdown.{key}={c[key]} must be >= 1")
    count, fraction = _opt(env_cfg, "heldout_count", 0), _opt(env_cfg, "heldout_fraction", 0.0)
    if count < 0:
        raise DataError(f"env.heldout_count={count} must be >= 0")
    if not 0 <= fraction < 1:
        raise DataError(f"env.heldout_fraction={fraction} must be in [0, 1)")
    if name not in FILE_DATASETS:
        return
    holdout = bool(count or fraction)
    test_path = _opt(env_cfg, "test_path")
    if test_path is not None and holdout:
        raise DataError("env.test_path and env.heldout_fraction/heldout_count are exclusive: set one")
    needed = set()
    if "train" in splits or ("test" in splits and test_path is None):
        needed.add("train_path")
    if "test" in splits and not holdout:
        needed.add("test_path")
    for key in sorted(needed, reverse=True):
        path = _opt(env_cfg, key)
        if path is None:
            hint = " (or hold out part of env.train_path with env.heldout_fraction or env.heldout_count)" \
                if key == "test_path" else ""
            raise DataError(f"env.{key} is required for env.dataset={name}{hint}")
        if not Path(path).expanduser().is_file():
            raise DataError(f"env.{key}={path}: file not found")
    if name == "jsonl" and not _opt(env_cfg, "prompt_field"):
        raise DataError("env.prompt_field is required for env.dataset=jsonl")


# ----------------------------------------------------------------------------- prompts
