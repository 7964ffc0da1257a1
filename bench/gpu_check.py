"""GPU check: the local sync training path on one GPU with FSDP2 (world size 1), LoRA and bf16.

    python bench/gpu_check.py                  # Qwen2.5-0.5B-shaped model, random init, on cuda
    python bench/gpu_check.py --cpu --tiny     # the same path on a tiny model on the CPU (a dry run)

Run it through ``bench/gpu_check.sh``, which first installs what a bare GPU image lacks from
carried wheels. No downloads: the model is a Qwen2 built locally with Qwen2.5-0.5B's shape (hidden
896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocabulary 151936, tied embeddings) and
random weights; the tokenizer is the byte-level one of ``grpo_utils.models.tiny`` (prompts are
random byte tokens; generated ids range over the model's whole vocabulary and are never decoded).

Imports nothing of torchrl, Ray, vLLM or Hydra: it drives the pieces of one local sync iteration
directly, in ``GRPOLoop``'s order: sampling with Hugging Face ``generate`` on the full policy (what
the transformers backend runs), a reward, group advantages, the trainer's behaviour log-probs
(``annotate``), one ``optimizer_step`` per mini-batch on the FSDP2-sharded copy
(``ShardedTrainer`` over a one-rank NCCL group; gloo on the CPU), and ``publish`` of the trained
weights back into the policy that generates next. Generation runs in the policy's fp32 weights
as the loop's does (mixed precision is the trainer's forwards only). It needs tensordict and
omegaconf (the trainer and the rank group import them) and peft (LoRA).

Each variant (``--variants``: ``lora`` and ``full`` fine-tuning) runs ``--warmup`` + ``--iterations``
iterations and prints, over the timed ones: generation and training tokens/s, peak GPU memory
(``torch.cuda.max_memory_allocated``; host RSS high-water on the CPU) and MFU against
``--peak-tflops`` (H200 dense bf16: 989). FLOPs count the weight matmuls only (attention's
sequence-squared terms and the log-softmax are left out): generation 2N per generated token;
training per token (every position of prompt + response) 2N forward, 2N backward through the
activations, and 2N_trainable for the weight gradients, i.e. 6N for full fine-tuning and
4N + 2N_lora with LoRA (the frozen base's weight gradients are never computed). N counts the
tied embedding once (as the output layer's matmul; the input lookup is free). The last line of
each variant is ``GPU_CHECK {json}`` for scripts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, rms_norm_eps=1e-6)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (gloo) instead of cuda:0 (NCCL)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 model and a small batch")
    ap.add_argument("--variants", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--iterations", type=int, default=3, help="timed sync iterations per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations first (CUDA kernels, allocator)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8, help="completions per prompt")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128, help="every completion is exactly this long")
    ap.add_argument("--minibatches", type=int, default=2, help="optimizer steps per rollout batch")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--vocab", type=int, help="the model's vocabulary size (default: 151936, tiny 1024)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--mixed-precision", default="bf16", choices=["bf16", "no"])
    ap.add_argument("--peak-tflops", type=float, help="the device's dense peak for MFU (default: 989 on cuda, "
                                                      "none on the CPU)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.tiny:
        for name, value in (("prompts", 2), ("group", 4), ("prompt_tokens", 8), ("new_tokens", 8), ("accum", 2)):
            if getattr(a, name) == ap.get_default(name):
                setattr(a, name, value)
    batch = a.prompts * a.group
    if batch % a.minibatches or (batch // a.minibatches) % a.accum:
        ap.error(f"--prompts x --group = {batch} must split into --minibatches={a.minibatches} of "
                 f"--accum={a.accum} micro-batches")
    if a.peak_tflops is None and not a.cpu:
        a.peak_tflops = 989.0
    return a


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "tensordict", "omegaconf", "peft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "missing"
    return out


def build_policy(spec: dict, tokenizer, device, seed: int):
    """A randomly initialised Qwen2 of shape ``spec``, fp32 (the master weights under autocast),
    built directly on ``device`` (initialising 0.5B parameters on the host takes a while)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpo_utils.models.loading import prepare_policy

    torch.manual_seed(seed)
    config = Qwen2Config(**spec, tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with device:
        model = Qwen2ForCausalLM(config)
    return prepare_policy(model.float(), tokenizer, device)


def trainer_class(mixed_precision: str, device_type: str):
    """``ShardedTrainer``; where the trainer has no ``train.mixed_precision`` of its own yet (no
    ``autocast`` method), a subclass that autocasts its forwards the same way: the policy's
    forward in bf16, log-probs and the loss in fp32, weights and optimizer state fp32."""
    import torch

    from grpo_utils.train.sharded import ShardedTrainer

    if mixed_precision == "no" or hasattr(ShardedTrainer, "autocast"):
        return ShardedTrainer, "trainer" if mixed_precision != "no" else "off"

    class AutocastShardedTrainer(ShardedTrainer):
        def _log_probs(self, model, mb, with_entropy):
            with torch.autocast(device_type, dtype=torch.bfloat16):
                return super()._log_probs(model, mb, with_entropy)

        def annotate(self, batch, need_behaviour, micro_batch_size):
            with torch.autocast(device_type, dtype=torch.bfloat16):
                super().annotate(batch, need_behaviour, micro_batch_size)

    return AutocastShardedTrainer, "bench autocast (the trainer has no train.mixed_precision yet)"


def rewards_of(response):
    """A stand-in verifier: the fraction of even token ids (varies within groups, so the
    advantages and the loss are not zero)."""
    return (response % 2 == 0).float().mean(dim=1)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run_variant(variant: str, a: argparse.Namespace, device, tokenizer, spec: dict) -> dict:
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf
    from tensordict import TensorDict

    from grpo_utils.algo.advantages import group_advantages
    from grpo_utils.algo.losses import ClippedSurrogateLoss
    from grpo_utils.distributed.ranks import RankGroup

    reset_peak(device)
    policy = build_policy(spec, tokenizer, device, a.seed)
    n_base = sum(p.numel() for p in policy.parameters())
    if variant == "lora":
        from grpo_utils.models.lora import apply_lora

        policy = apply_lora(policy, {"r": a.lora_r, "alpha": 2.0 * a.lora_r, "dropout": 0.0,
                                     "target_modules": LORA_TARGETS})
    n_total = sum(p.numel() for p in policy.parameters())
    n_trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    # Weight-gradient FLOPs only for what trains: see the module docstring.
    train_flops_per_token = 4 * n_total + 2 * n_trainable

    # The one-rank process group ShardedTrainer shards over (a store in memory: no port needed).
    backend = "nccl" if device.type == "cuda" else "gloo"
    extra = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(minutes=5), **extra)
    group = RankGroup(0, 1, 0, device)
    batch_size = a.prompts * a.group
    cfg = OmegaConf.create({"lr": 1e-5 if variant == "full" else 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.999],
                            "adam_eps": 1e-8, "max_grad_norm": 1.0, "warmup_steps": 1, "max_steps": 1000,
                            "min_lr_ratio": 0.1, "grad_accum_steps": a.accum,
                            "optim_batch_size": batch_size // a.minibatches, "epochs": 1,
                            "mixed_precision": a.mixed_precision})
    cls, precision_path = trainer_class(a.mixed_precision, device.type)
    trainer = cls(policy, ClippedSurrogateLoss(aggregation="token_mean"), cfg, 1.0, group)
    watched = [p for p in trainer.policy.parameters() if p.requires_grad][-1]
    before = watched.detach().clone()

    g = torch.Generator().manual_seed(a.seed)
    prompts = torch.randint(1, 257, (a.prompts, a.prompt_tokens), generator=g)  # byte tokens
    prompt_ids = prompts.repeat_interleave(a.group, dim=0).to(device)
    prompt_mask = torch.ones_like(prompt_ids)
    micro = batch_size // a.minibatches // a.accum
    timed = {"generate_s": [], "annotate_s": [], "train_s": [], "publish_s": []}
    gen_peak = train_peak = 0
    losses = []
    for it in range(a.warmup + a.iterations):
        times = {}
        # --- rollout: the transformers backend samples with generate on the full policy
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = trainer.policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
                                          temperature=1.0, top_k=None, top_p=1.0, max_new_tokens=a.new_tokens,
                                          min_new_tokens=a.new_tokens)
        sync(device)
        times["generate_s"] = time.perf_counter() - t0
        gen_peak = max(gen_peak, peak_memory(device))
        response = out[:, a.prompt_tokens:]
        assert response.shape[1] == a.new_tokens, response.shape
        rewards = rewards_of(response).cpu()
        batch = TensorDict({"input_ids": out, "attention_mask": torch.ones_like(out),
                            "response_mask": torch.ones_like(response, dtype=torch.bool),
                            "advantage": group_advantages(rewards, a.group).to(device)}, batch_size=[batch_size])
        # --- training: behaviour log-probs, then one optimizer step per mini-batch
        reset_peak(device)
        t0 = time.perf_counter()
        trainer.annotate(batch, need_behaviour=True, micro_batch_size=micro)
        sync(device)
        times["annotate_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for minibatch in batch.split(batch_size // a.minibatches):
            metrics = trainer.optimizer_step(minibatch)
            losses.append(metrics["loss"])
        sync(device)
        times["train_s"] = time.perf_counter() - t0
        train_peak = max(train_peak, peak_memory(device))
        t0 = time.perf_counter()
        trainer.publish()  # the trained weights into the policy that generates next
        sync(device)
        times["publish_s"] = time.perf_counter() - t0
        if it >= a.warmup:
            for k, v in times.items():
                timed[k].append(v)
        print(f"  {variant} iteration {it}{' (warm-up)' if it < a.warmup else ''}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in times.items()) + f", loss {metrics['loss']:.4f}", flush=True)
    changed = (watched.detach() - before).abs().max().item()
    trainer.close()  # leaves the process group

    med = {k: statistics.median(v) for k, v in timed.items()}
    gen_tokens = batch_size * a.new_tokens
    train_tokens = batch_size * (a.prompt_tokens + a.new_tokens)
    peak = a.peak_tflops * 1e12 if a.peak_tflops else None
    result = {
        "variant": variant, "device": str(device), "precision": a.mixed_precision, "precision_path": precision_path,
        "params": n_total, "params_base": n_base, "params_trainable": n_trainable,
        "sequences": batch_size, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
        "steps_per_iteration": a.minibatches,
        "optimizer_steps": len(losses), "loss_finite": all(math.isfinite(x) for x in losses),
        "policy_changed": changed > 0, **{k: round(v, 4) for k, v in med.items()},
        "gen_tokens_per_s": gen_tokens / med["generate_s"],
        "train_tokens_per_s": train_tokens / med["train_s"],
        "train_flops_per_token": train_flops_per_token,
        "gen_mfu": 2 * n_total * gen_tokens / med["generate_s"] / peak if peak else None,
        "train_mfu": train_flops_per_token * train_tokens / med["train_s"] / peak if peak else None,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "host RSS high-water",
        "gen_peak_memory_gib": gen_peak / 2**30, "train_peak_memory_gib": train_peak / 2**30,
        # what a bare GPU image lacks must stay unimported: this path runs without it
        "heavy_imports": [m for m in ("torchrl", "ray", "vllm", "hydra") if m in sys.modules],
    }
    return result


def mfu(x: float | None) -> str:
    return "n/a (no --peak-tflops)" if x is None else f"{100 * x:.1f}%"


def report(r: dict) -> None:
    print(f"{r['variant']}: {r['params'] / 1e6:.1f}M parameters, {r['params_trainable'] / 1e6:.2f}M trained; "
          f"{r['sequences']} sequences x ({r['prompt_tokens']} + {r['new_tokens']}) tokens; precision "
          f"{r['precision']} ({r['precision_path']}); {r['optimizer_steps']} optimizer steps")
    print(f"  generation: {r['gen_tokens_per_s']:.0f} tokens/s ({r['generate_s']:.2f} s), MFU {mfu(r['gen_mfu'])}, "
          f"peak memory {r['gen_peak_memory_gib']:.2f} GiB ({r['peak_memory_kind']})")
    print(f"  training: {r['train_tokens_per_s']:.0f} tokens/s ({r['train_s']:.2f} s for "
          f"{r['steps_per_iteration']} optimizer steps; annotate {r['annotate_s']:.2f} s, "
          f"publish {r['publish_s']:.3f} s), MFU {mfu(r['train_mfu'])} at "
          f"{r['train_flops_per_token'] / r['params']:.2f} x N FLOPs/token, peak memory "
          f"{r['train_peak_memory_gib']:.2f} GiB")
    print("GPU_CHECK " + json.dumps(r), flush=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch
    import transformers

    from grpo_utils.models.tiny import build_tokenizer

    transformers.utils.logging.disable_progress_bar()
    if a.cpu:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --cpu for a dry run)", file=sys.stderr)
            return 2
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    spec = dict(TINY if a.tiny else QWEN25_05B)
    if a.vocab:
        spec["vocab_size"] = a.vocab
    print("gpu_check: " + json.dumps(versions()) + f"; device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    tokenizer = build_tokenizer()
    failed = 0
    for variant in a.variants:
        try:
            report(run_variant(variant, a, device, tokenizer, spec))
        except Exception as e:  # one variant failing (e.g. out of memory) still reports the others
            import traceback

            traceback.print_exc()
            first = (str(e).splitlines() or [""])[0]
            print(f"gpu_check: variant {variant} failed: {type(e).__name__}: {first}", flush=True)
            failed += 1
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
