"""Evaluation: greedy accuracy, and pass@k / maj@k / mean@k from k sampled completions per prompt.

Metrics (keys of :func:`evaluate`'s result, all in [0, 1] except lengths and counts):

- ``eval/accuracy``: mean ``correct`` of the greedy completion (``eval/reward``: its mean reward);
- ``eval/pass@j`` for j in 1, 2, 4, ..., k: the unbiased estimator of Chen et al. 2021,
  ``1 - C(n-c, j) / C(n, j)`` with n = k samples of which c are correct, averaged over prompts;
- ``eval/maj@k``: correctness of the majority answer among the k samples (see :func:`majority_vote`
  and :func:`normalize_answer`);
- ``eval/mean@k``: mean ``correct`` over all samples (the expected accuracy of one sample).

A sample counts as correct for pass@k when its ``correct`` score (``reward`` when the reward has no
``correct``) is 1; mean@k averages the scores themselves, so a partial-credit reward gives partial
mean@k. Hence pass@k >= pass@1 = mean@k for 0/1 rewards.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict

from grpo_utils.data.datasets import last_boxed_answer
from grpo_utils.errors import ConfigError
from grpo_utils.inference.transformers import make_generator
from grpo_utils.rollout.group import left_pad, response_mask, stop_token_ids

# ----------------------------------------------------------------------------- estimators


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021):
    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (no huge binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def majority_vote(answers: Sequence[str | None], corrects: Sequence[float]) -> float:
    """Correctness of the most common answer among one prompt's samples.

    ``answers[i]`` is sample i's normalized answer (None: no answer, not a candidate) and
    ``corrects[i]`` its reward's ``correct``. Ties go to the answer seen first. The majority
    answer's correctness is the largest ``correct`` among the samples giving it: samples with the
    same answer are normally judged alike; when a reward also grades the format, the answer counts
    as right if any sample giving it was judged right. No answer at all scores 0.
    """
    if len(answers) != len(corrects):
        raise ValueError(f"majority_vote: {len(answers)} answers but {len(corrects)} corrects")
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return 0.0
    top = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == top)
    return float(max(c for a, c in zip(answers, corrects) if a == winner))


def pass_k_ladder(k: int) -> list[int]:
    """1, 2, 4, ... below ``k``, then ``k``: the pass@j values reported from k samples."""
    ladder, j = [], 1
    while j < k:
        ladder.append(j)
        j *= 2
    return ladder + [k] if k >= 1 else []


# ----------------------------------------------------------------------------- answers

_TAG_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_HASH_ANSWER = re.compile(r"####\s*([^\n]+)")
_SAID_ANSWER = re.compile(r"answer is\s*:?\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\displaystyle|\s+")


def normalize_answer(text: str | None) -> str | None:
    """The key answers are compared by for majority voting: a number in canonical form
    (``1,000.0`` -> ``1000``, ``$5`` -> ``5``, ``0.50`` -> ``0.5``); otherwise the text with
    whitespace, ``$``, a trailing period, ``\\text{...}`` wrappers and LaTeX sizing/spacing
    (``\\left``, ``\\right``, ``\\,``) removed and ``\\dfrac``/``\\tfrac`` read as ``\\frac``.
    Case is kept (LaTeX is case sensitive). Empty -> None."""
    if text is None:
        return None
    s = text.strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\$", "").replace("$", "")
    s = _LATEX_NOISE.sub("", s).rstrip(".")
    if not s:
        return None
    plain = s.replace(",", "")
    if re.fullmatch(r"-?\d+(?:\.\d+)?", plain):
        value = float(plain)
        if math.isfinite(value):
            return str(int(value)) if value == int(value) else repr(value)
    return s


def extract_answer(completion: str) -> str | None:
    """A completion's final answer, normalized (:func:`normalize_answer`), for majority voting.

    Taken from, in order of preference: the last ``<answer>...</answer>``, the last
    ``\\boxed{...}``, ``#### X``, "the answer is X", the last number; failing all of these the whole
    completion (so free-text tasks vote on identical responses). None for an empty completion.
    A reward may provide its own ``extract_answer(completion) -> str | None`` attribute instead.
    """
    for found in (_TAG_ANSWER.findall(completion), [last_boxed_answer(completion)],
                  _HASH_ANSWER.findall(completion), _SAID_ANSWER.findall(completion),
                  _NUMBER.findall(completion)):
        found = [f for f in found if f is not None and f.strip()]
        if found:
            return normalize_answer(found[-1])
    return normalize_answer(completion)


# ----------------------------------------------------------------------------- generation


def _correct(score: dict[str, float]) -> float:
    return float(score.get("correct", score["reward"]))


def _score(reward_fn, completions: list[str], rows: list[dict[str, Any]], index: list[int],
           completer: _Completer) -> tuple[list[dict[str, float]], int]:
    """The reward of each completion of ``rows[i] for i in index``; a reward that reads the prompt
    (``uses_prompt``) also gets the rendered prompt texts."""
    batch_rows = [rows[i] for i in index]
    if getattr(reward_fn, "uses_prompt", False):
        return reward_fn(completions, batch_rows, [completer.prompts[i] for i in index])
    return reward_fn(completions, batch_rows)


class _Completer:
    """Renders, tokenizes (once per row), left-pads and decodes completions through TorchRL's
    ``TransformersWrapper`` or, given an ``engine`` (the run's vLLM generator, holding the model's
    weights), through it, in chunks of ``batch_size`` sequences."""

    def __init__(self, model, tokenizer, renderer, batch_size: int, engine=None, seed: int | None = 0):
        self.model, self.tokenizer, self.renderer, self.batch_size = model, tokenizer, renderer, batch_size
        self.engine, self.seed, self.calls = engine, seed or 0, 0
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self._ids: dict[int, torch.Tensor] = {}
        self.prompts: dict[int, str] = {}
        self.device = next(model.parameters()).device

    def _encode(self, rows: list[dict[str, Any]], index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        for i in index:
            if i not in self._ids:
                text = self.prompts[i] = self.renderer(rows[i])
                self._ids[i] = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"],
                                            dtype=torch.long)
        prompt, mask = left_pad([self._ids[i] for i in index], self.pad_id)
        return prompt.to(self.device), mask.to(self.device)

    def complete(self, rows: list[dict[str, Any]], index: list[int], gen_kwargs: dict[str, Any]
                 ) -> tuple[list[str], list[int]]:
        """Completion texts and token lengths (stop token included) for ``rows[i] for i in index``."""
        generator = make_generator(self.model, self.tokenizer, gen_kwargs) if self.engine is None else None
        self.calls += 1
        texts, lengths = [], []
        for start in range(0, len(index), self.batch_size):
            chunk = index[start : start + self.batch_size]
            prompt, mask = self._encode(rows, chunk)
            if generator is None:  # per-request seeds: the same samples whatever the batch size's RNG use
                response = self.engine.complete(prompt.cpu(), mask.cpu(), gen_kwargs, self.seed,
                                                ("eval", self.calls, start))
            else:
                out = generator(TensorDict({"tokens": {"prompt": prompt}, "attention_mask": mask},
                                           batch_size=[len(chunk)]))
                response = out["tokens", "response"].cpu()
            resp_mask = response_mask(response, self.stop_ids)
            texts += self.tokenizer.batch_decode([r[m] for r, m in zip(response, resp_mask)],
                                                 skip_special_tokens=True)
            lengths += resp_mask.sum(-1).tolist()
        return texts, lengths


def _sampling_kwargs(temperature: float, max_new_tokens: int, top_p: float, top_k: int) -> dict[str, Any]:
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": temperature,
              "top_k": top_k or None}  # None: unrestricted (HF falls back to 50 when top_k is absent)
    if top_p < 1:
        kwargs["top_p"] = top_p
    return kwargs


@torch.no_grad()
def evaluate(model, tokenizer, renderer, reward_fn, rows: list[dict[str, Any]], *, k: int,
             temperature: float = 1.0, max_new_tokens: int, batch_size: int = 64, greedy: bool = True,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = 0,
             answer_fn: Callable[[str], str | None] | None = None,
             records: list[dict[str, Any]] | None = None, engine=None) -> dict[str, float]:
    """Greedy accuracy and, with ``k`` >= 1 samples per prompt, pass@j (j = 1, 2, 4, ..., k),
    maj@k and mean@k over ``rows`` (see the module docstring for the definitions).

    ``batch_size`` counts sequences per ``generate`` call (a prompt's k samples may span calls).
    Sampling runs under a forked RNG seeded with ``seed`` (None: the caller's RNG), so evaluating
    during training neither perturbs nor depends on the training RNG stream. ``answer_fn`` maps a
    completion to its normalized answer for maj@k (default: the reward's ``extract_answer`` if it
    has one, else :func:`extract_answer`). ``records``, when given, receives one dict per prompt
    with its completions, scores and answers. The model's train/eval mode is restored. ``engine``:
    generate with it (a :class:`~grpo_utils.inference.vllm_engine.VLLMGenerator` holding the
    model's weights; its samples are seeded per request from ``seed``) instead of ``model``.
    """
    if k < 0 or (k == 0 and not greedy):
        raise ValueError(f"evaluate needs k >= 1 samples or greedy=True (got k={k}, greedy={greedy})")
    if not rows:
        raise ValueError("evaluate: no rows to evaluate")
    answer_fn = answer_fn or getattr(reward_fn, "extract_answer", None) or extract_answer
    was_training = model.training
    model.eval()
    completer = _Completer(model, tokenizer, renderer, batch_size, engine, seed)
    n = len(rows)
    metrics: dict[str, float] = {"eval/num_prompts": float(n)}
    per_prompt: list[dict[str, Any]] = [{"index": i, "question": r.get("question"), "answer": r.get("answer")}
                                        for i, r in enumerate(rows)]
    try:
        if greedy:
            texts, lengths = completer.complete(rows, list(range(n)), {"max_new_tokens": max_new_tokens,
                                                                        "do_sample": False})
            scores, failures = _score(reward_fn, texts, rows, list(range(n)), completer)
            metrics["eval/accuracy"] = sum(_correct(s) for s in scores) / n
            metrics["eval/reward"] = sum(s["reward"] for s in scores) / n
            metrics["eval/response_length"] = sum(lengths) / n
            metrics["eval/reward_failures"] = float(failures)
            for rec, text, score in zip(per_prompt, texts, scores):
                rec["greedy"] = {"completion": text, "correct": _correct(score), "reward": score["reward"]}
        if k >= 1:
            index = [i for i in range(n) for _ in range(k)]
            devices = [completer.device.index or 0] if completer.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices, enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                texts, lengths = completer.complete(
                    rows, index, _sampling_kwargs(temperature, max_new_tokens, top_p, top_k))
            scores, failures = _score(reward_fn, texts, rows, index, completer)
            ladder = pass_k_ladder(k)
            sums = dict.fromkeys(ladder, 0.0)
            maj = mean = 0.0
            for p in range(n):
                group = slice(p * k, (p + 1) * k)
                corrects = [_correct(s) for s in scores[group]]
                answers = [answer_fn(t) for t in texts[group]]
                c = sum(x >= 1.0 - 1e-6 for x in corrects)
                for j in ladder:
                    sums[j] += pass_at_k(k, c, j)
                maj += majority_vote(answers, corrects)
                mean += sum(corrects) / k
                per_prompt[p]["samples"] = [{"completion": t, "correct": x, "answer": a}
                                            for t, x, a in zip(texts[group], corrects, answers)]
                per_prompt[p]["num_correct"] = c
            metrics.update({f"eval/pass@{j}": sums[j] / n for j in ladder})
            metrics[f"eval/maj@{k}"] = maj / n
            metrics[f"eval/mean@{k}"] = mean / n
            metrics["eval/sample_reward"] = sum(s["reward"] for s in scores) / len(scores)
            metrics["eval/sample_response_length"] = sum(lengths) / len(lengths)
            metrics["eval/sample_reward_failures"] = float(failures)
    finally:
        model.train(was_training)
    if records is not None:
        records.extend(per_prompt)
    return metrics


# ----------------------------------------------------------------------------- the eval recipe's parts



class EvalConfigError(ConfigError):
    """A bad setting of the evaluation config; the message names the key."""


def validate_eval_config(cfg) -> None:
    """Raise :class:`EvalConfigError` (one line naming the key) on the first problem found."""

    from grpo_utils.data.datasets import DataError, validate_env

    # Keys and types were checked when Hydra merged the config into the schema (EvalRunConfig).
    e, g = cfg.eval, cfg.generation
    checks = [
        (e.split in ("train", "test"), f"eval.split={e.split!r} is unknown; expected train or test"),
        (isinstance(e.k, int) and e.k >= 0, f"eval.k={e.k} must be an integer >= 0"),
        (e.greedy or e.k >= 1, "eval.greedy=false with eval.k=0 leaves nothing to evaluate"),
        (e.max_prompts >= 0, f"eval.max_prompts={e.max_prompts} must be >= 0 (0 = all)"),
        (e.batch_size >= 1, f"eval.batch_size={e.batch_size} must be >= 1"),
        (g.max_new_tokens >= 1, f"generation.max_new_tokens={g.max_new_tokens} must be >= 1"),
        (g.temperature > 0, f"generation.temperature={g.temperature} must be > 0"),
        (0 < g.top_p <= 1, f"generation.top_p={g.top_p} must be in (0, 1]"),
        (g.get("top_k", 0) >= 0, f"generation.top_k={g.get('top_k')} must be >= 0 (0 = unrestricted)"),
        (cfg.num_threads >= 0, f"num_threads={cfg.num_threads} must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise EvalConfigError(msg)
    from grpo_utils.models.loading import DTYPES

    if cfg.model.dtype not in DTYPES:
        raise EvalConfigError(f"model.dtype={cfg.model.dtype!r}; expected one of {', '.join(DTYPES)}")
    try:
        validate_env(cfg.env, splits=(e.split,))
    except DataError as err:
        raise EvalConfigError(str(err)) from None


def check_reward(reward_fn, row: dict[str, Any], dataset: str) -> None:
    """Fail fast when the reward reads row fields the dataset's rows lack (instead of every
    sample silently scoring 0 through the reward's failure isolation)."""
    required = getattr(reward_fn, "required_fields", None)
    if required is None:
        return
    for alternatives in required():
        alternatives = (alternatives,) if isinstance(alternatives, str) else tuple(alternatives)
        if not any(field in row for field in alternatives):
            raise EvalConfigError(f"reward {getattr(reward_fn, 'name', '')!r} reads row field "
                                  f"{' or '.join(repr(f) for f in alternatives)}, which env.dataset={dataset} "
                                  f"rows lack (they have {', '.join(sorted(row))})")


def resolve_model_dir(name: str) -> str:
    """What ``model.name`` points at, for evaluation: a model directory (``config.json``), a
    checkpoint ``checkpoints/step_N``, a training run directory (its latest checkpoint) or its
    ``checkpoints/`` directory, ``builtin:quickstart``, or else a Hugging Face hub name.
    Raises :class:`EvalConfigError` naming the key."""
    from grpo_utils.models.loading import resolve_model_path
    from grpo_utils.train.checkpoint import list_checkpoints, verify_checkpoint

    if name.startswith("builtin:"):
        try:
            return resolve_model_path(name)
        except ValueError as err:
            raise EvalConfigError(str(err)) from None
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            problem = verify_checkpoint(path) if (path / "manifest.json").is_file() else None
            if problem:  # a checkpoint or final_model whose files no longer match their manifest
                raise EvalConfigError(f"model.name={name}: damaged ({problem})")
            return str(path)
        for run_dir in (path, path.parent if path.name == "checkpoints" else None):
            if run_dir is None:
                continue
            # The newest intact checkpoint of a run (checked against its manifest when it has one).
            for ckpt in reversed(list_checkpoints(run_dir)):
                problem = "no config.json" if not (ckpt / "config.json").is_file() else \
                    verify_checkpoint(ckpt) if (ckpt / "manifest.json").is_file() else None
                if problem is None:
                    return str(ckpt)
                print(f"checkpoint {ckpt} is damaged ({problem}); trying an older one")
        raise EvalConfigError(f"model.name={name}: not a model directory (no config.json), nor a run "
                              "directory with checkpoints/step_<N>/")
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") != 1 or path.exists()
    if looks_local:
        raise EvalConfigError(f"model.name={name}: no such model directory")
    return name  # a hub name ("org/model")


def build_report(metrics: dict[str, float], *, model: str, dataset: str, split: str, k: int,
                 skipped_rows: int = 0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON report: headline numbers first (``greedy_accuracy``, ``pass@k``, ``maj@k``,
    ``mean@k`` with k substituted, null when not measured), then every metric."""
    def get(key: str) -> float | None:
        return metrics.get(f"eval/{key}")

    report: dict[str, Any] = {"model": model, "dataset": dataset, "split": split,
                              "n_prompts": int(metrics["eval/num_prompts"]), "k": k,
                              "greedy_accuracy": get("accuracy")}
    if k >= 1:
        report.update({f"pass@{j}": get(f"pass@{j}") for j in pass_k_ladder(k)})
        report.update({f"maj@{k}": get(f"maj@{k}"), f"mean@{k}": get(f"mean@{k}")})
    report.update({"skipped_rows": skipped_rows, **(extra or {}),
                   "metrics": {key.removeprefix("eval/"): v for key, v in metrics.items()}})
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as a two-column table for the terminal."""
    k = report["k"]
    rows = [("model", report["model"]),
            ("dataset", f"{report['dataset']} ({report['split']} split, {report['n_prompts']} prompts"
                        + (f", k={k})" if k else ")"))]
    if report.get("greedy_accuracy") is not None:
        rows.append(("greedy accuracy", f"{report['greedy_accuracy']:.4f}"))
    if k >= 1:
        rows += [(f"pass@{j}", f"{report[f'pass@{j}']:.4f}") for j in pass_k_ladder(k)]
        rows += [(f"maj@{k}", f"{report[f'maj@{k}']:.4f}"), (f"mean@{k}", f"{report[f'mean@{k}']:.4f}")]
    if report.get("skipped_rows"):
        rows.append(("skipped rows", str(report["skipped_rows"])))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
