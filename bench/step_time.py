"""Framework tax: median step time of grpo-sync.py against a bare PyTorch loop doing the same work.

    python bench/step_time.py                 # tiny and ~4M-parameter models, 4 prompts x 8 x 16 tokens
    python bench/step_time.py --rounds 5 --steps 30 --threads 2

Both sides run the same model, prompts, group size, fixed completion length and thread count, in
alternating rounds (recipe, bare, recipe, bare, ...) so machine noise hits both. Recipe step
times come from the wall-clock stamps in its metrics.jsonl; the first ``--warmup`` steps of each
round are dropped. Target: ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import transformers

from grpo_utils.models.tiny import save_tiny

REPO = Path(__file__).resolve().parents[1]
MODELS = {"tiny": dict(hidden_size=64, num_layers=2), "4M": dict(hidden_size=256, num_layers=6)}


def recipe_steps(model_dir: Path, run_dir: Path, a: argparse.Namespace) -> list[float]:
    cmd = [sys.executable, str(REPO / "sota-implementations/grpo/grpo-sync.py"), f"model.name={model_dir}",
           f"hydra.run.dir={run_dir}", f"num_threads={a.threads}", f"seed={a.seed}",
           f"env.num_prompts={a.prompts}", f"env.group_size={a.group}",
           f"train.optim_batch_size={a.prompts * a.group}", f"train.max_steps={a.steps}",
           f"generation.max_new_tokens={a.tokens}", f"generation.min_new_tokens={a.tokens}",
           "optimizer.lr=1e-5", "eval.before_after=false", "eval.every_n_steps=0", "checkpoint.every_n_steps=0"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    stamps = [json.loads(line)["time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [b - a_ for a_, b in zip(stamps, stamps[1:])][a.warmup:]


def bare_steps(model_dir: Path, a: argparse.Namespace) -> list[float]:
    cmd = [sys.executable, str(REPO / "bench/bare_loop.py"), "--model", str(model_dir), "--steps", str(a.steps),
           "--prompts", str(a.prompts), "--group", str(a.group), "--tokens", str(a.tokens),
           "--threads", str(a.threads), "--seed", str(a.seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return [json.loads(line)["seconds"] for line in out.splitlines() if line.startswith("{")][a.warmup + 1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="also print each round's medians")
    a = ap.parse_args()
    transformers.utils.logging.disable_progress_bar()
    print(f"{a.prompts} prompts x {a.group} completions x {a.tokens} tokens, {a.threads} threads, "
          f"{a.rounds} alternating rounds of {a.steps} steps (first {a.warmup} dropped)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            model_dir = save_tiny(Path(tmp) / name, **MODELS[name])
            params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(model_dir).parameters())
            recipe, bare = [], []
            for r in range(a.rounds):
                recipe += (rs := recipe_steps(model_dir, Path(tmp) / f"run_{name}_{r}", a))
                bare += (bs := bare_steps(model_dir, a))
                if a.verbose:
                    print(f"  round {r}: grpo-sync {statistics.median(rs) * 1000:7.1f} ms/step | "
                          f"bare loop {statistics.median(bs) * 1000:7.1f} ms/step", flush=True)
            rm, bm = statistics.median(recipe), statistics.median(bare)
            print(f"{name:>5} ({params / 1e6:.2f}M params): grpo-sync {rm * 1000:7.1f} ms/step | "
                  f"bare loop {bm * 1000:7.1f} ms/step | ratio {rm / bm:.2f}")


if __name__ == "__main__":
    main()
