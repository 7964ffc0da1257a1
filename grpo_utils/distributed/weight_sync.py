"""How the trainer's weights reach the collector actors: swappable strategies behind one interface.

* :class:`ObjectStoreWeightSync` (``mode.weight_sync=object_store``): one ``ray.put`` of the CPU
  state dict, shared by every actor. Works everywhere (CPU, GPU, many nodes) and costs one
  serialisation per push plus one copy per actor.
* :class:`CollectiveWeightSync` (``mode.weight_sync=collective``): a torch.distributed broadcast
  group (trainer = rank 0, collectors = ranks 1..N; gloo for CPU tensors, NCCL for CUDA). The
  weights travel as a handful of byte-bucket broadcasts straight into receive buffers on the
  actors: no serialisation, no object store, one send per push whatever the number of actors.

Both sides of a strategy meet through three actor methods that the collector implements:
``connect_weight_sync()`` (calls :meth:`WeightReceiver.connect`), ``update_weights(payload,
version)`` (calls :meth:`WeightReceiver.receive` and keeps the returned state dict until the next
generation boundary) and, optionally, a method that calls :meth:`WeightReceiver.close`.
"""

from __future__ import annotations

import abc
import hashlib
import math
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from grpo_utils.errors import WeightSyncError
from grpo_utils.models.lora import merged_state_dict

WEIGHT_SYNC_KINDS = ("object_store", "collective")
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_BUCKET_BYTES = 64 << 20
# Byte offsets inside a bucket are rounded up to this, so every slice can be viewed as any dtype.
_ALIGN = 16
# After a failed broadcast, how long to wait for the collectors' own errors (the likely cause).
_GRACE_S = 5.0


class CollectorDiedError(WeightSyncError):
    """A collector actor died during a weight-sync call."""


class WeightSyncTimeout(WeightSyncError):
    """Collectors did not finish a weight-sync call within the timeout."""


class WeightReceiver(abc.ABC):
    """Actor side of a weight sync. Picklable until :meth:`connect`; travels into the actor."""

    def connect(self, model: torch.nn.Module) -> None:  # noqa: B027 (optional hook)
        """Join whatever channel the strategy needs; called once by ``connect_weight_sync()``."""

    @abc.abstractmethod
    def receive(self, payload: Any) -> dict[str, torch.Tensor]:
        """The state dict to load, from the ``payload`` that ``update_weights`` was called with."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release the channel (idempotent)."""


class WeightSync(abc.ABC):
    """Trainer side of a weight sync."""

    @abc.abstractmethod
    def receiver(self, worker_index: int) -> WeightReceiver:
        """The receiver to pass into collector ``worker_index``'s constructor."""

    def connect(self, actors: list) -> None:  # noqa: B027 (optional hook)
        """Called once, after the actors are constructed."""

    @abc.abstractmethod
    def push(self, model: torch.nn.Module, version: int, actors: list) -> None:
        """Send ``model``'s weights, tagged ``version``, to every actor (a LoRA policy's merged:
        :func:`grpo_utils.models.lora.merged_state_dict`)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release the channel (idempotent)."""


def make_weight_sync(kind: str, *, num_receivers: int | None = None, device: torch.device | str | None = None,
                     backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> WeightSync:
    """The strategy named by ``mode.weight_sync``. ``device`` is where the trainer's weights live;
    it and the other keyword arguments only concern ``collective`` (see :class:`CollectiveWeightSync`)."""
    if kind == "object_store":
        return ObjectStoreWeightSync()
    if kind == "collective":
        return CollectiveWeightSync(backend=backend, device=device, num_receivers=num_receivers, timeout_s=timeout_s,
                                    bucket_bytes=bucket_bytes)
    cls = weight_sync_class(kind)
    return cls(num_receivers=num_receivers, device=device, timeout_s=timeout_s)


def weight_sync_class(kind: str) -> type:
    """A :class:`WeightSync` subclass of the user's, named by its dotted path in ``mode.weight_sync``
    (constructed with ``num_receivers``, ``device`` and ``timeout_s``); ``ValueError`` otherwise."""
    if "." in kind:
        from hydra.utils import get_class

        try:
            cls = get_class(kind)
        except Exception as e:
            raise ValueError(f"mode.weight_sync={kind} cannot be imported ({str(e).splitlines()[0]})") from None
        if isinstance(cls, type) and issubclass(cls, WeightSync):
            return cls
        raise ValueError(f"mode.weight_sync={kind} is not a WeightSync subclass")
    raise ValueError(f"mode.weight_sync={kind!r} is unknown; expected one of {', '.join(WEIGHT_SYNC_KINDS)}, or the "
                     "dotted path of a WeightSync subclass")


# --------------------------------------------------------------------------- object store


class ObjectStoreReceiver(WeightReceiver):
    """Ray has already resolved the ``ObjectRef`` argument into a deserialised (private) dict."""

    def receive(self, payload: Any) -> dict[str, torch.Tensor]:
        if payload is None:
            raise ValueError("object-store weight sync: update_weights() got no state dict")
        if not isinstance(payload, dict):  # a nested ObjectRef is not resolved by Ray
            import ray

            payload = ray.get(payload)
        return dict(payload)


class ObjectStoreWeightSync(WeightSync):
    """One ``ray.put`` of the CPU state dict per push, shared by all actors (fire and forget).

    ``ray.put`` serialises the tensors before it returns, so the stored snapshot is already
    independent of later optimiser steps: no extra defensive copy of CPU weights is made.
    """

    def receiver(self, worker_index: int) -> WeightReceiver:
        return ObjectStoreReceiver()

    def push(self, model: torch.nn.Module, version: int, actors: list) -> None:
        import ray

        ref = ray.put({k: v.detach().to("cpu") for k, v in merged_state_dict(model).items()})
        for actor in actors:
            actor.update_weights.remote(ref, version)


# --------------------------------------------------------------------------- collective
#
# Why not TorchRL's schemes (0.14.1): ``RayWeightSyncScheme``/``RayTransport`` drive the actor
# through TorchRL's collector methods (``_connect_weights_scheme``/``_receive_weights_scheme``),
# apply the weights into the live module inside that call (our actors must swap between
# generations, so the behaviour log-probs match the sampling weights), send one point-to-point
# copy per worker instead of a broadcast, and rendezvous on ``gethostbyname(gethostname())``,
# which is a loopback address on many hosts. ``DistributedWeightSyncScheme`` initialises the
# process-global default group. So the broadcast below uses torch.distributed directly, with a
# standalone TCPStore and process-group object per WeightSync that nothing else in the process sees.


@dataclass(frozen=True)
class _Slot:
    """Where one state-dict entry lives in the byte buckets."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    bucket: int
    offset: int
    nbytes: int


def _layout(state: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(k, tuple(v.shape), v.dtype) for k, v in state.items()]


def _plan(layout: list[tuple[str, tuple[int, ...], torch.dtype]], bucket_bytes: int) -> tuple[list[_Slot], list[int]]:
    """Pack the entries, in order, into byte buckets of at most ``bucket_bytes`` (a larger tensor
    gets a bucket of its own). Sender and receivers compute the same plan from the same layout."""
    slots: list[_Slot] = []
    sizes = [0]
    for name, shape, dtype in layout:
        nbytes = math.prod(shape) * dtype.itemsize
        offset = -(-sizes[-1] // _ALIGN) * _ALIGN
        if sizes[-1] and offset + nbytes > bucket_bytes:
            sizes.append(0)
            offset = 0
        slots.append(_Slot(name, shape, dtype, len(sizes) - 1, offset, nbytes))
        sizes[-1] = offset + nbytes
    return slots, sizes


def _fingerprint(layout: list[tuple[str, tuple[int, ...], torch.dtype]], bucket_bytes: int) -> int:
    """A 63-bit digest of names, shapes and dtypes (stable across processes, unlike ``hash``)."""
    text = repr([(n, s, str(d)) for n, s, d in layout] + [bucket_bytes]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).view(torch.uint8)


def _fill_bucket(buffer: torch.Tensor, state: dict[str, torch.Tensor], slots: list[_Slot]) -> None:
    for s in slots:
        if s.nbytes:
            buffer[s.offset:s.offset + s.nbytes].copy_(_as_bytes(state[s.name]))


def _unpack(buffers: list[torch.Tensor], slots: list[_Slot]) -> dict[str, torch.Tensor]:
    """Typed views into the byte buckets, one per state-dict entry."""
    return {s.name: buffers[s.bucket][s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in slots}


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _new_group(backend: str, store: dist.Store, rank: int, world_size: int, timeout: timedelta, host: str):
    """A standalone process-group backend (never registered as the default group)."""
    if backend == "gloo":
        gloo = dist.ProcessGroupGloo
        if hasattr(gloo, "_Options") and hasattr(gloo, "create_device"):
            # Bind to the Ray node address: gloo's default device resolves the hostname, which is a
            # loopback address on many hosts and then cannot reach other nodes.
            options = gloo._Options()
            options._timeout = timeout
            options._devices = [gloo.create_device(hostname=host)]
            return gloo(store, rank, world_size, options)
        return gloo(store, rank, world_size, timeout)
    nccl = getattr(dist, "ProcessGroupNCCL", None)
    if nccl is None:
        raise RuntimeError("collective weight sync: backend 'nccl' needs a CUDA build of torch")
    options = nccl.Options()
    options._timeout = timeout
    return nccl(store, rank, world_size, options)


def _check_group(group, device: torch.device, world_size: int) -> None:
    """A first collective: NCCL connects lazily, so make connection failures surface in connect()."""
    probe = torch.ones(1, dtype=torch.int64, device=device)
    group.allreduce(probe).wait()
    if int(probe.item()) != world_size:
        raise WeightSyncError(f"collective weight sync: group check summed to {int(probe.item())}, "
                              f"expected {world_size}")


def _failed(ref) -> BaseException | None:
    """The error a finished Ray call raised, or None."""
    import ray

    try:
        ray.get(ref, timeout=0)
    except ray.exceptions.GetTimeoutError:
        return None
    except Exception as e:  # RayTaskError / RayActorError
        return e
    return None


def _describe_device(device: torch.device | None) -> str:
    """``cpu``, or ``cuda:<GPU uuid>`` (``cuda:?`` when torch cannot tell), published at rendezvous."""
    if device is None or device.type != "cuda":
        return "cpu"
    uuid_ = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return f"cuda:{uuid_}" if uuid_ is not None else "cuda:?"


def _choose_backend(requested: str | None, devices: list[str]) -> str:
    """NCCL only when every rank (trainer first) holds its weights on its own, identifiable GPU;
    NCCL refuses two ranks on one GPU (a colocated trainer and collector), gloo works everywhere."""
    if requested is not None:
        return requested
    gpus = [d for d in devices if d.startswith("cuda:") and d != "cuda:?"]
    return "nccl" if len(gpus) == len(devices) and len(set(gpus)) == len(gpus) else "gloo"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _agree_on_layout(group, device: torch.device, fingerprint: int, is_root: bool) -> bool:
    """Rank 0 broadcasts its layout digest; every rank reports a mismatch; all learn the verdict.

    A receiver whose buffers disagree with the sender's tensors would otherwise hang or corrupt
    weights; with this handshake every rank aborts the push cleanly and the group stays usable.
    """
    digest = torch.tensor([fingerprint if is_root else 0], dtype=torch.int64, device=device)
    group.broadcast(digest, 0).wait()
    flag = torch.tensor([int(int(digest.item()) != fingerprint)], dtype=torch.int64, device=device)
    group.allreduce(flag, dist.ReduceOp.MAX).wait()
    return not int(flag.item())


class CollectiveReceiver(WeightReceiver):
    """Rank ``rank`` of the broadcast group, living in a collector actor.

    :meth:`connect` allocates the byte buckets shaped like the actor's own ``state_dict()``; each
    :meth:`receive` fills them and hands them over as typed views, then allocates fresh ones for
    the next receive, so a later push never overwrites weights that are still waiting to be loaded.
    """

    def __init__(self, master_addr: str, master_port: int, prefix: str, rank: int, timeout_s: float,
                 bucket_bytes: int):
        self.master_addr = master_addr
        self.master_port = master_port
        self.prefix = prefix
        self.rank = rank
        self.timeout_s = timeout_s
        self.bucket_bytes = bucket_bytes
        self._reset()

    def _reset(self) -> None:
        self._store = None
        self._group = None
        self.backend: str | None = None
        self._device = torch.device("cpu")
        self._slots: list[_Slot] = []
        self._sizes: list[int] = []
        self._fingerprint = 0
        self._buffers: list[torch.Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_store=None, _group=None, _buffers=None)
        return state

    def connect(self, model: torch.nn.Module) -> None:
        """Publish this rank's device, learn the backend the trainer chose, join the group."""
        if self._group is not None:
            return
        state = model.state_dict()
        devices = {v.device for v in state.values()}
        model_device = next(iter(devices)) if len(devices) == 1 else None
        timeout = timedelta(seconds=self.timeout_s)
        store = dist.TCPStore(self.master_addr, self.master_port, is_master=False, timeout=timeout)
        prefixed = dist.PrefixStore(self.prefix, store)
        world_size = int(prefixed.get("world_size"))
        if not 0 < self.rank < world_size:
            raise ValueError(f"collective weight sync: receiver for worker {self.rank - 1} does not fit a group "
                             f"of {world_size - 1} collectors (one receiver per actor, indices 0..{world_size - 2})")
        layout = _layout(state)
        self._slots, self._sizes = _plan(layout, self.bucket_bytes)
        self._fingerprint = _fingerprint(layout, self.bucket_bytes)
        prefixed.set(f"arrived/{self.rank}", _describe_device(model_device))
        backend = prefixed.get("backend").decode()
        if backend == "nccl":
            if model_device is None or model_device.type != "cuda":
                raise WeightSyncError(f"collective weight sync: backend 'nccl' needs collector {self.rank - 1}'s "
                                      f"model on one CUDA device (found {sorted(map(str, devices))}); use 'gloo'")
            torch.cuda.set_device(model_device)
            self._device = model_device
        group = _new_group(backend, prefixed, self.rank, world_size, timeout, _node_ip())
        _check_group(group, self._device, world_size)
        self._store, self._group, self.backend = store, group, backend
        self._buffers = self._allocate()

    def _allocate(self) -> list[torch.Tensor]:
        return [torch.empty(size, dtype=torch.uint8, device=self._device) for size in self._sizes]

    def receive(self, payload: Any) -> dict[str, torch.Tensor]:
        if self._group is None:
            raise RuntimeError("collective weight sync: receive() before connect()")
        if payload is not None:
            raise ValueError("collective weight sync: update_weights() expects payload=None "
                             "(the weights come through the broadcast)")
        if not _agree_on_layout(self._group, self._device, self._fingerprint, is_root=False):
            raise WeightSyncError(f"collective weight sync: collector {self.rank - 1}'s state dict (names, shapes, "
                                  "dtypes) differs from the trainer's; push aborted")
        buffers = self._buffers if self._buffers is not None else self._allocate()
        self._buffers = None
        for buffer in buffers:
            if buffer.numel():
                self._group.broadcast(buffer, 0).wait()
        if self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()
        return _unpack(buffers, self._slots)

    def close(self) -> None:
        group = self._group
        self._reset()
        if group is not None:
            try:
                group.shutdown()
            except Exception:  # best effort: the peer may already be gone
                pass


class CollectiveWeightSync(WeightSync):
    """Broadcast from the trainer (rank 0) to the collectors (ranks 1..N) in byte buckets.

    Rendezvous: a TCPStore on the trainer's Ray node address and an OS-chosen free port, with a
    per-instance key prefix, so several groups (or a new one after :meth:`close`) never collide.
    ``device`` is where the trainer's weights live. ``backend=None`` negotiates at connect: NCCL
    when the trainer and every collector hold their weights on distinct GPUs, gloo otherwise
    (CPU anywhere, or a GPU shared by two ranks, which NCCL refuses). ``num_receivers``, when
    given, is checked against the receivers made and the actors connected.
    """

    def __init__(self, backend: str | None = None, device: torch.device | str | None = None,
                 num_receivers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        if backend not in (None, "gloo", "nccl"):
            raise ValueError(f"collective weight sync: backend={backend!r} is not one of: gloo, nccl (or None: auto)")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl" and self.device.type != "cuda":
            raise ValueError(f"collective weight sync: backend 'nccl' needs the trainer's weights on CUDA "
                             f"(device={self.device}); use 'gloo'")
        if bucket_bytes <= 0:
            raise ValueError(f"collective weight sync: bucket_bytes must be positive, got {bucket_bytes}")
        self.backend = backend
        self.num_receivers = num_receivers
        self.timeout_s = float(timeout_s)
        self.bucket_bytes = int(bucket_bytes)
        self.prefix = f"grpo-weight-sync/{uuid.uuid4().hex}"
        self.master_addr: str | None = None
        self.master_port: int | None = None
        self.active_backend: str | None = None  # chosen at connect()
        self._store = None
        self._group = None
        self._num_actors = 0
        self._issued: set[int] = set()
        self._staging: torch.Tensor | None = None
        self._broken = ""  # why the group can no longer be used, after a failed broadcast
        self._device = torch.device("cpu")  # where the broadcast buffers live on the trainer

    def _ensure_store(self) -> None:
        if self._store is None:
            self.master_addr = _node_ip()
            self._store = dist.TCPStore(self.master_addr, 0, is_master=True, wait_for_workers=False,
                                        timeout=timedelta(seconds=self.timeout_s))
            self.master_port = self._store.port

    def receiver(self, worker_index: int) -> WeightReceiver:
        if self._group is not None:
            raise RuntimeError("collective weight sync: receivers must be made before connect()")
        if self.num_receivers is not None and not 0 <= worker_index < self.num_receivers:
            raise ValueError(f"collective weight sync: worker_index {worker_index} is outside "
                             f"0..{self.num_receivers - 1}")
        self._ensure_store()
        self._issued.add(worker_index)
        return CollectiveReceiver(self.master_addr, self.master_port, self.prefix, worker_index + 1, self.timeout_s,
                                  self.bucket_bytes)

    def connect(self, actors: list) -> None:
        """Every actor's ``connect_weight_sync()`` and rank 0's join run concurrently (the group
        forms only when all ranks are in), bounded by ``timeout_s``."""
        if self._group is not None:
            raise RuntimeError("collective weight sync: connect() called twice")
        n = len(actors)
        if self.num_receivers is not None and n != self.num_receivers:
            raise ValueError(f"collective weight sync: {n} actors connect, num_receivers={self.num_receivers}")
        if self._issued != set(range(n)):
            raise ValueError(f"collective weight sync: receivers were made for worker indices {sorted(self._issued)}"
                             f" but {n} actors connect; make one receiver per actor, indices 0..{n - 1}")
        self._ensure_store()
        prefixed = dist.PrefixStore(self.prefix, self._store)
        prefixed.set("world_size", str(n + 1))
        deadline = time.monotonic() + self.timeout_s
        refs = [actor.connect_weight_sync.remote() for actor in actors]
        joined: dict[str, Any] = {}

        def join() -> None:
            try:
                keys = [f"arrived/{rank}" for rank in range(1, n + 1)]
                prefixed.wait(keys, timedelta(seconds=max(0.0, deadline - time.monotonic())))
                backend = _choose_backend(self.backend, [_describe_device(self.device)]
                                          + [prefixed.get(k).decode() for k in keys])
                device = self.device if backend == "nccl" else torch.device("cpu")
                if backend == "nccl":
                    torch.cuda.set_device(device)
                prefixed.set("backend", backend)
                group = _new_group(backend, prefixed, 0, n + 1, timedelta(seconds=self.timeout_s), self.master_addr)
                _check_group(group, device, n + 1)
                joined.update(group=group, backend=backend, device=device)
            except Exception as e:  # reported by the caller's thread
                joined["error"] = e

        thread = threading.Thread(target=join, name="weight-sync-join", daemon=True)
        thread.start()
        what = f"join the weight-sync group of {n + 1}"
        try:
            self._wait(refs, deadline, what, joined)
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive() or "error" in joined:
                reason = _first_line(joined["error"]) if "error" in joined else "still waiting"
                raise WeightSyncError(f"collective weight sync: the trainer (rank 0) could not {what} within "
                                      f"timeout_s={self.timeout_s:g}s: {reason}")
        except CollectorDiedError:
            self.close()
            raise
        except WeightSyncError:
            # Collectors that never arrived are the cause; the others merely timed out waiting for them.
            absent = [i for i in range(n) if not prefixed.check([f"arrived/{i + 1}"])]
            self.close()
            if absent:
                raise WeightSyncError(f"collective weight sync: collector(s) {absent} never reached the weight-sync "
                                      f"group (their connect_weight_sync() did not join it) within "
                                      f"timeout_s={self.timeout_s:g}s") from None
            raise
        except BaseException:
            self.close()
            raise
        self._group, self.active_backend, self._device = joined["group"], joined["backend"], joined["device"]
        self._num_actors = n

    def _wait(self, refs: list, deadline: float, what: str, joined: dict[str, Any] | None = None) -> None:
        """Wait for the actors' calls, ending early on an actor's failure or the trainer's own join failure.

        When one collector dies, its peers' calls fail too (broken connections): the dead one is
        reported, since that is the cause.
        """
        import ray

        pending = list(refs)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                late = sorted(refs.index(r) for r in pending)
                raise WeightSyncTimeout(f"collective weight sync: collector(s) {late} did not {what} "
                                        f"within timeout_s={self.timeout_s:g}s")
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=min(left, 0.25))
            if any(_failed(ref) for ref in done):
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0)  # let the other failures land
                failures = [(refs.index(r), e) for r in done if (e := _failed(r)) is not None]
                died = [(i, e) for i, e in failures if isinstance(e, ray.exceptions.RayActorError)]
                i, e = (died or failures)[0]
                error = CollectorDiedError if died else WeightSyncError
                raise error(f"collective weight sync: collector {i} {'died while trying to' if died else 'failed to'} "
                            f"{what}: {_first_line(getattr(e, 'cause', None) or e)}") from None
            if joined and "error" in joined:
                return  # the trainer's own failure is reported by the caller

    def push(self, model: torch.nn.Module, version: int, actors: list) -> None:
        """Broadcast the weights and return once every actor holds them (pushes never overlap)."""
        if self._group is None:
            raise RuntimeError("collective weight sync: push() before connect() (or after close())")
        if self._broken:
            raise WeightSyncError(f"collective weight sync: the group is broken since an earlier push: {self._broken}")
        if len(actors) != self._num_actors:
            raise ValueError(f"collective weight sync: push() to {len(actors)} actors, connected {self._num_actors}")
        # A LoRA policy sends its merged weights under the plain names: the collectors' copies
        # (and the receive buffers sized from them) are plain Hugging Face models.
        state = merged_state_dict(model)
        layout = _layout(state)
        slots, sizes = _plan(layout, self.bucket_bytes)
        deadline = time.monotonic() + self.timeout_s
        refs = [actor.update_weights.remote(None, version) for actor in actors]
        what = f"receive weights version {version}"
        try:
            if not _agree_on_layout(self._group, self._device, _fingerprint(layout, self.bucket_bytes), is_root=True):
                self._wait(refs, deadline, what)  # raises with the collector's own message
                raise WeightSyncError("collective weight sync: a collector's state dict differs from the trainer's")
            for bucket, size in enumerate(sizes):
                if size:
                    self._group.broadcast(self._bucket(state, [s for s in slots if s.bucket == bucket], size), 0).wait()
        except WeightSyncError:
            raise
        except RuntimeError as e:
            # The group is unusable now. A collector that died is the likely cause: name it if Ray
            # reports it within a short grace, else report the broadcast error itself.
            self._broken = _first_line(e)
            try:
                self._wait(refs, min(deadline, time.monotonic() + _GRACE_S), what)
            except WeightSyncTimeout:
                pass
            raise WeightSyncError(f"collective weight sync: broadcast of version {version} failed: "
                                  f"{self._broken}") from e
        self._wait(refs, deadline, what)

    def _bucket(self, state: dict[str, torch.Tensor], slots: list[_Slot], size: int) -> torch.Tensor:
        """The bytes of one bucket: the tensor itself when it fills the bucket alone, else a staged copy."""
        if len(slots) == 1:
            tensor = state[slots[0].name]
            if tensor.device == self._device and tensor.is_contiguous():
                return _as_bytes(tensor)
        if self._staging is None or self._staging.numel() < size:
            self._staging = torch.empty(size, dtype=torch.uint8, device=self._device)
        staged = self._staging[:size]
        _fill_bucket(staged, state, slots)
        return staged

    def close(self) -> None:
        """Leave the group and stop the rendezvous store; a new instance can be made afterwards."""
        group, self._group = self._group, None
        self._store = None
        self._staging = None
        self._num_actors = 0
        if group is not None:
            try:
                group.shutdown()
            except Exception:  # best effort: peers may already be gone
                pass
