"""Where a step's time goes: per-phase medians of grpo-sync.py and of the bare loop (bench/bare_loop.py).

    python bench/step_phases.py --model tiny          # or 4M; same workload as bench/step_time.py

Each side runs in its own process with timers wrapped around library calls (generate, the TorchRL
token path, prompt encoding, reward, replay buffer, forward, loss, backward, clip, AdamW, logging);
the step is the time between two metrics lines (recipe) or the loop's own stamp (bare). The timers
add a little to both sides, so read ratios from bench/step_time.py and the split from here.
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import resource
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {"tiny": dict(hidden_size=64, num_layers=2), "4M": dict(hidden_size=256, num_layers=6)}

acc: dict[str, float] = defaultdict(float)
steps: list[dict[str, float]] = []


def timed(label, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[label] += time.perf_counter() - t0
    return wrapper


def patch(owner, attr: str, label: str) -> None:
    setattr(owner, attr, timed(label, getattr(owner, attr)))


def end_step(seconds: float) -> None:
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    steps.append({**acc, "step": seconds, "page faults (k)": (faults - acc.get("_faults", faults)) / 1e3})
    acc.clear()
    acc["_faults"] = faults


def common_timers() -> None:
    import torch
    import transformers

    patch(transformers.GenerationMixin, "generate", "generate (HF)")
    patch(torch.Tensor, "backward", "backward")
    patch(torch.nn.utils, "clip_grad_norm_", "clip")
    patch(torch.optim.AdamW, "step", "AdamW")


def run_recipe(model: str, run_dir: str, a: argparse.Namespace) -> None:
    from torchrl.data import ReplayBuffer
    from torchrl.modules.llm import TransformersWrapper

    from grpo_utils.algo import advantages, losses
    from grpo_utils.rewards.function import RewardFunction
    from grpo_utils.rollout.group import GroupRollout
    from grpo_utils.train import metrics, trainer

    common_timers()
    patch(GroupRollout, "collect", "collect")
    patch(GroupRollout, "encode_prompts", "prompt encode")
    patch(TransformersWrapper, "forward", "TorchRL wrapper call")
    patch(RewardFunction, "__call__", "reward")
    patch(advantages, "assign_advantages", "advantages")
    for attr in ("__init__", "extend", "sample"):
        patch(ReplayBuffer, attr, "replay buffer")
    patch(trainer.PolicyTrainer, "optimizer_step", "optimizer_step")
    patch(trainer, "response_log_probs", "forward")
    patch(losses.PolicyLoss, "forward", "loss")
    last = [None]
    log = metrics.MetricsLogger.log

    def timed_log(self, record, step):
        t0 = time.perf_counter()
        log(self, record, step)
        t1 = time.perf_counter()
        acc["logger"] += t1 - t0
        if last[0] is not None:
            end_step(t1 - last[0])
        last[0] = t1

    metrics.MetricsLogger.log = timed_log
    sys.argv = [str(REPO / "sota-implementations/grpo/grpo-sync.py"), f"model.name={model}",
                f"hydra.run.dir={run_dir}", f"num_threads={a.threads}", "seed=0", f"env.num_prompts={a.prompts}",
                f"env.group_size={a.group}", f"train.optim_batch_size={a.prompts * a.group}",
                f"train.max_steps={a.steps}", f"generation.max_new_tokens={a.tokens}",
                f"generation.min_new_tokens={a.tokens}", "train.lr=1e-5", "eval.before_after=false",
                "eval.every_n_steps=0", "checkpoint.every_n_steps=0"]
    runpy.run_path(sys.argv[0], run_name="__main__")


def run_bare(model: str, a: argparse.Namespace) -> None:
    import transformers

    common_timers()
    patch(transformers.PreTrainedTokenizerBase, "apply_chat_template", "prompt encode")
    patch(transformers.PreTrainedTokenizerBase, "__call__", "prompt encode")
    patch(transformers.PreTrainedTokenizerBase, "batch_decode", "decode")
    stdout_print = builtins.print

    def capture(*args, **kwargs):
        if args and isinstance(args[0], str) and args[0].startswith('{"step"'):
            end_step(json.loads(args[0])["seconds"])
        else:
            stdout_print(*args, **kwargs)

    builtins.print = capture
    sys.argv = [str(REPO / "bench/bare_loop.py"), "--model", model, "--steps", str(a.steps), "--prompts",
                str(a.prompts), "--group", str(a.group), "--tokens", str(a.tokens), "--threads", str(a.threads)]
    runpy.run_path(sys.argv[0], run_name="__main__")
    builtins.print = stdout_print


def derived(s: dict[str, float], side: str) -> dict[str, float]:
    """Exclusive times: a phase minus the timed phases inside it."""
    d = dict(s)
    if side == "recipe":
        d["TorchRL token path"] = s.get("TorchRL token path", 0) - s.get("generate (HF)", 0)
        d["collect (rest: decode, stats, batch)"] = (s.get("collect", 0) - s.get("generate (HF)", 0)
                                                     - d["TorchRL token path"] - s.get("prompt encode", 0)
                                                     - s.get("reward", 0))
        train = s.get("optimizer_step", 0)
        d["optimizer_step (rest)"] = train - sum(s.get(k, 0) for k in ("forward", "loss", "backward", "clip", "AdamW"))
        d["recipe loop (rest)"] = s["step"] - s.get("collect", 0) - s.get("advantages", 0) - train - \
            s.get("replay buffer", 0) - s.get("logger", 0)
        for k in ("collect", "optimizer_step"):
            d.pop(k, None)
    else:
        d["rest (forward, loss, reward, advantages)"] = s["step"] - sum(
            s.get(k, 0) for k in ("generate (HF)", "prompt encode", "decode", "backward", "clip", "AdamW"))
    d.pop("_faults", None)
    return d


def side_main(a: argparse.Namespace) -> None:
    if a.side == "recipe":
        run_recipe(a.model_dir, a.run_dir, a)
    else:
        run_bare(a.model_dir, a)
    rows = [derived(s, a.side) for s in steps[a.warmup:]]
    print("PHASES " + json.dumps({k: statistics.median(r.get(k, 0.0) for r in rows) for k in rows[0]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--side", choices=["recipe", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return side_main(a)

    import transformers

    from grpo_utils.models.tiny import save_tiny

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny(Path(tmp) / a.model, **MODELS[a.model])
        result = {}
        for side in ("recipe", "bare"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side, "--model-dir", str(model_dir),
                   "--run-dir", str(Path(tmp) / "run")]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
            result[side] = json.loads(next(line for line in out.splitlines() if line.startswith("PHASES "))[7:])
    print(f"{a.model}: {a.prompts} prompts x {a.group} completions x {a.tokens} tokens, {a.threads} threads, "
          f"medians over steps {a.warmup + 2}-{a.steps} (ms)")
    for side, phases in result.items():
        print(f"  {side}: step {phases.pop('step') * 1000:.1f}")
        faults = phases.pop("page faults (k)")
        for k, v in sorted(phases.items(), key=lambda kv: -kv[1]):
            print(f"    {k:42s} {v * 1000:8.2f}")
        print(f"    {'page faults (thousands)':42s} {faults:8.2f}")


if __name__ == "__main__":
    main()
