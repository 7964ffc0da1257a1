"""Rollout generation with ``inference_model.backend=vllm``: framework tax and speed-up.

    python bench/vllm_rollout.py                     # tiny and ~20M models, 8 prompts x 8 x 32 tokens
    python bench/vllm_rollout.py --rounds 7 --tokens 64

For the same prompts, sampling settings and per-request seeds, three ways of generating one
step's P x G completions, in alternating rounds so machine noise hits all three:

* ``bare``: ``vllm.LLM.generate`` on token prompts (what a hand-written loop would call);
* ``framework``: the rollout's generation step with the vLLM backend (``GroupRollout.generate``:
  prompt rendering/tokenizing cache, left padding, the engine call, dense response and log-prob
  tensors);
* ``transformers``: the same step with the default backend (TorchRL's ``TransformersWrapper``).

Every completion is exactly ``--tokens`` long (min = max new tokens), so tokens/s compare equal
work. Target: framework / bare <= 1.10.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

MODELS = {"tiny": dict(hidden_size=64, num_layers=2, num_heads=1),
          "20M": dict(hidden_size=512, num_layers=6, num_heads=8)}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_model(name: str, a: argparse.Namespace, workdir: Path) -> dict[str, float]:
    import vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_utils.data.datasets import quickstart_rows
    from grpo_utils.data.prompts import PromptRenderer, PromptStream
    from grpo_utils.inference.transformers import generation_kwargs
    from grpo_utils.inference.vllm_engine import VLLMGenerator, VLLMSettings, request_seed
    from grpo_utils.models.tiny import save_tiny
    from grpo_utils.rewards import RewardFunction
    from grpo_utils.rollout.group import GroupRollout

    path = save_tiny(workdir / name, **MODELS[name])
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    params = sum(p.numel() for p in model.parameters())
    gen = OmegaConf.create({"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": a.tokens,
                            "min_new_tokens": a.tokens})
    engine = VLLMGenerator(str(path), VLLMSettings(max_model_len=256, cpu_kv_cache_gib=1), gen, [tok.eos_token_id],
                           tok.pad_token_id, seed=0, device=torch.device("cpu"))
    renderer = PromptRenderer(tok, "{question}", None, True)

    def rollout(generator=None) -> GroupRollout:
        return GroupRollout(model, tok, renderer, RewardFunction("numeric_answer"), generation_kwargs(gen), a.group,
                            PromptStream(quickstart_rows(64, seed=1), a.prompts, seed=0), generator=generator)

    with_vllm, with_hf = rollout(engine), rollout()
    rows = [row for row in with_vllm.stream.next_batch() for _ in range(a.group)]
    token_prompts = [vllm.inputs.TokensPrompt(prompt_token_ids=tok(renderer(row), add_special_tokens=False)
                                              ["input_ids"]) for row in rows]
    key = (0, 0)
    sampling = [vllm.SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=a.tokens, min_tokens=a.tokens,
                                    logprobs=0, stop_token_ids=[tok.eos_token_id], seed=request_seed(0, key, i),
                                    skip_clone=True)
                for i in range(len(rows))]
    runs = {
        "bare": lambda: engine.llm.generate(token_prompts, sampling, use_tqdm=False),
        "framework": lambda: with_vllm.generate(rows, key),
        "transformers": lambda: with_hf.generate(rows, key),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up: caches, first-call allocations
        fn()
    for _ in range(a.rounds):
        for k, fn in runs.items():
            times[k].append(statistics.median(timed(fn) for _ in range(a.repeats)))
    engine.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = len(rows) * a.tokens
    return {"params_M": params / 1e6, **{f"{k}_s": v for k, v in med.items()},
            "tax": med["framework"] / med["bare"],
            "vllm_tok_s": tokens / med["framework"], "hf_tok_s": tokens / med["transformers"],
            "speedup": med["transformers"] / med["framework"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="calls per round (their median is the round's time)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    a = ap.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    torch.set_num_threads(a.threads)
    print(f"{a.prompts} prompts x {a.group} completions x {a.tokens} tokens, {a.threads} threads, "
          f"medians of {a.rounds} rounds x {a.repeats} calls")
    print("| model | params | bare vLLM | framework (vllm) | tax | transformers | vLLM tok/s | HF tok/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            r = bench_model(name, a, Path(tmp))
            print(f"| {name} | {r['params_M']:.1f}M | {r['bare_s'] * 1e3:.0f} ms | {r['framework_s'] * 1e3:.0f} ms | "
                  f"{r['tax']:.3f} | {r['transformers_s'] * 1e3:.0f} ms | {r['vllm_tok_s']:.0f} | "
                  f"{r['hf_tok_s']:.0f} | {r['speedup']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
