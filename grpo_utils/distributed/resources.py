"""Ray resource planning for the Ray modes (async, and sync with ``mode.ray=true``): what the
config asks for, whether the machine has it, and a local Ray cluster sized to exactly that (so
nothing waits forever for a CPU on 2 cores)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from grpo_utils.config.schema import AsyncModeConfig, SyncModeConfig, defaults_of

# Not defined here: ranks.py must not import the config package (Hydra), which bench/gpu_check.py
# runs without.
from grpo_utils.distributed.ranks import host_port, ranks_per_node  # noqa: F401 (re-exported)

# The keys of ``mode`` and their defaults, per mode, from the schema (read with OmegaConf.select,
# so a partial config gets the default).
SYNC_DEFAULTS = defaults_of(SyncModeConfig, exclude=("name",))
ASYNC_DEFAULTS = defaults_of(AsyncModeConfig, exclude=("name",))
MODE_DEFAULTS = {"sync": SYNC_DEFAULTS, "async": ASYNC_DEFAULTS}
WEIGHT_SYNCS = ("object_store", "collective")


def mode_opt(cfg: DictConfig, key: str):
    defaults = MODE_DEFAULTS[cfg.mode.name]
    return OmegaConf.select(cfg, f"mode.{key}", default=defaults.get(key, ASYNC_DEFAULTS.get(key)))


def inference_gpus(cfg: DictConfig) -> float:
    """GPUs for generation in all: ``inference_model.num_devices``."""
    return OmegaConf.select(cfg, "inference_model.num_devices", default=0) or 0


def replica_gpus(cfg: DictConfig) -> int:
    """GPUs one vLLM replica spans (its tensor-parallel size); 1 for the transformers backend."""
    if OmegaConf.select(cfg, "inference_model.backend", default="transformers") != "vllm":
        return 1
    return int(OmegaConf.select(cfg, "inference_model.tensor_parallel_size", default=1) or 1)


def num_collectors(cfg: DictConfig) -> int:
    """Collector actors: ``mode.num_collectors``, or (null) one per inference replica, at least 1.
    Sync on Ray always runs one."""
    if cfg.mode.name == "sync":
        return 1
    n = mode_opt(cfg, "num_collectors")
    if n is None:
        n = max(1, int(inference_gpus(cfg) // replica_gpus(cfg)))
    return n


def collector_gpus(cfg: DictConfig) -> float:
    """GPUs per collector actor: ``inference_model.num_devices`` split over the collectors."""
    total = inference_gpus(cfg)
    return total / num_collectors(cfg) if total else 0


def uses_ray(cfg: DictConfig) -> bool:
    return cfg.mode.name == "async" or bool(mode_opt(cfg, "ray"))


@dataclass
class ResourcePlan:
    cluster_cpus: int
    cluster_gpus: int
    collector_cpus: float
    collector_gpus: float
    num_collectors: int
    trainer_cpus: int
    trainer_gpus: int
    trainer_device_index: int = 0
    reference_gpu: int | None = None  # the reference's own GPU (ref_model.num_devices=1), kept from collectors

    @property
    def ray_cpus(self) -> float:
        """CPUs the Ray cluster is started with: the collectors' share (the trainer runs in the driver)."""
        return self.num_collectors * self.collector_cpus

    @property
    def ray_gpus(self) -> float:
        return self.num_collectors * self.collector_gpus

    @property
    def trainer_threads(self) -> int:
        return max(1, self.trainer_cpus)


def _weight_sync_class_ok(kind) -> bool:
    """A dotted path names a user's WeightSync class: import it now (a bad one raises its own line)."""
    if not isinstance(kind, str) or "." not in kind:
        return False
    from grpo_utils.distributed.weight_sync import weight_sync_class

    weight_sync_class(kind)
    return True


def check_mode_options(cfg: DictConfig) -> None:
    """Raise ``ValueError`` (one line naming the key) on a bad or misplaced Ray/async setting."""
    name = cfg.mode.name
    allowed = {"name", *MODE_DEFAULTS[name]}
    for key in cfg.mode:
        if key not in allowed:
            other = "async" if name == "sync" else "sync"
            where = f"; it is a mode={other} setting" if key in MODE_DEFAULTS[other] else ""
            raise ValueError(f"mode.{key} is not a mode={name} setting{where}; allowed: {', '.join(sorted(allowed))}")
    if name == "sync":
        for key in ("ray", "sync_iter"):
            if not isinstance(mode_opt(cfg, key), bool):
                raise ValueError(f"mode.{key}={mode_opt(cfg, key)!r} must be true or false")
    n = mode_opt(cfg, "num_collectors")
    checks = [
        (n is None or (isinstance(n, int) and n >= 1), f"mode.num_collectors={n} must be null or an integer >= 1"),
        (mode_opt(cfg, "collector_cpus") > 0, f"mode.collector_cpus={mode_opt(cfg, 'collector_cpus')} must be > 0"),
        (inference_gpus(cfg) >= 0, f"inference_model.num_devices={inference_gpus(cfg)} must be >= 0"),
        (mode_opt(cfg, "trainer_cpus") >= 1, f"mode.trainer_cpus={mode_opt(cfg, 'trainer_cpus')} must be >= 1"),
        (mode_opt(cfg, "max_staleness") >= 0, f"mode.max_staleness={mode_opt(cfg, 'max_staleness')} must be >= 0"),
        (mode_opt(cfg, "weight_update_frequency") >= 1,
         f"mode.weight_update_frequency={mode_opt(cfg, 'weight_update_frequency')} must be >= 1"),
        (mode_opt(cfg, "buffer_size") >= 1, f"mode.buffer_size={mode_opt(cfg, 'buffer_size')} must be >= 1"),
        (mode_opt(cfg, "actor_timeout_s") > 0, f"mode.actor_timeout_s={mode_opt(cfg, 'actor_timeout_s')} must be > 0"),
        (mode_opt(cfg, "weight_sync") in WEIGHT_SYNCS or _weight_sync_class_ok(mode_opt(cfg, "weight_sync")),
         f"mode.weight_sync={mode_opt(cfg, 'weight_sync')!r} is unknown; expected one of {', '.join(WEIGHT_SYNCS)}"),
        (isinstance(mode_opt(cfg, "max_restarts"), int) and mode_opt(cfg, "max_restarts") >= 0,
         f"mode.max_restarts={mode_opt(cfg, 'max_restarts')} must be an integer >= 0"),
        (mode_opt(cfg, "ray_address") is None or (isinstance(mode_opt(cfg, "ray_address"), str)
                                                   and mode_opt(cfg, "ray_address").strip() != ""),
         f"mode.ray_address={mode_opt(cfg, 'ray_address')!r} must be null, auto or host:port"),
        (mode_opt(cfg, "max_restarts") == 0 or mode_opt(cfg, "weight_sync") == "object_store",
         f"mode.max_restarts={mode_opt(cfg, 'max_restarts')} needs mode.weight_sync=object_store "
         "(a restarted actor cannot join a running broadcast group)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def trainer_gpus(cfg: DictConfig, trainer_device: torch.device) -> int:
    """GPUs the trainer ranks take on this node, from the trainer's device index on. Ranks run on
    CPU only with ``device=cpu`` said explicitly (``auto`` without a GPU still asks for GPUs: a
    multi-device run on a machine without them is a mistake, not a wish for CPU processes)."""
    per_node = ranks_per_node(cfg)
    if trainer_device.type == "cuda" or (per_node > 1 and str(OmegaConf.select(cfg, "device")) != "cpu"):
        return per_node
    return 0


def needs_reference(cfg: DictConfig) -> bool:
    """A reference model is loaded exactly when a KL-to-reference term is on (``loss.kl_coef`` > 0)."""
    return (OmegaConf.select(cfg, "loss.kl_coef", default=0) or 0) > 0


def _local_inference_gpus(cfg: DictConfig) -> int:
    """Whole GPUs the collectors take on this machine (none when they run on a joined cluster)."""
    return math.ceil(inference_gpus(cfg)) if mode_opt(cfg, "ray_address") is None else 0


def gpu_order(trainer_device: torch.device, trainer_gpus: int, total: int) -> list[int]:
    """This machine's GPU indices in the order they are handed out: the trainer's
    (``trainer_gpus`` from its device index) first, then the others by index. Collectors take the
    next ones (:func:`collector_gpu_ids`), the reference the one after them (:func:`reference_device`)."""
    start = (trainer_device.index or 0) if trainer_device.type == "cuda" else 0
    own = list(range(start, start + trainer_gpus))
    return own + [i for i in range(total) if i not in own]


def reference_device(cfg: DictConfig, trainer_device: torch.device,
                     available_gpus: int | None = None) -> torch.device:
    """Where the frozen reference lives: ``ref_model.device`` as given; else with
    ``ref_model.num_devices=0`` the trainer's device, with ``1`` the GPU after the trainer's and
    the local inference GPUs (:func:`gpu_order`). ``ValueError`` (one line) for a GPU the machine
    lacks."""
    gpus = torch.cuda.device_count() if available_gpus is None else available_gpus
    name = OmegaConf.select(cfg, "ref_model.device", default=None)
    if name is not None:
        device = torch.device(name)
        if device.type == "cuda" and (device.index or 0) >= gpus:
            have = f"cuda:0 .. cuda:{gpus - 1}" if gpus else "none"
            raise ValueError(f"ref_model.device={name} but the machine has {gpus} GPU(s) ({have})")
        return device
    if not cfg.ref_model.num_devices:
        return trainer_device
    n_train, n_inference = trainer_gpus(cfg, trainer_device), _local_inference_gpus(cfg)
    order = gpu_order(trainer_device, n_train, gpus)
    slot = n_train + n_inference  # the reference's place in the order
    if slot >= len(order):
        check_room("GPU", f"trainer {n_train} + inference_model.num_devices={n_inference} + ref_model.num_devices=1 "
                          f"= {slot + 1} GPUs", slot + 1, gpus, f"the machine has {gpus}")
    return torch.device("cuda", order[slot])


def check_devices(cfg: DictConfig, trainer_device: torch.device, available_gpus: int | None = None) -> None:
    """``ValueError`` with one line when the GPUs the config asks for (trainer, reference, collectors
    on this machine) exceed what the machine has, or ``ref_model.device`` names a GPU it lacks."""
    gpus = torch.cuda.device_count() if available_gpus is None else available_gpus
    n_train = trainer_gpus(cfg, trainer_device)
    parts = []
    if n_train:
        nodes = cfg.train_model.num_nodes
        per = f" / train_model.num_nodes={nodes}" if nodes > 1 else ""
        parts.append((f"train_model.num_devices={cfg.train_model.num_devices}{per}", n_train))
    if cfg.ref_model.num_devices:
        parts.append((f"ref_model.num_devices={cfg.ref_model.num_devices}", cfg.ref_model.num_devices))
    total = inference_gpus(cfg)
    if total and mode_opt(cfg, "ray_address") is None:
        parts.append((f"inference_model.num_devices={total:g}", total))
    need = sum(n for _, n in parts)
    first = trainer_device.index or 0
    if n_train > 1 and first + n_train > gpus >= need:
        raise ValueError(f"not enough GPUs: {n_train} trainer ranks from device={cfg.device} need cuda:{first}.."
                         f"cuda:{first + n_train - 1}, but the machine has {gpus}")
    if parts:
        check_room("GPU", " + ".join(text for text, _ in parts) + f" = {need:g} GPUs", need, gpus,
                   f"the machine has {gpus}")
    if needs_reference(cfg) and cfg.ref_model.num_devices <= 1:  # more: refused by check_placement
        reference_device(cfg, trainer_device, gpus)


def plan_resources(cfg: DictConfig, trainer_device: torch.device,
                   available_gpus: int | None = None) -> ResourcePlan:
    """The plan, or ``ValueError`` with one line saying what is short. With ``mode.ray_address``
    the collectors run on the joined cluster (checked by :func:`start_ray`), so only the trainer
    must fit this machine."""
    cluster_cpus = mode_opt(cfg, "cluster_cpus") or os.cpu_count() or 1
    gpus = torch.cuda.device_count() if available_gpus is None else available_gpus
    plan = ResourcePlan(cluster_cpus=int(cluster_cpus), cluster_gpus=gpus,
                        collector_cpus=float(mode_opt(cfg, "collector_cpus")),
                        collector_gpus=float(collector_gpus(cfg)),
                        num_collectors=num_collectors(cfg),
                        trainer_device_index=trainer_device.index or 0,
                        trainer_cpus=int(mode_opt(cfg, "trainer_cpus")),
                        trainer_gpus=trainer_gpus(cfg, trainer_device))
    if needs_reference(cfg) and OmegaConf.select(cfg, "ref_model.num_devices", default=0) == 1:
        # A GPU of its own, kept from the collectors (an explicit ref_model.device may share one).
        plan.reference_gpu = reference_device(cfg, trainer_device, gpus).index
    external = mode_opt(cfg, "ray_address") is not None  # the collectors then run on the joined cluster
    p = plan
    rows = (("CPU", p.collector_cpus, f"mode.trainer_cpus={p.trainer_cpus}", p.trainer_cpus, p.cluster_cpus),
            ("GPU", p.collector_gpus, f"trainer {p.trainer_gpus}", p.trainer_gpus, p.cluster_gpus))
    for kind, per_collector, trainer, trainer_need, have in rows:
        need = (0.0 if external else plan.num_collectors * per_collector) + trainer_need
        check_room(kind, f"{_collectors_ask(plan, kind)} + {trainer} = {need:g} {kind}s", need, have,
                   f"the machine has {have:g}")
    return plan


def _collectors_ask(plan: ResourcePlan, kind: str) -> str:
    if kind == "CPU":
        return f"mode.num_collectors={plan.num_collectors} x mode.collector_cpus={plan.collector_cpus:g}"
    total = plan.num_collectors * plan.collector_gpus
    return f"inference_model.num_devices={total:g} over mode.num_collectors={plan.num_collectors}"


def check_replicas(cfg: DictConfig) -> None:
    """``ValueError`` unless each collector drives whole vLLM replicas: one replica of
    ``tensor_parallel_size`` GPUs per collector (on GPUs), tensor parallelism only with GPUs."""
    if OmegaConf.select(cfg, "inference_model.backend", default="transformers") != "vllm":
        return
    tp, total = replica_gpus(cfg), inference_gpus(cfg)
    if tp < 1:
        raise ValueError(f"inference_model.tensor_parallel_size={tp} must be >= 1")
    if not total:
        if tp > 1:
            raise ValueError(f"inference_model.tensor_parallel_size={tp} needs GPUs: set inference_model.num_devices")
        return
    n = num_collectors(cfg)
    if total != n * tp:
        several = cfg.mode.name == "sync" and total > tp
        hint = "mode=async with mode.num_collectors" if several else "mode.num_collectors"
        raise ValueError(f"inference_model.num_devices={total:g} over {n} collector(s) is not one vLLM replica of "
                         f"inference_model.tensor_parallel_size={tp} GPUs each: use {hint}={max(1, int(total // tp))} "
                         f"or inference_model.num_devices={n * tp}")


def check_room(kind: str, asked: str, need: float, have: float, there: str, where: str = "") -> None:
    """``ValueError``, one line: what was asked (``asked``), what there is (``there``), how much is short."""
    if need > have:
        raise ValueError(f"not enough {kind}s{where}: {asked}, but {there} (short by {need - have:g})")


def start_ray(plan: ResourcePlan, address: str | None = None) -> None:
    """Without ``address``: a fresh local Ray cluster with exactly the planned resources. With it:
    join that running cluster (e.g. one started across the nodes of an sbatch job) after checking
    it has room for the collectors; the cluster is left running at the end, only our actors go."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        if plan.ray_gpus and (plan.trainer_gpus or plan.reference_gpu is not None):
            # Ray hands out GPU ids from CUDA_VISIBLE_DEVICES: hide the trainer's and the reference's
            # so no collector shares them.
            trainer_index = plan.trainer_device_index if plan.trainer_gpus else None
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(collector_gpu_ids(trainer_index, plan.cluster_gpus,
                                                                            plan.reference_gpu, plan.trainer_gpus))
        context = ray.init(address="local", num_cpus=math.ceil(plan.ray_cpus), num_gpus=math.ceil(plan.ray_gpus),
                           include_dashboard=False, logging_level="WARNING", log_to_driver=True,
                           configure_logging=True)
        _watch_local_cluster(context.address_info.get("session_dir"))
    else:
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=True, configure_logging=True)
        except ConnectionError as e:
            hint = ("" if os.environ.get("RAY_AUTH_MODE")
                    else " (a cluster with token authentication needs RAY_AUTH_MODE=token here too)")
            raise ValueError(f"cannot join the Ray cluster at mode.ray_address={address}: "
                             f"{str(e).strip().splitlines()[0]}{hint}") from None
        free = ray.available_resources()
        try:
            for kind, per_collector in (("CPU", plan.collector_cpus), ("GPU", plan.collector_gpus)):
                need = plan.num_collectors * per_collector
                have = free.get(kind, 0.0)
                check_room(kind, f"{_collectors_ask(plan, kind)} = {need:g}", need, have, f"{have:g} are free",
                           where=f" in the Ray cluster at mode.ray_address={address}")
        except ValueError:
            ray.shutdown()
            raise
    from grpo_utils.errors import raise_on_sigterm

    raise_on_sigterm()


def unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why ``host:port`` does not accept a TCP connection, or None (also for "auto" and URLs,
    which Ray resolves itself)."""
    import socket

    parsed = host_port(address)
    if parsed is None:
        return None
    host, port = parsed
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as e:
        return f"nothing answers at {host}:{port} ({e.strerror or e})"


def collector_gpu_ids(trainer_index: int | None, total: int, reference_index: int | None = None,
                      trainer_count: int = 1) -> list[str]:
    """The GPUs Ray may give collectors: all but the trainer ranks' (``trainer_count`` from
    ``trainer_index``) and the reference's (indices into CUDA_VISIBLE_DEVICES when set), in
    :func:`gpu_order`."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [i.strip() for i in visible.split(",") if i.strip()] if visible else [str(i) for i in range(total)]
    taken = set() if trainer_index is None else set(range(trainer_index, trainer_index + max(trainer_count, 1)))
    taken.add(reference_index)
    return [gpu for i, gpu in enumerate(ids) if i not in taken]


def shutdown_ray(actors: list) -> None:
    """Kill ``actors`` (ignoring those already dead), then stop the local cluster (or disconnect
    from a joined one)."""
    import ray

    if not ray.is_initialized():
        return
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already dead or never started
            pass
    global _WATCH
    from grpo_utils.distributed import watchdog

    # The local cluster's processes, agents included: whatever ray.shutdown() leaves is killed.
    known = watchdog.session_tree(_WATCH[1]) if _WATCH is not None else []
    ray.shutdown()
    if _WATCH is not None:
        watch, _WATCH = _WATCH, None
        watchdog.stop(*watch, known=known)


#: (watchdog process, session dir) of the local cluster this process started, if any.
_WATCH = None


def _watch_local_cluster(session_dir: str | None) -> None:
    """Start the watchdog that removes the local cluster (processes and session directory) if this
    process dies without shutting Ray down (``kill -9``): see :mod:`grpo_utils.distributed.watchdog`.
    ``session_dir``: the cluster's, as ``ray.init``'s context reports it (``address_info``)."""
    global _WATCH
    from grpo_utils.distributed import watchdog

    if session_dir:
        _WATCH = (watchdog.start(session_dir), session_dir)
