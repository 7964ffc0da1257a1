"""Score a JSONL file of completions offline with any reward.

    python -m grpo_utils.rewards --reward gsm8k --input rows.jsonl --output scored.jsonl \\
        [--option format_weight=0.1 ...] [--timeout-s 10]
    python -m grpo_utils.rewards --config reward.yaml --input rows.jsonl --output scored.jsonl
    python -m grpo_utils.rewards --list

Each input line is a JSON object with ``completion``, ``prompt`` (needed by rewards that read
it: reward_model, callable) and the dataset's own fields (``answer`` for gsm8k/math,
``numbers``/``target`` for countdown, ``instruction_id_list``/``kwargs`` for ifeval, ...). Each
output line is the input row plus ``reward`` and its sub-scores (``reward_error`` when the
reward failed on it; for ifeval also ``instructions``: the strict and loose result of each
instruction). ``--option`` values are YAML (``true``, ``0.5``, ``[1, 2]``, ``{a: 1}``).
``--config`` takes a YAML file holding a ``reward:`` section (or just its content), e.g. a
weighted sum with ``components``. A one-line summary goes to stdout; bad input stops with a
one-line error and exit status 2.

Every row is scored whatever fails: unlike training, the CLI never stops on
``reward.stop_after_failed_steps`` nor warns per chunk (``warn_failure_fraction``); rows the
reward failed on carry ``reward_error``, and when there are any, one line on stderr gives their
count and the last error (exit status 0: the output is complete).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grpo_utils.errors import GRPOError
from grpo_utils.rewards.function import RewardFunction, plan_reward, planned_fields
from grpo_utils.rewards.registry import REQUIRED, REWARDS

CHUNK = 256  # rows scored per RewardFunction call


class CliError(GRPOError):
    """Stops the command with a one-line message."""


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def reward_config(args: argparse.Namespace) -> dict[str, Any]:
    if args.config:
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise CliError(f"config file not found: {path}")
        try:
            cfg = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise CliError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if isinstance(cfg, dict) and "reward" in cfg:
            cfg = cfg["reward"]
        if not isinstance(cfg, dict):
            raise CliError(f"{path}: expected a mapping (a 'reward:' section)")
    else:
        cfg = {"name": args.reward}
    for item in args.option or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--option {item!r} must look like key=value")
        if "components" in cfg:
            raise CliError("--option sets options of a single reward; put a sum's options in its --config file")
        cfg[key.strip()] = _parse_value(value)
    if args.timeout_s is not None:
        cfg["timeout_s"] = args.timeout_s
    return cfg


def read_rows(path: Path, fields: list[tuple[str, ...]], why: str) -> list[dict[str, Any]]:
    """The rows of ``path``; CliError naming file:line for a malformed line or a missing field."""
    if not path.is_file():
        raise CliError(f"input file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CliError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise CliError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for alternatives in fields:
                if not any(name in row for name in alternatives):
                    others = "".join(f" (or '{a}')" for a in alternatives[1:])
                    raise CliError(f"{path}:{lineno}: missing field '{alternatives[0]}'{others} needed by {why}")
            if not isinstance(row["completion"], str):
                raise CliError(f"{path}:{lineno}: field 'completion' must be a string")
            rows.append(row)
    if not rows:
        raise CliError(f"{path}: no rows")
    return rows


def _instructions(completion: str, row: dict[str, Any]) -> Any:
    from grpo_utils.rewards.ifeval import per_instruction_results

    try:
        return per_instruction_results(completion, row)
    except Exception as e:  # reported on the row, like a reward failure
        return f"error: {type(e).__name__}: {e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpo_utils.rewards", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--reward", help=f"reward name: {', '.join(REWARDS)}")
    what.add_argument("--config", help="YAML file with a reward: section (one reward or components)")
    what.add_argument("--list", action="store_true", help="list the rewards and their options")
    parser.add_argument("--input", help="JSONL rows with completion, prompt and dataset fields")
    parser.add_argument("--output", help="JSONL to write (input rows + scores)")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE", help="reward option (repeatable)")
    parser.add_argument("--timeout-s", type=float, default=None, help="per-sample deadline in seconds (0: none)")
    args = parser.parse_args(argv)

    if args.list:
        for spec in REWARDS.values():
            opts = ", ".join(f"{k}={'<required>' if d is REQUIRED else repr(d)}" for k, (d, _) in spec.options.items())
            print(f"{spec.name}: {spec.summary}\n    options: {opts or 'none'}")
        return 0
    try:
        if not args.input or not args.output:
            raise CliError("--input and --output are required")
        cfg = reward_config(args)
        try:
            planned, _, _ = plan_reward(cfg)  # validate before reading rows or loading a model
        except ValueError as e:
            raise CliError(str(e)) from None
        fields = [("completion",)] + planned_fields(planned)
        if any(p.spec.uses_prompt for p in planned):
            fields.append(("prompt",))
        names = [p.spec.name for p in planned]
        why = f"reward {'+'.join(names)!r}"
        in_path, out_path = Path(args.input), Path(args.output)
        rows = read_rows(in_path, fields, why)
        try:
            reward = RewardFunction.from_config(cfg)
        except ValueError as e:
            raise CliError(str(e)) from None
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Offline scoring reports every row: no stop rule, and one failure line at the end instead of
    # a warning per chunk (both validated above all the same).
    reward.stop_after_failed_steps = 0
    reward.warn_failure_fraction = 1.0

    with_instructions = "ifeval" in names
    total, correct, failures, timeouts, last_error = 0.0, [], 0, 0, None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8") as f:
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start:start + CHUNK]
            completions = [r["completion"] for r in chunk]
            prompts = [r["prompt"] if isinstance(r.get("prompt"), str) else None for r in chunk]
            scores, failed = reward(completions, chunk, prompts)
            failures += failed
            timeouts += reward.last_timeouts
            last_error = reward.last_error or last_error
            for row, score, error in zip(chunk, scores, reward.last_errors):
                out = {**row, **score}
                if error is not None:
                    out["reward_error"] = error
                if with_instructions:
                    out["instructions"] = _instructions(row["completion"], row)
                total += score["reward"]
                if "correct" in score:
                    correct.append(score["correct"])
                f.write(json.dumps(out, ensure_ascii=False) + "\n")
    n = len(rows)
    summary = f"scored {n} rows with {reward.name} -> {out_path}: mean reward {total / n:.4f}"
    if correct:
        summary += f", mean correct {sum(correct) / len(correct):.4f}"
    print(f"{summary}, failures {failures} (timeouts {timeouts})")
    if failures:
        print(f"warning: reward {reward.name} failed on {failures}/{n} rows (last: {last_error}); "
              "see their reward_error", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
