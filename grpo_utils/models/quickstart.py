"""The quick start's base model: a tiny Qwen2 warm-started on the bundled ``max`` task.

The warm-start corpus imitates what RL usually meets in a real base model: the model has seen
the right skill, but more often a shortcut. 30% of the demonstrations name the largest digit,
70% name the first one, so the warm-started model can sample the right answer yet greedily
prefers the shortcut. GRPO, rewarded only for correct answers, has to find and amplify the
skill: held-out greedy accuracy moves from about 0.2 to about 0.9.

The model is built once and cached (``GRPO_CACHE_DIR``, default ``~/.cache/grpo-torchrl``).
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import torch

from grpo_utils.data.datasets import quickstart_rows
from grpo_utils.models.tiny import build_model, build_tokenizer, default_cache_dir, spec_hash, warm_start

SPEC = {
    "task": "max5", "hidden_size": 64, "num_layers": 2, "num_heads": 1, "skill_fraction": 0.3,
    "num_examples": 20000, "steps": 600, "batch_size": 64, "lr": 3e-3, "seed": 0, "version": 2,
}


def quickstart_model_dir(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"quickstart-{spec_hash(SPEC)}"


def warm_start_examples(tok) -> list[tuple[str, str]]:
    """The warm-start corpus: (chat prompt, answer) pairs, the skill in ``skill_fraction`` of them."""
    rng = random.Random(SPEC["seed"])
    # Warm-start prompts come from the training distribution only (seed 1 rows exclude held-out).
    examples = []
    for row in quickstart_rows(SPEC["num_examples"], seed=3):
        prompt = tok.apply_chat_template([{"role": "user", "content": row["question"]}],
                                         tokenize=False, add_generation_prompt=True)
        answer = row["answer"] if rng.random() < SPEC["skill_fraction"] else str(row["digits"][0])
        examples.append((prompt, answer))
    return examples


def ensure_quickstart_model(cache_dir: str | Path | None = None, verbose: bool = True) -> Path:
    """Path of the cached warm-started model; builds it (about 20 s on 2 cores) if absent."""
    target = quickstart_model_dir(cache_dir)
    if (target / "config.json").is_file():
        return target
    if verbose:
        print(f"Building the quick-start base model (once) into {target} ...", flush=True)
    tok = build_tokenizer()
    # Built under a forked RNG (build_model reseeds torch): the run that builds the cache then draws
    # the same random numbers as every later run that finds it.
    with torch.random.fork_rng():
        model = build_model(tok, hidden_size=SPEC["hidden_size"], num_layers=SPEC["num_layers"],
                            num_heads=SPEC["num_heads"], seed=SPEC["seed"])
        warm_start(model, tok, warm_start_examples(tok), steps=SPEC["steps"], batch_size=SPEC["batch_size"],
                   lr=SPEC["lr"], seed=SPEC["seed"])
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: concurrent builders (multirun) never see a partial model
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
