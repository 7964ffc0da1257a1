"""GPU check: the real ``grpo-sync.py`` on one GPU, on a Qwen2.5-0.5B-shaped model built locally.

    python bench/gpu_check.py                  # on cuda: three recipe runs, then the report
    python bench/gpu_check.py --cpu --tiny     # the same runs on a tiny model on the CPU (a dry run)

Run it through ``bench/gpu_check.sh``, which first installs what a bare GPU image lacks from
carried wheels. No downloads: the model is a Qwen2 with Qwen2.5-0.5B's shape (hidden 896, 24
layers, 14 heads, 2 KV heads, intermediate 4864, vocabulary 151936, tied embeddings) and random
weights, saved in bf16 to a temporary directory with the byte-level tokenizer of
``grpo_utils.models.tiny`` (generated ids range over the whole vocabulary; ids the tokenizer
does not know decode to nothing).

The runs are what a user launches: ``grpo-sync.py --config-name grpo_one_gpu`` (bf16 weights,
gradient checkpointing, the transformers backend) with Hydra overrides for the model, a fixed
batch shape (``generation.min_new_tokens = max_new_tokens``), ``train_model.num_devices=1`` and a
KL reference on the same GPU (``loss.kl_coef``), in local sync mode:

1. ``full``: full fine-tuning for ``--steps`` optimizer steps, a checkpoint every
   ``--steps-per-batch`` steps (each rollout batch);
2. ``resumed``: a new run resumed from ``full``'s first checkpoint (``resume=<checkpoint>``) to the
   same step; its metrics lines must equal ``full``'s (the max abs difference is printed);
3. ``lora``: LoRA adapters on every linear layer (``train_model.lora.target_modules=all-linear``).

From each run's ``metrics.jsonl`` (the first rollout batch is warm-up and left out when there are
more): generation tokens/s (generated tokens / ``time/generate_s``), training tokens/s (prompt +
response tokens of the optimizer steps' sequences / ``time/train_s``; the behaviour and reference
forwards before them are not counted), peak GPU memory (``perf/peak_mem_gib``, the recipe's
``torch.cuda.max_memory_allocated``) and MFU against the device's dense bf16 peak (``--peak-tflops``;
by default from the device name: H100 SXM and H200 989 TFLOP/s, H100 PCIe 756, A100 312). FLOPs
count the weight matmuls only (attention's sequence-squared terms are left out): 2N per generated
token; per trained token 2N forward, 2N backward through the activations and 2N_trainable for the
weight gradients (6N for full fine-tuning, 4N + 2N_lora with LoRA; gradient checkpointing's
recomputed forward is not counted, as in the usual MFU). N counts the tied embedding once. The
last line is ``GPU_CHECK {json}`` for scripts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "sota-implementations" / "grpo" / "grpo-sync.py"
sys.path.insert(0, str(REPO))  # run as a script from anywhere

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, rms_norm_eps=1e-6)
# Dense bf16 peaks (TFLOP/s) by device name, most specific first.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0)]
# The metrics of a training line compared between the uninterrupted and the resumed run.
RESUME_KEYS = ("reward/mean", "loss", "kl_ref", "entropy", "grad_norm", "lr", "response_length/mean")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU instead of cuda:0")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 model and a small batch")
    ap.add_argument("--runs", nargs="+", default=["full", "resumed", "lora"], choices=["full", "resumed", "lora"],
                    help="resumed needs full")
    ap.add_argument("--prompts", type=int, default=16, help="env.num_prompts")
    ap.add_argument("--group", type=int, default=8, help="env.group_size")
    ap.add_argument("--new-tokens", type=int, default=128, help="every completion is exactly this long")
    ap.add_argument("--steps-per-batch", type=int, default=2, help="optimizer steps per rollout batch")
    ap.add_argument("--accum", type=int, default=2, help="train.grad_accum_steps")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps of the full and resumed runs")
    ap.add_argument("--lora-steps", type=int, default=4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--kl-coef", type=float, default=0.04)
    ap.add_argument("--lr", type=float, default=1e-5, help="full fine-tuning's learning rate (LoRA: 10x)")
    ap.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak for MFU (default: from its name)")
    ap.add_argument("--keep", help="keep the model and run directories here (default: a temporary directory)")
    ap.add_argument("--run-timeout", type=float, default=300, help="seconds one recipe run may take")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.tiny:
        for name, value in (("prompts", 2), ("group", 4), ("new_tokens", 8), ("steps", 4), ("lora_steps", 2),
                            ("lr", 1e-3)):
            if getattr(a, name) == ap.get_default(name):
                setattr(a, name, value)
    batch = a.prompts * a.group
    if batch % a.steps_per_batch or (batch // a.steps_per_batch) % a.accum:
        ap.error(f"--prompts x --group = {batch} must split into --steps-per-batch={a.steps_per_batch} of "
                 f"--accum={a.accum} micro-batches")
    if a.steps % a.steps_per_batch or a.steps < 2 * a.steps_per_batch:
        ap.error(f"--steps={a.steps} must be a multiple of --steps-per-batch={a.steps_per_batch}, at least two "
                 f"batches (the resumed run starts from the first batch's checkpoint)")
    if "resumed" in a.runs and "full" not in a.runs:
        ap.error("--runs resumed needs full (it resumes from full's checkpoint)")
    return a


def peak_tflops_of(device_name: str | None) -> float | None:
    """The dense bf16 peak of a device named ``device_name`` (torch.cuda.get_device_name), if known."""
    for key, tflops in PEAK_TFLOPS:
        if device_name and key in device_name:
            return tflops
    return None


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "torchrl", "tensordict", "hydra", "omegaconf", "peft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "missing"
    return out


def build_model_dir(path: Path, spec: dict, lora_r: int, seed: int, device) -> dict[str, int]:
    """Save a randomly initialised Qwen2 of shape ``spec`` (bf16) with the byte-level tokenizer to
    ``path``; returns its parameter count and the adapters' with ``lora_r`` on every linear layer
    (counted by the library's ``apply_lora``, as the recipe applies it)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo_utils.models.lora import apply_lora
    from grpo_utils.models.tiny import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(**spec, tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    with device:  # initialising 0.5B parameters on the host takes a while
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    lora = apply_lora(model, {"r": lora_r, "alpha": 2.0 * lora_r, "dropout": 0.0, "target_modules": "all-linear"})
    lora_params = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    del model, lora
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"params": params, "lora_params": lora_params}


def overrides(a: argparse.Namespace, model_dir: Path, run_dir: Path, device: str, steps: int, *extra: str) -> list[str]:
    batch = a.prompts * a.group
    return [
        "--config-name", "grpo_one_gpu",  # the one-GPU base: bf16 weights, gradient checkpointing
        f"model.name={model_dir}", f"hydra.run.dir={run_dir}", f"device={device}", "train_model.num_devices=1",
        f"env.num_prompts={a.prompts}", f"env.group_size={a.group}",
        f"generation.max_new_tokens={a.new_tokens}", f"generation.min_new_tokens={a.new_tokens}",
        f"train.optim_batch_size={batch // a.steps_per_batch}", f"train.grad_accum_steps={a.accum}",
        f"train.max_steps={steps}", "optimizer.warmup_steps=1",
        # A KL reference on the trainer's GPU; the entropy bonus gives the random model (which earns
        # no reward, so every advantage is 0) a gradient, so the weights and the KL move.
        f"loss.kl_coef={a.kl_coef}", "loss.entropy_coef=0.01",
        "eval.before_after=false", "eval.every_n_steps=0", f"seed={a.seed}", *extra,
    ]


def recipe_env() -> dict[str, str]:
    """The recipe's environment: grpo_utils from this checkout first (nothing is installed on a bare
    GPU machine), Hydra's full tracebacks in the run's log."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else ""), "HYDRA_FULL_ERROR": "1"}


def run_recipe(name: str, args: list[str], run_dir: Path, timeout: float) -> tuple[list[dict], float]:
    """Run ``grpo-sync.py`` with ``args`` as a user does (its output in ``<run_dir>.log``); returns
    the training lines of its metrics.jsonl and its wall time."""
    log = run_dir.with_suffix(".log")
    print(f"gpu_check: {name}: {' '.join(['grpo-sync.py', *args])}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, str(RECIPE), *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout, env=recipe_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{name} run failed ({proc.returncode}) after {wall:.0f} s; the end of {log}:\n{tail}")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in lines if "reward/mean" in r], wall


def throughput(lines: list[dict], a: argparse.Namespace, params: int, trainable: int,
               peak_tflops: float | None) -> dict:
    """Generation and training tokens/s, MFU and peak memory of one run's training lines, over its
    rollout batches after the first (the warm-up) when there are several."""
    spb = a.steps_per_batch
    batches = [lines[i:i + spb] for i in range(0, len(lines), spb)]
    timed = batches[1:] if len(batches) > 1 else batches
    sequences = a.prompts * a.group
    gen_tokens = sum(b[0]["response_length/mean"] * sequences for b in timed)
    gen_s = sum(b[0]["time/generate_s"] for b in timed)  # one generation per batch, on each of its lines
    per_step = sequences // spb
    train_tokens = sum(per_step * (r["prompt_length/mean"] + r["response_length/mean"]) for b in timed for r in b)
    train_s = sum(r["time/train_s"] for b in timed for r in b)
    train_flops_per_token = 4 * params + 2 * trainable
    peak = peak_tflops * 1e12 if peak_tflops else None
    mem = [r["perf/peak_mem_gib"] for r in lines if "perf/peak_mem_gib" in r]
    return {
        "steps": len(lines), "timed_batches": len(timed), "loss_finite": all(math.isfinite(r["loss"]) for r in lines),
        "kl_ref_last": lines[-1].get("kl_ref"), "generate_s": gen_s, "train_s": train_s,
        "gen_tokens_per_s": gen_tokens / gen_s, "train_tokens_per_s": train_tokens / train_s,
        "train_flops_per_token": train_flops_per_token,
        "gen_mfu": 2 * params * gen_tokens / gen_s / peak if peak else None,
        "train_mfu": train_flops_per_token * train_tokens / train_s / peak if peak else None,
        "peak_mem_gib": max(mem) if mem else None,
    }


def resume_difference(full: list[dict], resumed: list[dict], first_step: int) -> dict:
    """Max abs difference of :data:`RESUME_KEYS` between the resumed run's lines and the
    uninterrupted run's for the same steps (``first_step`` on)."""
    ref = {r["step"]: r for r in full}
    got = {r["step"]: r for r in resumed if r["step"] >= first_step}
    if not got or sorted(got) != [s for s in sorted(ref) if s >= first_step]:
        raise RuntimeError(f"the resumed run logged steps {sorted(got)}, the uninterrupted one {sorted(ref)}")
    per_key = {k: max(abs(got[s][k] - ref[s][k]) for s in got) for k in RESUME_KEYS if k in ref[first_step]}
    return {"steps": sorted(got), "max_abs_diff": max(per_key.values()), "per_key": per_key}


def mfu(x: float | None) -> str:
    return "n/a (no peak FLOPs known for this device; give --peak-tflops)" if x is None else f"{100 * x:.1f}%"


def report(name: str, r: dict, peak_tflops: float | None) -> None:
    mem = "n/a (CPU)" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f} GiB"
    print(f"{name}: {r['steps']} steps, {r['params'] / 1e6:.2f}M parameters, {r['trainable'] / 1e6:.2f}M trained, "
          f"run {r['wall_s']:.0f} s; timed over {r['timed_batches']} batch(es):")
    print(f"  generation: {r['gen_tokens_per_s']:.0f} tokens/s, MFU {mfu(r['gen_mfu'])}")
    print(f"  training: {r['train_tokens_per_s']:.0f} tokens/s, MFU {mfu(r['train_mfu'])} at "
          f"{r['train_flops_per_token'] / r['params']:.2f} x N FLOPs/token"
          + (f" (peak {peak_tflops:.0f} TFLOP/s)" if peak_tflops else ""))
    print(f"  peak memory: {mem}; kl_ref at the last step {r['kl_ref_last']:.3g}", flush=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    if a.cpu:
        device, name = torch.device("cpu"), "cpu"
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --cpu for a dry run)", file=sys.stderr)
            return 2
        device, name = torch.device("cuda", 0), torch.cuda.get_device_name(0)
    peak_tflops = a.peak_tflops or (None if a.cpu else peak_tflops_of(name))
    print("gpu_check: " + json.dumps(versions()) + f"; device {device} ({name}); peak "
          + (f"{peak_tflops:.0f} TFLOP/s dense bf16" if peak_tflops else "unknown"), flush=True)
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    spec = TINY if a.tiny else QWEN25_05B
    results: dict = {"device": name, "peak_tflops": peak_tflops, "versions": versions()}
    try:
        t0 = time.perf_counter()
        counts = build_model_dir(work / "model", spec, a.lora_r, a.seed, device)
        print(f"gpu_check: model built in {time.perf_counter() - t0:.0f} s: {counts['params'] / 1e6:.1f}M parameters, "
              f"{counts['lora_params'] / 1e6:.2f}M in rank-{a.lora_r} adapters", flush=True)
        dev = "cpu" if a.cpu else "cuda"
        model_dir, spb = work / "model", a.steps_per_batch
        full_lines = None
        plans = {
            "full": (a.steps, counts["params"], [f"optimizer.lr={a.lr}", f"checkpoint.every_n_steps={spb}",
                                                 "checkpoint.keep_last=null"]),
            "resumed": (a.steps, counts["params"], [f"optimizer.lr={a.lr}", f"checkpoint.every_n_steps={spb}",
                                                    f"resume={work / 'full' / 'checkpoints' / f'step_{spb}'}"]),
            "lora": (a.lora_steps, counts["lora_params"],
                     ["train_model.lora.enabled=true", f"train_model.lora.r={a.lora_r}",
                      f"train_model.lora.alpha={2 * a.lora_r}", "train_model.lora.target_modules=all-linear",
                      f"optimizer.lr={10 * a.lr}", "checkpoint.every_n_steps=0"]),
        }
        for run in a.runs:
            steps, trainable, extra = plans[run]
            lines, wall = run_recipe(run, overrides(a, model_dir, work / run, dev, steps, *extra), work / run,
                                     a.run_timeout)
            params = counts["params"] + (trainable if run == "lora" else 0)
            r = {"params": params, "trainable": trainable, "wall_s": wall,
                 **throughput([x for x in lines if run != "resumed" or x["step"] > spb], a, params, trainable,
                              peak_tflops)}
            if run == "full":
                full_lines = lines
            if run == "resumed":
                r["resume"] = resume_difference(full_lines, lines, spb + 1)
            results[run] = r
            report(run, r, peak_tflops)
            if run == "resumed":
                d = r["resume"]
                print(f"  resumed from step {spb}: steps {d['steps'][0]}-{d['steps'][-1]} against the uninterrupted "
                      f"run: max abs diff {d['max_abs_diff']:.3g} ("
                      + ", ".join(f"{k} {v:.2g}" for k, v in d["per_key"].items()) + ")", flush=True)
            for checkpoint in sorted((work / run / "checkpoints").glob("step_*")):
                if run != "full" or checkpoint.name != f"step_{spb}":
                    shutil.rmtree(checkpoint)  # disk: only the resume point is needed
    except Exception as e:  # the report says which run failed and why; the log's tail is in the message
        print(f"gpu_check: FAILED: {e}", flush=True)
        print("GPU_CHECK " + json.dumps(results), flush=True)
        return 1
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("GPU_CHECK " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
