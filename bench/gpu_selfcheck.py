"""GPU self-check (``make gpu-check``): each GPU-only path of the recipe that this machine has the
devices (and packages) for, a few steps each, through ``grpo-sync.py`` as a user launches it.

    make gpu-check                                  # every path the machine can run
    python bench/gpu_selfcheck.py --only fsdp-2-ranks reference-own-gpu

One line per path: ``PASS`` (with the step time and, where vLLM is synced, the largest
``weight_sync/probe_max_abs_diff`` the run logged), ``FAIL (the run's last line)`` or
``SKIPPED (why)``. The model is a small Qwen2 built locally (no download): 2 layers, hidden 256,
4 heads of 64 (vLLM's kernels want head sizes of 64 or more; 2 KV heads, so tensor parallelism 2
splits them), the byte-level tokenizer, bf16; the task is the bundled quick-start one. Each run
takes 4 steps of 4 prompts x 4 completions of 16 tokens; the step time is the mean wall time
between metrics lines after the first (generation, weight sync and the optimizer step). The
process exits 1 when a path failed, else 0 (all skipped included).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "sota-implementations" / "grpo" / "grpo-sync.py"
sys.path.insert(0, str(REPO))  # run as a script from anywhere

VLLM = ["inference_model.backend=vllm", "inference_model.max_model_len=512"]
RAY_COLLECTIVE = ["mode.ray=true", "mode.weight_sync=collective"]


@dataclass(frozen=True)
class Check:
    """One GPU path: the overrides that select it, what it needs, and what a PASS requires."""

    name: str
    what: str
    gpus: int
    overrides: tuple[str, ...]
    vllm: bool = False
    ray: bool = False


PATHS = [
    Check("colocated-vllm", "vLLM in the trainer's process on its GPU, sleeping while the trainer trains", 1,
          (*VLLM, "inference_model.sleep=true"), vllm=True),
    Check("ray-nccl-sync", "a Ray collector with vLLM on a second GPU, weights broadcast over NCCL", 2,
          (*VLLM, *RAY_COLLECTIVE, "inference_model.num_devices=1"), vllm=True, ray=True),
    Check("tensor-parallel-2", "a Ray collector's vLLM over 2 GPUs (tensor_parallel_size=2), NCCL sync", 3,
          (*VLLM, *RAY_COLLECTIVE, "inference_model.num_devices=2", "inference_model.tensor_parallel_size=2"),
          vllm=True, ray=True),
    Check("fsdp-2-ranks", "2 trainer ranks (FSDP2) over NCCL", 2, ("train_model.num_devices=2",)),
    Check("reference-own-gpu", "the KL reference on a GPU of its own", 2,
          ("loss.kl_coef=0.05", "ref_model.num_devices=1")),
]
STEPS = 4


def common_overrides(model_dir: Path | str, run_dir: Path | str) -> list[str]:
    return [f"model.name={model_dir}", f"hydra.run.dir={run_dir}", "device=cuda", "model.dtype=bfloat16",
            "env.num_prompts=4", "env.group_size=4", "train.optim_batch_size=16", "generation.max_new_tokens=16",
            f"train.max_steps={STEPS}", "optimizer.lr=1e-4", "eval.before_after=false", "eval.every_n_steps=0",
            "checkpoint.every_n_steps=0", "seed=0"]


def recipe_env() -> dict[str, str]:
    """The recipe's environment: grpo_utils from this checkout first (also where it is not installed)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}


def skip_reason(path: Check, gpus: int, has_vllm: bool, has_ray: bool) -> str | None:
    """Why ``path`` cannot run here (None: it can)."""
    if gpus < path.gpus:
        return f"needs {path.gpus} GPU{'s' if path.gpus > 1 else ''}, found {gpus}"
    if path.vllm and not has_vllm:
        return "needs vLLM: pip install -e '.[vllm]'"
    if path.ray and not has_ray:
        return "needs Ray: pip install ray"
    return None


def plan(gpus: int, has_vllm: bool, has_ray: bool, only: list[str] | None = None) -> list[tuple[Check, str | None]]:
    """Every path (or those named in ``only``) with its skip reason."""
    return [(p, skip_reason(p, gpus, has_vllm, has_ray)) for p in PATHS if not only or p.name in only]


def build_model(path: Path) -> Path:
    from grpo_utils.models.tiny import save_tiny

    return save_tiny(path, hidden_size=256, num_layers=2, num_heads=4, max_positions=512)


def last_line(text: str) -> str:
    """The run's last non-empty output line: the recipe's one-line error, or a traceback's end."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return lines[-1][:300] if lines else "no output"


def run_path(path: Check, model_dir: Path, work: Path, timeout: float) -> dict:
    """Run the recipe for ``path``; returns status, step time and the largest probe difference."""
    run_dir = work / path.name
    args = [*common_overrides(model_dir, run_dir), *path.overrides]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(RECIPE), *args], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, env=recipe_env())
    except subprocess.TimeoutExpired:
        return {"status": "FAIL", "why": f"no result in {timeout:.0f} s"}
    (work / f"{path.name}.log").write_text(proc.stdout + proc.stderr)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"status": "FAIL", "why": last_line(proc.stderr or proc.stdout), "wall_s": wall}
    metrics = run_dir / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    train = [r for r in lines if "reward/mean" in r]
    if [r["step"] for r in train] != list(range(1, STEPS + 1)):
        return {"status": "FAIL", "why": f"metrics.jsonl has steps {[r['step'] for r in train]}, "
                                         f"expected 1..{STEPS}", "wall_s": wall}
    result = {"status": "PASS", "wall_s": wall,
              "step_s": (train[-1]["time"] - train[0]["time"]) / (len(train) - 1)}
    probes = [r["weight_sync/probe_max_abs_diff"] for r in train if "weight_sync/probe_max_abs_diff" in r]
    if path.vllm:
        if not probes:
            return {**result, "status": "FAIL", "why": "no weight_sync/probe_max_abs_diff logged after a sync"}
        result["probe_max_abs_diff"] = max(probes)
    if "ref_model.num_devices=1" in path.overrides and not all("kl_ref" in r for r in train):
        return {**result, "status": "FAIL", "why": "no kl_ref logged"}
    return result


def line(path: Check, r: dict) -> str:
    head = f"{path.name:<18} "
    if r["status"] == "SKIPPED":
        return head + f"SKIPPED ({r['why']})"
    if r["status"] == "FAIL":
        return head + f"FAIL ({r['why']})"
    probe = f", probe max abs diff {r['probe_max_abs_diff']:.3g}" if "probe_max_abs_diff" in r else ""
    return head + f"PASS (step {r['step_s']:.2f} s{probe}; run {r['wall_s']:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=[p.name for p in PATHS], help="run only these paths")
    ap.add_argument("--timeout", type=float, default=240, help="seconds one path may take")
    ap.add_argument("--keep", help="keep the model, run directories and logs here")
    a = ap.parse_args(argv)

    import torch

    gpus = torch.cuda.device_count()
    has_vllm, has_ray = (importlib.util.find_spec(m) is not None for m in ("vllm", "ray"))
    print(f"gpu-check: {gpus} GPU(s)" + (f" ({torch.cuda.get_device_name(0)})" if gpus else "")
          + f", torch {torch.__version__}, vLLM {'yes' if has_vllm else 'no'}, Ray {'yes' if has_ray else 'no'}",
          flush=True)
    todo = plan(gpus, has_vllm, has_ray, a.only)
    work = None
    if any(reason is None for _, reason in todo):
        work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="gpu-check-"))
        work.mkdir(parents=True, exist_ok=True)
        model_dir = build_model(work / "model")
    failed = 0
    try:
        for path, reason in todo:
            if reason is not None:
                r = {"status": "SKIPPED", "why": reason}
            else:
                print(f"gpu-check: {path.name}: {path.what} ...", flush=True)
                r = run_path(path, model_dir, work, a.timeout)
                failed += r["status"] == "FAIL"
            print(line(path, r), flush=True)
    finally:
        if work is not None and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    if failed and not a.keep:
        print("gpu-check: rerun with --keep DIR to keep each path's log (DIR/<path>.log)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
