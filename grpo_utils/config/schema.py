"""The config schema: every key's type, default and one-line doc, in one place.

Registered with Hydra's ConfigStore (:func:`register_schema`), so the YAML files under ``config/``
only set what differs from these defaults (the quick start's) and Hydra checks types on merge.
The swappable parts (``mode``, ``loss``, ``logger``) are groups whose options extend the
dataclasses stored for them here; ``reward`` is checked by the reward registry.

    python -m grpo_utils.config            # every key with its type, default and doc
"""

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any


def key(default: Any, doc: str, range: str | None = None, finite: bool = True, only_if: str | None = None) -> Any:
    """A schema field: ``default``, its one-line ``doc`` and what ``config.validate`` checks of it
    generically (:func:`grpo_utils.config.validate.check_schema_values`), so each key's range is
    declared once, here:

    - ``range``: ``"> 0"``, ``">= 1"``, ``"<= 10"`` or an interval ``"in (0, 1]"`` (a note may
      follow in parentheses: ``">= 0 (0 = never)"``); a null value passes when the default is null;
    - ``finite``: a float must be finite (every float key is, unless declared otherwise);
    - ``only_if``: ``"<key>=<value>"``: the key has no effect otherwise, so a value other than
      its default is refused there (one line saying why) instead of being ignored.
    """
    meta = {"doc": doc, "range": range, "finite": finite, "only_if": only_if}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": doc})


#: The ``reward:`` section's whole-reward settings (grpo_utils.rewards.function checks them): a
#: per-sample deadline, a warning when more than this share of a step's samples fail, a stop after
#: this many steps in a row where every sample fails (0: never), and the largest |score| accepted.
REWARD_DEFAULTS = {"name": None, "timeout_s": 10, "warn_failure_fraction": 0.5, "stop_after_failed_steps": 3,
                   "max_abs_score": 1e6}


# ----------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    name: str = key("builtin:quickstart", "HF hub name or local dir; builtin:quickstart builds a tiny "
                    "warm-started Qwen2 once")
    dtype: str = key("float32", "float32 | bfloat16 | float16: the precision the model is loaded in")


@dataclass
class LoraConfig:
    enabled: bool = key(False, "train low-rank adapters (PEFT LoRA) instead of all weights; the reference is the "
                        "base with adapters off, generators and checkpoints get the merged weights")
    r: int = key(8, "adapter rank", range=">= 1", only_if="train_model.lora.enabled=true")
    alpha: float = key(16.0, "adapter scale numerator: the update is B @ A * alpha / r",
                       range="> 0", only_if="train_model.lora.enabled=true")
    dropout: float = key(0.0, "dropout on the adapters' input while training, in [0, 1)",
                         range="in [0, 1)", only_if="train_model.lora.enabled=true")
    target_modules: Any = key(["q_proj", "k_proj", "v_proj", "o_proj"],
                              "names of the linear layers that get adapters, or all-linear (all but the output "
                              "layer)", only_if="train_model.lora.enabled=true")


@dataclass
class TrainModelConfig:
    num_devices: int = key(1, "trainer ranks (FSDP2, one device each: GPUs from the `device`'s index, or "
                           "CPU processes with device=cpu); rank 0 runs the loop", range=">= 1")
    num_nodes: int = key(1, "nodes the trainer ranks span (num_devices / num_nodes ranks per node); the other "
                         "nodes join with python -m grpo_utils.distributed.join (see slurm/)")
    rendezvous: str | None = key(None, "HOST:PORT where rank 0 meets the other ranks; null: a free local port "
                                 "(required with num_nodes > 1)")
    timeout_s: float = key(1800.0, "longest a trainer rank waits for the others (rank 0's rollouts and "
                           "evaluations included) before the run stops", range="> 0")
    fsdp_param_dtype: str | None = key(None, "FSDP2 mixed-precision policy with num_devices > 1: bfloat16 all-gathers "
                                        "parameters in bf16 (half the traffic and unsharded memory; gradients "
                                        "reduced in fp32); null: the parameters' own dtype")
    gradient_checkpointing: bool = key(False, "recompute activations in backward to save memory")
    lora: LoraConfig = section(LoraConfig, "LoRA: train adapters only (PEFT)")


@dataclass
class RefModelConfig:
    path: str | None = key(None, "model directory or hub name loaded (in model.dtype) as the frozen reference; "
                           "same vocabulary as the policy; null: a copy of the initial policy")
    num_devices: int = key(0, "devices of its own for the frozen reference (used when loss.kl_coef > 0): "
                           "0: on the trainer's device; 1: the next GPU after the trainer's and inference's",
                           range=">= 0")
    device: str | None = key(None, "where the reference lives (cpu, cuda:N), instead of ref_model.num_devices; "
                             "null: decided by ref_model.num_devices")


@dataclass
class InferenceModelConfig:
    backend: str = key("transformers", "transformers (HF generate through TorchRL's TransformersWrapper) | vllm "
                       "(an in-process vLLM engine; pip install -e '.[vllm]')")
    num_devices: float = key(0, "GPUs for generation in all (Ray modes), split over mode.num_collectors (vllm: "
                             "one replica of tensor_parallel_size GPUs per collector; transformers: fractions "
                             "share a GPU); 0: collectors on CPU, or locally on the trainer's device", range=">= 0")
    tensor_parallel_size: int = key(1, "vllm: GPUs per replica (tensor parallel)",
                                    range=">= 1", only_if="inference_model.backend=vllm")
    dtype: str | None = key(None, "vllm: float32 | bfloat16 | float16; null: model.dtype",
                            only_if="inference_model.backend=vllm")
    max_model_len: int | None = key(None, "vllm: context length the engine reserves KV for; null: the model's",
                                    range=">= 1", only_if="inference_model.backend=vllm")
    gpu_memory_utilization: float | None = key(None, "vllm: fraction of the GPU the engine may take; null: 0.3 "
                                                  "sharing the trainer's GPU, 0.6 on a collector's own "
                                                  "(the collector's copy of the policy is there too)",
                                               range="in (0, 1]", only_if="inference_model.backend=vllm")
    enable_prefix_caching: bool = key(True, "vllm: reuse the KV of shared prefixes (the G repeats of a prompt); "
                                      "reset on every weight sync", only_if="inference_model.backend=vllm")
    enforce_eager: bool | None = key(None, "vllm: no CUDA graphs; null: true on CPU, false on GPU",
                                     only_if="inference_model.backend=vllm")
    cpu_kv_cache_gib: float = key(1.0, "vllm on CPU: GiB reserved for the KV cache (VLLM_CPU_KVCACHE_SPACE)",
                                  range="> 0", only_if="inference_model.backend=vllm")
    sleep: bool | None = key(None, "vllm: free the engine's GPU memory while the trainer trains; null: on when "
                                "it shares the trainer's GPU (needs a GPU)", only_if="inference_model.backend=vllm")
    probe_every: int = key(1, "vllm: after every N-th weight sync, score a fixed sequence in vLLM and the trainer "
                           "(weight_sync/probe_max_abs_diff); 0: never",
                           range=">= 0 (0: never)", only_if="inference_model.backend=vllm")
    probe_tolerance: float | None = key(None, "vllm: stop the run when the probe differs by more; null: 1e-3 "
                                           "in float32, 0.1 in bf16/fp16",
                                        range="> 0", only_if="inference_model.backend=vllm")


@dataclass
class OptimizerConfig:
    name: str = key("AdamW", "AdamW (decoupled weight decay; biases and norms not decayed)")
    lr: float = key(2.0e-3, "peak learning rate", range="in (0, 1]")
    weight_decay: float = key(0.0, "decoupled weight decay", range="in [0, 100]")
    betas: list[float] = key([0.9, 0.99], "AdamW betas")
    eps: float = key(1.0e-8, "AdamW epsilon", range="in (0, 1)")
    clip_grad_norm: float = key(1.0, "gradient clipping by global norm", range="> 0")
    warmup_steps: int = key(5, "linear warmup steps, then cosine decay", range=">= 0")
    min_lr_ratio: float = key(0.1, "final LR as a fraction of the peak", range="in [0, 1]")


# ------------------------------------------------------------------------------------------ data
@dataclass
class QuickstartDataConfig:
    num_train: int = key(5000, "generated training prompts (quickstart)",
                         range=">= 1", only_if="env.dataset=quickstart")
    num_test: int = key(200, "generated held-out prompts, never seen in training (quickstart)",
                        range=">= 1", only_if="env.dataset=quickstart")


@dataclass
class CountdownDataConfig:
    num_train: int = key(10000, "generated training problems (countdown)",
                         range=">= 1", only_if="env.dataset=countdown")
    num_test: int = key(200, "generated held-out problems, never in training (countdown)",
                        range=">= 1", only_if="env.dataset=countdown")
    seed: int = key(0, "generation seed (countdown)", only_if="env.dataset=countdown")
    min_numbers: int = key(3, "fewest numbers per problem (countdown)", only_if="env.dataset=countdown")
    max_numbers: int = key(4, "most numbers per problem (countdown)", only_if="env.dataset=countdown")
    max_number: int = key(99, "numbers are drawn from 1..max_number (countdown)",
                          range=">= 1", only_if="env.dataset=countdown")
    max_target: int = key(999, "targets are integers in 1..max_target (countdown)",
                          range=">= 1", only_if="env.dataset=countdown")


@dataclass
class DataConfig:
    """The data keys shared by training and ``grpo-eval.py``."""

    dataset: str = key("quickstart", "quickstart | gsm8k | math | ifeval | countdown | jsonl | dialogue | the "
                       "dotted path of your own function (split, env) -> rows")
    train_path: str | None = key(None, "training JSONL (file datasets)")
    test_path: str | None = key(None, "held-out JSONL (file datasets); null: hold out part of train_path")
    heldout_fraction: float = key(0.0, "without test_path: fraction of train_path held out (fixed draw, removed "
                                  "from training)", range="in [0, 1)")
    heldout_count: int = key(0, "without test_path: rows of train_path held out (wins over heldout_fraction)",
                             range=">= 0")
    skip_bad_rows: bool = key(False, "true: skip and count malformed rows; false: stop at the first, naming "
                              "file:line")
    prompt_field: str = key("question", "jsonl: the field holding the prompt")
    answer_field: str | None = key("answer", "jsonl: the field holding the reference answer")
    prompt_format: str = key("{question}", "Python format string over the row's fields: the user content")
    system_prompt: str | None = key(None, "chat: system message; r1_zero: replaces the reasoning instruction; "
                                    "dialogue: first line of the system message (every template)")
    chat_template: bool = key(True, "when template is null: render with the tokenizer's chat template")
    template: str | None = key(None, "plain | chat | r1_zero (<think>/<answer>); null: chat when "
                                  "chat_template is true, else plain")
    quickstart: QuickstartDataConfig = section(QuickstartDataConfig, "the generated quick-start task")
    countdown: CountdownDataConfig = section(CountdownDataConfig, "the generated countdown task")


@dataclass
class EnvConfig(DataConfig):
    num_prompts: int = key(8, "prompts per rollout batch (P)", range=">= 1")
    group_size: int = key(8, "completions per prompt (G): the group for relative advantages",
                          range=">= 2 (advantages are relative to the group)")
    shuffle: bool = key(True, "reshuffle the training rows every pass")


# --------------------------------------------------------------------------------------- rollout
@dataclass
class RolloutConfig:
    _target_: str = key("grpo_utils.rollout.group.GroupRollout", "the rollout engine's class (group rollout=: "
                        "direct = one batched TransformersWrapper call | collector = TorchRL LLMCollector)")


@dataclass
class SamplingConfig:
    """The sampling keys shared by training and ``grpo-eval.py``."""

    max_new_tokens: int = key(4, "completion budget; longer completions are truncated", range=">= 1")
    temperature: float = key(1.0, "sampling temperature (in training the loss uses the same one)", range="in (0, 100]")
    top_p: float = key(1.0, "nucleus sampling threshold", range="in (0, 1]")
    top_k: int = key(0, "0 = unrestricted", range=">= 0 (0 = unrestricted)")


@dataclass
class GenerationConfig(SamplingConfig):
    min_new_tokens: int = key(0, "force at least this many tokens (benchmarks use it for fixed lengths)")


# ------------------------------------------------------------------------------------- algorithm
@dataclass
class AdvantageConfig:
    estimator: str = key("grpo", "grpo (group-mean baseline) | rloo (leave-one-out) | none (raw reward)")
    scale: str = key("group_std", "group_std | batch_std | none: the advantage divisor")
    eps: float = key(1.0e-6, "added to the std before dividing", range="< 1")


@dataclass
class ShapingConfig:
    dynamic_sampling: bool = key(False, "keep only groups whose rewards differ, resampling to refill (DAPO)")
    max_resample_rounds: int = key(0, "extra generation rounds per step to refill after dynamic sampling",
                                   only_if="shaping.dynamic_sampling=true")
    overlong_mask: bool = key(False, "overlong filtering: truncated completions are left out of the loss")
    overlong_penalty: float = key(0.0, "soft overlong punishment factor added to the reward (0 = off)", range="<= 1000")
    overlong_cache_len: int | None = key(None, "its interval L_cache in tokens; null: max_new_tokens // 5")


@dataclass
class TrainConfig:
    max_steps: int = key(60, "optimizer steps", range=">= 1")
    epochs: int = key(1, "passes over each rollout batch (> 1: later passes are off-policy)", range=">= 1")
    optim_batch_size: int = key(64, "sequences per optimizer step; must divide num_prompts * group_size")
    grad_accum_steps: int = key(1, "micro-batches per optimizer step (exact accumulation)")
    packing: bool = key(False, "forwards on sequences packed end to end (no padding; the same log-probs to float "
                        "noise): faster when completion lengths differ")
    max_tokens_per_micro_batch: int | None = key(None, "micro-batches by token count instead of grad_accum_steps "
                                                 "equal parts: sequences of similar length, at most this many "
                                                 "tokens each (packed: their sum; padded: count x longest)",
                                                 range=">= 1")
    mixed_precision: str = key("no", "no | bf16 | fp16: autocast the trainer's forwards (fp32 weights, gradients "
                               "and optimizer state; fp16 adds loss scaling); needs model.dtype=float32")


@dataclass
class CheckpointConfig:
    every_n_steps: int = key(30, "save checkpoints/step_<N>/ at the end of the batch reaching a multiple; "
                             "0 = final only", range=">= 0")
    keep_last: int | None = key(2, "keep only the newest N checkpoints (null keeps all)")
    layout: str = key("run_dir", "run_dir: checkpoints/step_<N>/ | hf: checkpoint-<N>/ in the run dir (as "
                      "transformers' Trainer names them); resume finds either")


@dataclass
class EvalConfig:
    heldout_size: int = key(200, "held-out rows to evaluate (0 = all)", range=">= 0")
    before_after: bool = key(True, "greedy held-out accuracy before and after training (in summary.json)")
    every_n_steps: int = key(20, "also evaluate every N steps into metrics.jsonl (0 = never)", range=">= 0")
    batch_size: int = key(100, "sequences per generate call", range=">= 1")
    k: int = key(0, "samples per held-out prompt for pass@k / maj@k / mean@k (0 = greedy accuracy only)")
    temperature: float = key("${generation.temperature}", "sampling temperature of those k samples",
                             range="in (0, 100]")


# -------------------------------------------------------------------------- groups: mode, logger
@dataclass
class RayModeConfig:
    collector_cpus: float = key(1, "Ray CPUs reserved per collector actor (fractions allowed, e.g. 0.5)")
    trainer_cpus: int = key(1, "cores kept for the trainer (this process); collectors + trainer must fit")
    cluster_cpus: int | None = key(None, "CPUs the machine offers; null: os.cpu_count()")
    actor_timeout_s: float = key(120.0, "longest wait for a batch or an actor; a dead or silent collector "
                                 "stops the run", range="> 0")
    weight_sync: str = key("object_store", "object_store: weights through Ray's object store | collective: "
                           "torch.distributed broadcast (gloo on CPU, NCCL on GPU) | the dotted path of your own "
                           "WeightSync subclass")
    max_restarts: int = key(0, "restart collector actors that die up to this many times in all, each "
                            "continuing its prompt stream (object_store only)")
    ray_address: str | None = key(None, "null: start a local Ray cluster sized to this config | auto or "
                                     "host:port: join a running cluster")


@dataclass
class SyncModeConfig(RayModeConfig):
    name: str = key("sync", "checked by the recipe: grpo-sync.py runs mode=sync")
    ray: bool = key(False, "true: generate in a Ray collector actor holding its own copy of the policy")
    sync_iter: bool = key(True, "(ray) true: each batch from the newest weights (age 0); false: the next "
                          "batch is generated while training on this one (age <= 1)")


@dataclass
class AsyncModeConfig(RayModeConfig):
    name: str = key("async", "checked by the recipe: grpo-async.py runs mode=async")
    num_collectors: int | None = key(None, "collector actors, each holding its own copy of the policy; null: one "
                                     "per inference replica (inference_model.num_devices / tensor_parallel_size), "
                                     "at least 1")
    max_staleness: int = key(1, "drop samples generated more than this many policy versions ago")
    weight_update_frequency: int = key(1, "push weights to the collectors every N optimizer steps (at a batch "
                                       "boundary)")
    buffer_size: int = key(2, "rollout batches the queue holds before the collectors block")
    in_flight_updates: bool = key(False, "vLLM collectors take new weights between chunks of a generation "
                                  "instead of between batches: requests continue under the new policy (each "
                                  "token records the version that sampled it)")
    in_flight_chunk_tokens: int = key(16, "tokens generated per chunk with mode.in_flight_updates (a weight update "
                                      "waits at most one chunk)", range=">= 1",
                                      only_if="mode.in_flight_updates=true")


@dataclass
class LoggerConfig:
    _target_: str = key("grpo_utils.train.metrics.MetricsLogger", "the metrics logger class")
    backend: str = key("none", "none | wandb (metrics.jsonl and the progress bar either way)")
    project: str = key("grpo", "wandb project (backend=wandb)")
    run_name: str | None = key(None, "wandb run name; null lets wandb choose")
    log_every: int = key(1, "write a training line (metrics.jsonl, wandb) every N optimizer steps, and the last",
                         range=">= 1")


# --------------------------------------------------------------------------------------- the run
@dataclass
class GRPOConfig:
    seed: int = key(0, "seeds python, numpy and torch (sampling, data order, mini-batches)")
    resume: Any = key(False, "true: continue from the run dir's latest checkpoint (none yet: start fresh, with a "
                      "warning); must: the same, but refuse to start fresh; or a checkpoint path")
    device: str = key("auto", "auto (cuda when available) | cpu | cuda | cuda:N")
    num_threads: int = key(0, "torch CPU threads; 0 keeps torch's default", range=">= 0")
    mode: Any = key(None, "group: sync | async (config/mode/)")
    loss: Any = key(None, "group: the loss preset (config/loss/); its class is loss._target_")
    logger: Any = key(None, "group: none | wandb (config/logger/)")
    model: ModelConfig = section(ModelConfig, "the policy")
    train_model: TrainModelConfig = section(TrainModelConfig, "where and how the policy trains")
    ref_model: RefModelConfig = section(RefModelConfig, "the frozen KL reference: what it is and where it lives")
    inference_model: InferenceModelConfig = section(InferenceModelConfig, "where completions are generated")
    optimizer: OptimizerConfig = section(OptimizerConfig, "optimizer and LR schedule")
    env: EnvConfig = section(EnvConfig, "prompts: dataset, template, batch shape")
    rollout: Any = key(None, "group: direct | collector (config/rollout/): the engine that generates completions")
    generation: GenerationConfig = section(GenerationConfig, "sampling settings")
    reward: Any = key(dict(REWARD_DEFAULTS),
                      "name: a reward (null: the dataset's own) and its options, or components: a weighted sum; "
                      "timeout_s, warn_failure_fraction, stop_after_failed_steps, max_abs_score: see README Rewards")
    advantage: AdvantageConfig = section(AdvantageConfig, "group-relative advantage (set by the loss preset)")
    shaping: ShapingConfig = section(ShapingConfig, "rollout shaping before advantages (DAPO; set by the preset)")
    train: TrainConfig = section(TrainConfig, "optimizer steps per batch")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoints/step_<N>/")
    eval: EvalConfig = section(EvalConfig, "held-out evaluation during training")


# -------------------------------------------------------------------------------- grpo-eval.py
@dataclass
class EvalSettingsConfig:
    split: str = key("test", "test (held-out) | train")
    k: int = key(8, "samples per prompt for pass@1..pass@k, maj@k, mean@k; 0 = greedy only", range=">= 0")
    greedy: bool = key(True, "also measure greedy accuracy")
    max_prompts: int = key(0, "evaluate only the first N prompts of the split (0 = all)", range=">= 0")
    batch_size: int = key(64, "sequences per generate call", range=">= 1")
    sample_seed: int | None = key(0, "seed of the k samples (null: continue from the global seed)")
    report_path: str | None = key(None, "JSON report; null = <hydra run dir>/eval_report.json")
    samples_path: str | None = key(None, "also write each prompt's completions, answers and scores as JSONL")


@dataclass
class EvalRunConfig:
    """``grpo-eval.py``: the data, model, sampling and reward sections mean what they mean in training."""

    seed: int = key(0, "seeds python, numpy and torch before evaluation")
    device: str = key("auto", "auto (cuda when available) | cpu | cuda | cuda:N")
    num_threads: int = key(0, "torch CPU threads; 0 keeps torch's default")
    model: ModelConfig = section(ModelConfig, "a model dir, checkpoints/step_<N>, a run dir (its latest "
                                 "checkpoint), a hub name, or builtin:quickstart")
    env: DataConfig = section(DataConfig, "the dataset and its template")
    generation: SamplingConfig = section(SamplingConfig, "sampling of the k samples (greedy ignores it)")
    reward: Any = key(dict(REWARD_DEFAULTS),
                      "the reward that judges correctness (null: the dataset's own); options with +reward.<option>")
    eval: EvalSettingsConfig = section(EvalSettingsConfig, "what to measure and where to write it")


def register_schema() -> None:
    """Store the schema in Hydra's ConfigStore: ``grpo_schema`` (the base of every training
    config), ``mode/{sync,async}_schema``, ``logger/logger_schema``."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="grpo_schema", node=GRPOConfig)
    cs.store(name="grpo_eval_schema", node=EvalRunConfig)
    cs.store(group="mode", name="sync_schema", node=SyncModeConfig)
    cs.store(group="mode", name="async_schema", node=AsyncModeConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    cs.store(group="rollout", name="rollout_schema", node=RolloutConfig)
    from grpo_utils.algo import losses

    for name, cls in (("_clipped", losses.ClippedSurrogateLoss), ("_policy_gradient", losses.PolicyGradientLoss),
                      ("_gspo", losses.GSPOLoss), ("_cispo", losses.CISPOLoss)):
        cs.store(group="loss", name=name, node=loss_schema(cls))


def loss_schema(cls: type) -> type:
    """A dataclass of a loss class's constructor arguments (their types and defaults) plus its
    ``_target_``: the loss keys are defined once, by the class."""
    import inspect
    import typing

    fields: dict[str, tuple] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or not hasattr(klass, "config_keys"):
            continue
        hints = typing.get_type_hints(init)
        for name, param in inspect.signature(init).parameters.items():
            if name == "self" or param.kind is param.VAR_KEYWORD:
                continue
            fields[name] = (name, hints.get(name, Any), field(default=param.default))
    target = ("_target_", str, field(default=f"{cls.__module__}.{cls.__qualname__}"))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", [target, *fields.values()])


def defaults_of(cls: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{key: default}`` of a schema dataclass."""
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls) if f.name not in exclude}


def describe(cls: type = GRPOConfig, prefix: str = "") -> list[str]:
    """``key: type = default  # doc`` for every key below ``cls``, sections expanded."""
    lines = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if dataclasses.is_dataclass(f.type) and isinstance(f.type, type):
            lines.append(f"{name}:  # {f.metadata.get('doc', '')}")
            lines += describe(f.type, name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        type_name = getattr(f.type, "__name__", str(f.type)).replace("typing.", "")
        only_if = f.metadata.get("only_if")
        rules = [r for r in (f.metadata.get("range"), only_if and f"only with {only_if}") if r]
        rules_text = f" [{'; '.join(rules)}]" if rules else ""
        lines.append(f"{name}: {type_name} = {default!r}  # {f.metadata.get('doc', '')}{rules_text}")
    return lines
